"""BraTS 2023 lesion-wise Dice and HD95 of one region (WT, TC or ET) of one case.

The challenges since 2023 rank by scores per lesion rather than per image, so that missing a
small lesion costs as much as missing a large one. This module reproduces the official BraTS
2023 evaluation (https://github.com/rachitsaluja/BraTS-2023-Metrics, ``metrics.py``; written
here from its definition, in NumPy/SciPy):

1. Lesions of the reference: connected components (26-connectivity) of the region mask.
   Components that touch after dilating the reference ``dilation`` times with the
   18-connected structure (``generate_binary_structure(3, 2)``) count as one lesion.
2. Lesions of the prediction: its connected components (26-connectivity).
3. For each reference lesion L: its matches are the predicted components that meet L dilated
   ``dilation`` times. Its Dice and HD95 compare L with the union of its matches (no match:
   Dice 0, HD95 ``MISS_HD95``).
4. False positives: predicted components that match no reference lesion.
5. Reference lesions of volume <= ``min_volume`` mm^3 are left out (those without a match are
   not counted as misses either; a prediction meeting one is still not a false positive).
6. Lesion-wise Dice = sum of the kept lesions' Dice / (kept lesions + false positives);
   lesion-wise HD95 = (sum of their HD95 + ``MISS_HD95`` x false positives) / (same count).
   With no kept lesion and no false positive: Dice 1, HD95 0.

Challenge parameters (dilation, minimum volume in mm^3): BraTS-GLI, -SSA, -PED (3, 50);
BraTS-MEN (1, 50); BraTS-MET (1, 2).

A lesion's HD95 is the official one (``surfel_hd95``): DeepMind's surface-distance package
(https://github.com/google-deepmind/surface-distance), which the official script calls. Its
surface is made of surface elements at the voxel corners, each weighted by its area, and the
95th percentile is a distance of one of them (no interpolation). It is not the MedPy HD95 of
``metrics.hd95`` (surface voxels counted alike, percentile interpolated), which is what the
whole-region ``hd95`` of the evaluation reports; the two differ by a fraction of a voxel to a
few millimetres.
"""

import dataclasses
import warnings

import numpy as np
from scipy import ndimage
import surface_distance

from mstkd_jax.metrics import bounding_slices

# The challenge's HD95 for a missed lesion or a false positive.
MISS_HD95 = 374.0
CHALLENGES = {'BraTS-GLI': (3, 50.0), 'BraTS-SSA': (3, 50.0), 'BraTS-PED': (3, 50.0),
              'BraTS-MEN': (1, 50.0), 'BraTS-MET': (1, 2.0)}

_COMPONENTS = np.ones((3, 3, 3), bool)                      # 26-connectivity
_DILATION = ndimage.generate_binary_structure(3, 2)        # 18-connected structure


@dataclasses.dataclass
class LesionScores:
  dice: float            # lesion-wise Dice in [0, 1]
  hd95: float            # lesion-wise HD95 in mm (surface-distance's definition)
  num_tp: int            # kept reference lesions with at least one matching prediction
  num_fn: int            # kept reference lesions without one
  num_fp: int            # predicted components matching no reference lesion
  lesions: list          # per kept lesion: (volume mm^3, Dice, HD95)


def challenge_parameters(name):
  if name not in CHALLENGES:
    raise ValueError(f'unknown challenge {name!r}; use one of {sorted(CHALLENGES)}')
  return CHALLENGES[name]


def surfel_hd95(pred_mask, true_mask, spacing=(1.0, 1.0, 1.0)):
  """HD95 in mm as the official BraTS 2023 script computes it: surface-distance's
  ``compute_robust_hausdorff(compute_surface_distances(true, pred, spacing), 95)``, the larger
  of the two directed 95th percentiles, each weighted by surface-element area. Both masks must
  be non-empty (the package's empty-mask branch uses ``np.Inf``, gone in NumPy 2)."""
  pred = np.asarray(pred_mask, bool)
  true = np.asarray(true_mask, bool)
  if not (pred.any() and true.any()):
    raise ValueError('surfel_hd95 needs two non-empty masks')
  spacing = [float(s) for s in np.broadcast_to(np.asarray(spacing, float), (3,))]
  with warnings.catch_warnings():
    # It reaches correlate / distance_transform_edt through SciPy's deprecated
    # ndimage.filters / ndimage.morphology namespaces.
    warnings.simplefilter('ignore', DeprecationWarning)
    distances = surface_distance.compute_surface_distances(true, pred, spacing)
    return float(surface_distance.compute_robust_hausdorff(distances, 95))


def reference_lesions(true, dilation):
  """Label image of the reference's lesions: its components, grouped by the components of the
  dilated reference (lesions that nearly touch are one). Returns (labels, count)."""
  components, _ = ndimage.label(true, structure=_COMPONENTS)
  if dilation > 0:
    grown = ndimage.binary_dilation(true, structure=_DILATION, iterations=dilation)
  else:
    grown = true
  groups, count = ndimage.label(grown, structure=_COMPONENTS)
  return np.where(components > 0, groups, 0), count


def _volume(voxels, spacing):
  """Volume in mm^3, multiplied in the official script's order (count * sx * sy * sz)."""
  volume = float(voxels)
  for size in spacing:
    volume *= size
  return volume


def lesion_wise(pred_mask, true_mask, spacing=(1.0, 1.0, 1.0), dilation=3, min_volume=50.0):
  """Lesion-wise scores of one region (module docstring); masks are boolean 3D arrays of one
  shape, ``spacing`` the voxel size in mm."""
  pred = np.asarray(pred_mask, bool)
  true = np.asarray(true_mask, bool)
  if pred.shape != true.shape or pred.ndim != 3:
    raise ValueError(f'need two 3D masks of one shape, got {pred.shape} and {true.shape}')
  spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (3,)))
  if not (pred.any() or true.any()):
    return LesionScores(1.0, 0.0, 0, 0, 0, [])
  # The same result on the box around both masks grown by dilation + 1 (every dilation stays
  # inside it or stops at the array's edge, as it would in the whole volume); much faster.
  box = bounding_slices(pred | true, margin=dilation + 1)
  pred, true = pred[box], true[box]
  lesions, count = reference_lesions(true, dilation)
  predicted, _ = ndimage.label(pred, structure=_COMPONENTS)
  matched = set()
  kept, num_tp, num_fn = [], 0, 0
  for index in range(1, count + 1):
    lesion = lesions == index
    if not lesion.any():
      continue
    zone = (ndimage.binary_dilation(lesion, structure=_DILATION, iterations=dilation)
            if dilation > 0 else lesion)
    hits = np.unique(predicted[zone & (predicted > 0)])
    matched.update(int(h) for h in hits)
    volume = _volume(np.count_nonzero(lesion), spacing)
    if volume <= min_volume:
      continue
    if len(hits):
      union = np.isin(predicted, hits)
      num_tp += 1
      score = (2.0 * np.count_nonzero(union & lesion)
               / (np.count_nonzero(union) + np.count_nonzero(lesion)),
               surfel_hd95(union, lesion, spacing))
    else:
      num_fn += 1
      score = (0.0, MISS_HD95)
    kept.append((volume,) + tuple(float(s) for s in score))
  all_predicted = set(int(i) for i in np.unique(predicted) if i > 0)
  num_fp = len(all_predicted - matched)
  denominator = len(kept) + num_fp
  if denominator == 0:
    return LesionScores(1.0, 0.0, 0, 0, 0, [])
  dice = sum(d for _, d, _ in kept) / denominator
  distance = (sum(h for _, _, h in kept) + MISS_HD95 * num_fp) / denominator
  return LesionScores(float(dice), float(distance), num_tp, num_fn, num_fp, kept)
