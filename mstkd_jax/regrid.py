"""Bring a patient's modalities onto one voxel grid, by their affines (no registration).

Clinical series of one patient often share the scanner's coordinate frame but not the voxel
grid (a 1 mm T1Gd beside a 5 mm FLAIR). ``onto_grid_of`` resamples every other modality into
the grid of a reference modality with ``nibabel.processing.resample_from_to`` (trilinear,
zero outside a volume's field of view) and writes them into a temporary folder, so that
prediction reads four volumes of one geometry and writes its output in the reference's.

It refuses volumes that do not overlap in world space (``NotCoRegisteredError``): those are not
in one frame at all, and no resampling puts them there; register them first (ANTs, FSL FLIRT,
SimpleITK...). Only the affines are used, so volumes that overlap but are misaligned (patient
moved between series) are resampled as they are.
"""

import os

from absl import logging
import nibabel as nib
import nibabel.processing
import numpy as np

from mstkd_jax.cli import InputError
from mstkd_jax.modalities import MODALITIES, channel_index

# Below this share of the reference's field of view inside another volume, the two are taken
# as not co-registered; below WARN_OVERLAP a warning names the share.
MIN_OVERLAP = 0.5
WARN_OVERLAP = 0.9


class NotCoRegisteredError(InputError, ValueError):
  """Two modalities that do not share a world frame (their fields of view barely overlap)."""


def field_of_view_overlap(reference, moving, stride=4):
  """The share of the reference image's voxels (every ``stride``-th along each axis) whose world
  position falls inside the moving image's volume."""
  shape = reference.shape[:3]
  axes = [np.arange(0, n, stride) for n in shape]
  grid = np.stack(np.meshgrid(*axes, indexing='ij'), -1).reshape(-1, 3)
  world = nib.affines.apply_affine(reference.affine, grid)
  inside = nib.affines.apply_affine(np.linalg.inv(moving.affine), world)
  limits = np.asarray(moving.shape[:3]) - 0.5
  ok = np.all((inside >= -0.5) & (inside <= limits), axis=1)
  return float(ok.mean())


def same_grid(a, b, atol=1e-3):
  return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=atol, rtol=0)


def onto_grid_of(paths, reference, folder):
  """``paths`` {modality name: NIfTI path} with every modality not on ``reference``'s grid
  resampled onto it and written into ``folder``; returns (new paths, {modality: share of the
  reference's field of view it covers}) for the resampled ones."""
  by_channel = {MODALITIES[channel_index(k)]: (k, p) for k, p in paths.items() if p}
  reference = MODALITIES[channel_index(reference)]
  if reference not in by_channel:
    raise InputError(f'--resample_to {reference}: that modality is not among the inputs '
                     f'({", ".join(sorted(by_channel))})')
  ref_key, ref_path = by_channel[reference]
  ref_img = nib.load(ref_path)
  out, coverage = {ref_key: ref_path}, {}
  for name, (key, path) in by_channel.items():
    if name == reference:
      continue
    img = nib.load(path)
    if same_grid(img, ref_img):
      out[key] = path
      continue
    share = field_of_view_overlap(ref_img, img)
    if share < MIN_OVERLAP:
      raise NotCoRegisteredError(
          f'{path}: {name} and {reference} do not overlap in world space (only '
          f'{100 * share:.0f} % of the {reference} field of view lies inside {name}): the '
          'volumes are not co-registered. Register them first (e.g. ANTs, FSL FLIRT); '
          '--resample_to only changes the voxel grid')
    if share < WARN_OVERLAP:
      logging.warning('%s covers only %.0f %% of the %s field of view; the rest is treated as '
                      'absent signal (zeros)', name, 100 * share, reference)
    data = np.asarray(img.dataobj, dtype=np.float32)
    moved = nibabel.processing.resample_from_to(
        nib.Nifti1Image(data, img.affine), (ref_img.shape[:3], ref_img.affine), order=1,
        mode='constant', cval=0.0)
    target = os.path.join(folder, f'{name}_on_{reference}_grid.nii.gz')
    header = ref_img.header.copy()
    header.set_data_dtype(np.float32)
    resampled = nib.Nifti1Image(np.asarray(moved.dataobj, np.float32), ref_img.affine, header)
    nib.save(resampled, target)
    out[key] = target
    coverage[name] = round(share, 4)
  return out, coverage
