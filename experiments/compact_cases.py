"""A compact copy of a folder of BraTS case folders: every file at a coarser spacing, cropped to
the brain, images as int16, labels as uint8. For moving a few real cases to a machine that
takes little data (the GPU check carries at most 64 MiB): 20 BraTS 2018 cases, 170.7 MB as
given, become 22.2 MB at 2 mm.

  python experiments/compact_cases.py --root data/brats2018 --out /tmp/brats2018_2mm

What changes, and why a run at ``data.spacing`` equal to ``--spacing`` sees nearly the same
input as from the originals: the images are resampled as the data path does it
(``preprocess.resample_grid``; linear interpolation for images, nearest neighbour for labels
and for the brain mask), rounded to integers (BraTS intensities are integers) and set to 0
outside the nearest-neighbour brain mask, so the data path's brain mask is the same; the files
are cropped to the brain's box plus ``--margin`` voxels with the affine moved accordingly. The
data path then resamples by a factor of 1 (nothing). The difference: it normalises each channel
over the brain at the coarse spacing instead of the original one (the mean and standard
deviation of interpolated intensities). File names and folder names are kept.
"""

import argparse
import glob
import json
import os
import sys

import nibabel as nib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mstkd_jax.data import preprocess  # noqa: E402

LABEL_SUFFIXES = ('_seg.nii.gz', '_seg.nii')


def is_label(name):
  return name.endswith(LABEL_SUFFIXES)


def compact_case(folder, out, spacing, margin):
  """Writes the compact copy of one case folder into ``out``; returns its bytes."""
  files = sorted(glob.glob(os.path.join(folder, '*.nii*')))
  if not files:
    raise ValueError(f'{folder}: no NIfTI files')
  first = nib.load(files[0])
  shape, affine, factors = preprocess.resample_grid(first.shape[:3], first.affine, spacing)
  offset = (factors - 1) / 2

  def resample(data, order):
    if np.all(factors == 1):
      return data
    return preprocess._resample(data, factors, offset, shape, order)  # pylint: disable=protected-access

  volumes, brain = {}, np.zeros(shape, bool)
  for path in files:
    img = nib.load(path)
    if img.shape[:3] != first.shape[:3] or not np.allclose(img.affine, first.affine, atol=1e-3):
      raise ValueError(f'{path}: grid differs from {files[0]}')
    data = np.asarray(img.dataobj)
    if is_label(path):
      volumes[path] = resample(data.astype(np.uint8), 0)
    else:
      brain |= resample(data != 0, 0)
      volumes[path] = resample(data.astype(np.float32), 1)
  hit = [np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
         for axis in range(3)]
  lo = [max(int(h[0]) - margin, 0) if h.size else 0 for h in hit]
  hi = [min(int(h[-1]) + 1 + margin, n) if h.size else n for h, n in zip(hit, shape)]
  box = tuple(slice(a, b) for a, b in zip(lo, hi))
  moved = affine.copy()
  moved[:3, 3] = affine[:3, :3] @ np.asarray(lo, np.float64) + affine[:3, 3]
  os.makedirs(out, exist_ok=True)
  total = 0
  for path, data in volumes.items():
    if is_label(path):
      data = data[box].astype(np.uint8)
    else:
      data = np.where(brain, np.round(data), 0)[box]
      data = np.clip(data, -32768, 32767).astype(np.int16)
    img = nib.Nifti1Image(data, moved)
    img.header.set_xyzt_units('mm', 'sec')
    target = os.path.join(out, os.path.basename(path))
    if not target.endswith('.gz'):
      target += '.gz'
    nib.save(img, target)
    total += os.path.getsize(target)
  return total, [b - a for a, b in zip(lo, hi)]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--root', required=True, help='folder of case folders')
  parser.add_argument('--out', required=True, help='folder for the compact case folders')
  parser.add_argument('--spacing', type=float, default=2.0, help='mm per voxel (default 2)')
  parser.add_argument('--margin', type=int, default=2, help='voxels kept around the brain')
  args = parser.parse_args(argv)
  cases = sorted(d for d in os.listdir(args.root) if os.path.isdir(os.path.join(args.root, d)))
  if not cases:
    parser.error(f'--root {args.root}: no case folders')
  total = 0
  for name in cases:
    size, box = compact_case(os.path.join(args.root, name), os.path.join(args.out, name),
                             args.spacing, args.margin)
    total += size
    print(json.dumps({'case': name, 'bytes': size, 'shape': box}), flush=True)
  print(json.dumps({'cases': len(cases), 'bytes': total, 'mib': round(total / 2**20, 1),
                    'spacing_mm': args.spacing, 'out': args.out}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
