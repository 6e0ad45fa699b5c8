"""Dice and HD95 of the three tumour regions, in plain NumPy/SciPy.

Definitions (docs/method.md, "Evaluation"):

* Dice = 2|A & B| / (|A| + |B|).
* HD95 follows MedPy's ``medpy.metric.binary.hd95``: the surface of a mask is the mask minus its
  binary erosion by the 6-connected structure (``generate_binary_structure(3, 1)``, voxels outside
  the array count as background); each surface voxel of A gets its Euclidean distance in mm
  (``distance_transform_edt`` with ``sampling=spacing``) to the nearest surface voxel of B and vice
  versa. MedPy, and the authors' copy of it, take the 95th percentile of the two directed distance
  sets pooled together (``mode='pooled'``, the default). ``mode='max'`` gives the other common
  reading, the larger of the two directed 95th percentiles.
* Empty masks, by convention ('brats' is what we report):

  - 'brats':   both empty -> Dice 1, HD95 0; exactly one empty -> Dice 0, HD95 373.13 mm.
  - 'authors': both empty -> Dice 1, HD95 0; exactly one empty -> Dice 0, HD95 0 mm.

  'authors' reproduces the released evaluation code, whose HD95 returns 0 when one mask is empty
  (which flatters a model that misses a region). Its Dice adds 1 to numerator and denominator;
  we do not copy that smoothing (it moves a tumour-sized Dice by less than 1e-3).

For speed the distance transform runs on the joint bounding box of both masks grown by one voxel,
which gives exactly the same distances as the full volume (see ``surface_distances``).
"""

import numpy as np
from scipy import ndimage

REGIONS = ('WT', 'TC', 'ET')
CONVENTIONS = ('brats', 'authors')
# BraTS value for HD95 when exactly one of prediction / reference is empty: the diagonal of the
# 240 x 240 x 155 BraTS volume in mm.
BRATS_EMPTY_HD95 = 373.13

# Output channels of the network (docs/method.md, "Task"): tumour sub-labels, then background.
_CHANNEL_NETC, _CHANNEL_SNFH, _CHANNEL_ET = 0, 1, 2


def _as_bool_pair(pred_mask, true_mask):
  pred = np.asarray(pred_mask).astype(bool, copy=False)
  true = np.asarray(true_mask).astype(bool, copy=False)
  if pred.shape != true.shape:
    raise ValueError(f'mask shapes differ: prediction {pred.shape}, reference {true.shape}')
  return pred, true


def _check_convention(convention):
  if convention not in CONVENTIONS:
    raise ValueError(f'unknown convention {convention!r}; use one of {CONVENTIONS}')


def dice(pred_mask, true_mask):
  """Dice coefficient in [0, 1] of two boolean masks; 1.0 when both are empty.

  The same under both conventions (exactly one empty mask gives 0).
  """
  pred, true = _as_bool_pair(pred_mask, true_mask)
  total = np.count_nonzero(pred) + np.count_nonzero(true)
  if total == 0:
    return 1.0
  return 2.0 * np.count_nonzero(pred & true) / total


def bounding_slices(mask, margin):
  """Slices of the bounding box of a non-empty mask, grown by ``margin`` and clipped."""
  slices = []
  for axis, size in enumerate(mask.shape):
    others = tuple(a for a in range(mask.ndim) if a != axis)
    hits = np.flatnonzero(mask.any(axis=others))
    slices.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + margin + 1, size)))
  return tuple(slices)


def _surface(mask):
  """Voxels of the mask with a 6-neighbour outside it (or outside the array)."""
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred_mask, true_mask, spacing=None, crop=True):
  """Directed surface distances (mm) of two non-empty masks.

  Returns ``(d_pred_to_true, d_true_to_pred)``: for every surface voxel of the prediction the
  distance to the nearest surface voxel of the reference, and the reverse.

  With ``crop`` the work is done on the joint bounding box grown by one voxel. This is exact:
  every mask voxel keeps all its 6-neighbours inside the box (or the box edge is the array edge,
  where erosion already treats the outside as background), so the surfaces are unchanged, and all
  surface voxels lie in the box, so the nearest one found by the (exact) distance transform is the
  same.
  """
  pred, true = _as_bool_pair(pred_mask, true_mask)
  if not pred.any() or not true.any():
    raise ValueError('surface distances need two non-empty masks')
  spacing = _normalise_spacing(spacing, pred.ndim)
  if crop:
    box = bounding_slices(pred | true, margin=1)
    pred, true = pred[box], true[box]
  pred_surface, true_surface = _surface(pred), _surface(true)
  to_true = ndimage.distance_transform_edt(~true_surface, sampling=spacing)
  to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
  return to_true[pred_surface], to_pred[true_surface]


def _normalise_spacing(spacing, ndim):
  if spacing is None:
    return (1.0,) * ndim
  spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,))
  if not np.all(spacing > 0):
    raise ValueError(f'voxel spacing must be positive, got {tuple(spacing)}')
  return tuple(float(s) for s in spacing)


def hd95(pred_mask, true_mask, spacing=(1.0, 1.0, 1.0), convention='brats', mode='pooled',
         crop=True):
  """95th-percentile symmetric Hausdorff distance in mm.

  Args:
    pred_mask, true_mask: boolean arrays of the same shape.
    spacing: voxel size in mm per axis (a scalar applies to every axis).
    convention: 'brats' or 'authors', the value when a mask is empty (module docstring).
    mode: 'pooled' (MedPy: 95th percentile of both directed distance sets together) or 'max'
      (the larger of the two directed 95th percentiles).
    crop: compute on the joint bounding box (identical result, faster).
  """
  _check_convention(convention)
  if mode not in ('pooled', 'max'):
    raise ValueError(f"unknown mode {mode!r}; use 'pooled' or 'max'")
  pred, true = _as_bool_pair(pred_mask, true_mask)
  pred_empty, true_empty = not pred.any(), not true.any()
  if pred_empty and true_empty:
    return 0.0
  if pred_empty or true_empty:
    return BRATS_EMPTY_HD95 if convention == 'brats' else 0.0
  forward, backward = surface_distances(pred, true, spacing, crop=crop)
  if mode == 'pooled':
    return float(np.percentile(np.concatenate([forward, backward]), 95))
  return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def region_masks(channels, threshold=0.5, channel_axis=-1):
  """WT / TC / ET boolean masks from a 4-channel array (channels-last by default).

  ``channels`` is the network's sigmoid output or the one-hot target, channels
  (NETC/NCR, SNFH/ED, ET, background); a channel is on where it exceeds ``threshold``.
  WT = NETC | SNFH | ET, TC = NETC | ET, ET = ET. The background channel is not used.
  """
  channels = np.asarray(channels)
  if channels.shape[channel_axis] < 3:
    raise ValueError(f'need at least 3 channels on axis {channel_axis}, got shape {channels.shape}')
  netc, snfh, et = (np.take(channels, c, axis=channel_axis) > threshold
                    for c in (_CHANNEL_NETC, _CHANNEL_SNFH, _CHANNEL_ET))
  return {'WT': netc | snfh | et, 'TC': netc | et, 'ET': et}


def case_metrics(pred_regions, true_regions, spacing=(1.0, 1.0, 1.0), convention='brats',
                 mode='pooled'):
  """Dice and HD95 of each region of one case.

  Args:
    pred_regions, true_regions: dicts region -> boolean mask, as from ``region_masks`` or
      ``data.layouts.region_masks`` (label files, through the layout's label table); must hold
      'WT', 'TC' and 'ET'.
  Returns:
    ``{'WT': {'dice': float, 'hd95': float}, 'TC': {...}, 'ET': {...}}``; Dice in [0, 1],
    HD95 in mm.
  """
  _check_convention(convention)
  out = {}
  for region in REGIONS:
    pred, true = pred_regions[region], true_regions[region]
    out[region] = {
        'dice': float(dice(pred, true)),
        'hd95': hd95(pred, true, spacing=spacing, convention=convention, mode=mode),
    }
  return out
