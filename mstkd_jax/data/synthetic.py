r"""Synthetic BraTS-like cases written as real NIfTI case folders.

Usage::

  python -m mstkd_jax.data.synthetic --out /tmp/synth --cases 8 \
      [--shape 240 240 155] [--layout brats2024|brats2021] [--seed 0] [--spacing 1.0]

Each case is a skull-stripped "brain" (zero background) in a field of view of ``--shape``:
an ellipsoid with a folded surface, a cortical grey-matter ribbon with CSF in the sulci, two
lateral ventricles, deep grey matter and white matter. A tumour sits in one hemisphere:
a necrotic (or non-enhancing) core, an enhancing rim around it and an irregular oedema around
both; some tumours have no necrosis or no enhancement, and in the brats2024 layout some cases
carry a resection cavity (label 4). Tissue intensities follow the usual MRI contrasts:

=================  =====  =====  =====  =====
tissue             FLAIR  T1     T1Gd   T2
=================  =====  =====  =====  =====
CSF                dark   dark   dark   bright
grey matter        mid    mid    mid    mid
white matter       lower  bright bright dark
oedema             bright low    low    bright
necrosis           mid    dark   dark   bright
enhancing rim      ~oedema ~oedema BRIGHT ~oedema
=================  =====  =====  =====  =====

so the enhancing tumour is visible almost only in T1Gd and the oedema mainly in FLAIR and T2.
Each modality gets partial-volume blur, texture, its own smooth multiplicative bias field and
Rician noise, and is stored as int16 with its own arbitrary gain, like scanner data. Labels use
the chosen layout's convention (brats2021: 1 NCR, 2 ED, 4 ET; brats2024: 1 NETC, 2 SNFH, 3 ET,
4 RC). A case depends only on (seed, case index), so any subset can be regenerated.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import sys
import uuid

import nibabel as nib
import numpy as np
from scipy import ndimage

from mstkd_jax.data import layouts
from mstkd_jax.logging_utils import Progress

# Mean intensity of each tissue in FLAIR, T1, T1Gd, T2 (relative units).
TISSUES = ('background', 'csf', 'gm', 'wm', 'edema', 'necrosis', 'enhancing', 'cavity')
CONTRAST = np.array([
    [0.00, 0.00, 0.00, 0.00],   # background
    [0.12, 0.25, 0.27, 1.00],   # CSF: FLAIR suppressed, T2 bright
    [0.62, 0.60, 0.62, 0.62],   # grey matter
    [0.46, 0.92, 0.93, 0.40],   # white matter: T1 bright, T2 dark
    [1.00, 0.50, 0.52, 0.88],   # oedema: FLAIR and T2 bright, T1 hypointense
    [0.45, 0.28, 0.30, 0.96],   # necrosis: T1/T1Gd dark, T2 bright
    [0.97, 0.51, 1.45, 0.86],   # enhancing rim: like oedema except in T1Gd
    [0.14, 0.22, 0.24, 1.00],   # resection cavity: fluid
], np.float32)
T_CSF, T_GM, T_WM, T_EDEMA, T_NECROSIS, T_ENH, T_CAVITY = range(1, 8)
# Canonical label code of each tissue (layouts: 1 core, 2 oedema, 3 enhancing, 4 cavity).
TISSUE_CODE = np.array([0, 0, 0, 0, 2, 1, 3, 4], np.uint8)
GAINS = (400.0, 700.0, 900.0, 1200.0)   # int16 scale per modality (FLAIR, T1, T1Gd, T2)


def case_id(index, layout):
  if layouts.get_layout(layout).name == 'brats2024':
    return f'BraTS-GLI-{index:05d}-000'
  return f'BraTS2021_{index:05d}'


def _upsample_matrix(n, c):
  """[n, c] weights interpolating c coarse samples (one cell of margin) onto n voxels."""
  pos = (np.arange(n) + 0.5) * (c - 2) / n + 0.5
  w = np.exp(-0.5 * ((pos[:, None] - np.arange(c)[None, :]) / 0.75) ** 2)
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_noise(shape, rng, cell):
  """Smooth random field with unit std and features about `cell` voxels wide.

  White noise on a coarse grid, interpolated separably with Gaussian weights (three small
  matrix products: far cheaper than spline zooming a large volume).
  """
  coarse = tuple(max(2, int(np.ceil(n / cell))) + 2 for n in shape)
  field = rng.standard_normal(coarse).astype(np.float32)
  mx, my, mz = (_upsample_matrix(n, c) for n, c in zip(shape, coarse))
  field = np.tensordot(mx, field, axes=(1, 0))           # (X, cy, cz)
  field = np.tensordot(field, my, axes=(1, 1))           # (X, cz, Y)
  field = np.tensordot(field, mz, axes=(1, 1))           # (X, Y, Z)
  field -= field.mean()
  return field / (field.std() + 1e-6)


def _random_rotation(rng):
  q, r = np.linalg.qr(rng.standard_normal((3, 3)))
  return q * np.sign(np.diag(r))


def generate_case(shape, layout, seed, index, spacing=1.0, return_tissue=False):
  """Returns (images float32 [4, X, Y, Z] in channel order, raw label uint8 [X,Y,Z]).

  With return_tissue, also the tissue map (indices into TISSUES) as a third element.
  """
  lay = layouts.get_layout(layout)
  rng = np.random.default_rng([seed, index])
  shape = tuple(int(s) for s in shape)
  # Coordinates normalised by the brain's semi-axes (about 60-72 % of the field of view).
  semi = np.array([0.30, 0.36, 0.40]) * np.array(shape) * rng.uniform(0.92, 1.05, 3)
  centre = (np.array(shape) - 1) / 2.0 + rng.uniform(-0.03, 0.03, 3) * np.array(shape)
  axes = [((np.arange(n) - c) / a).astype(np.float32) for n, c, a in zip(shape, centre, semi)]
  x, y, z = np.meshgrid(*axes, indexing='ij', sparse=True)
  r = np.sqrt(x * x + y * y + z * z)
  small = max(2.0, min(shape) / 24.0)
  surface = 1.0 + 0.05 * _smooth_noise(shape, rng, small * 4)
  brain = r < surface
  tissue = np.full(shape, T_WM, np.uint8)
  # Cortex: a folded grey-matter ribbon with CSF in the sulci.
  folds = _smooth_noise(shape, rng, small)
  depth = surface - r                      # 0 at the surface, growing inwards
  ribbon = depth < 0.10 + 0.05 * folds
  tissue[ribbon] = T_GM
  tissue[(depth < 0.035) | ((depth < 0.09) & (folds > 1.0))] = T_CSF
  # Lateral ventricles and deep grey matter, mirrored about the mid-line.
  for side in (-1.0, 1.0):
    vent = ((x - side * 0.11) / 0.07) ** 2 + ((y + 0.05 * (z + 0.2) ** 2) / 0.28) ** 2 + \
        ((z - 0.05) / 0.14) ** 2
    deep = ((x - side * 0.27) / 0.11) ** 2 + ((y - 0.05) / 0.16) ** 2 + ((z + 0.05) / 0.13) ** 2
    tissue[deep < 1] = T_GM
    tissue[vent < 1] = T_CSF
  # Tumour in one hemisphere, in tumour-local rotated and stretched coordinates.
  side = rng.choice([-1.0, 1.0])
  tc = np.array([side * rng.uniform(0.22, 0.45), rng.uniform(-0.35, 0.35),
                 rng.uniform(-0.25, 0.35)])
  rot = _random_rotation(rng) * rng.uniform(0.8, 1.25, 3)
  d = [(x - tc[0]), (y - tc[1]), (z - tc[2])]
  local = [rot[i, 0] * d[0] + rot[i, 1] * d[1] + rot[i, 2] * d[2] for i in range(3)]
  dist = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)
  bumpy = _smooth_noise(shape, rng, small * 2)
  r_core = rng.uniform(0.12, 0.25)
  r_rim = r_core + rng.uniform(0.04, 0.08)
  r_edema = r_rim + rng.uniform(0.05, 0.2)
  kind = rng.random()
  has_necrosis = kind > 0.1
  has_enhancement = kind < 0.9 or not has_necrosis
  core = dist < r_core * (1 + 0.25 * bumpy)
  rim = dist < r_rim * (1 + 0.25 * bumpy)
  edema = dist < r_edema * (1 + 0.45 * _smooth_noise(shape, rng, small * 3))
  edema &= brain & (tissue != T_CSF)
  tissue[edema] = T_EDEMA
  if has_enhancement:
    tissue[rim & brain] = T_ENH
    tissue[core & brain] = T_NECROSIS if has_necrosis else T_ENH
  else:
    tissue[rim & brain] = T_NECROSIS   # non-enhancing tumour core
  if lay.name == 'brats2024' and rng.random() < 0.3:
    cav_c = tc + rng.uniform(-1, 1, 3) * r_core
    cav = np.sqrt(sum(((v - c) / (r_core * 1.2)) ** 2 for v, c in zip((x, y, z), cav_c)))
    tissue[(cav < 1) & brain] = T_CAVITY
  tissue[~brain] = 0
  codes = TISSUE_CODE[tissue]
  # Intensities: tissue means + texture, partial-volume blur, bias field, Rician noise.
  images = np.empty((4,) + shape, np.float32)
  texture = 0.04 * _smooth_noise(shape, rng, small)
  sigma = 0.6 / np.asarray(spacing if np.ndim(spacing) else [spacing] * 3, float)
  for c in range(4):
    img = CONTRAST[tissue, c] * (1.0 + texture)
    img = ndimage.gaussian_filter(img, sigma, mode='constant')
    img *= np.exp(0.12 * _smooth_noise(shape, rng, max(shape) / 2.5))
    noise = 0.025
    img = np.sqrt((img + noise * rng.standard_normal(shape, np.float32)) ** 2 +
                  (noise * rng.standard_normal(shape, np.float32)) ** 2)
    img[~brain] = 0
    images[c] = img * GAINS[c] * rng.uniform(0.8, 1.25)
  labels = layouts.codes_to_labels(codes, lay.name)
  return (images, labels, tissue) if return_tissue else (images, labels)


def affine_for(shape, spacing=1.0):
  """A BraTS-like affine (voxel axes pointing to -x, -y, +z)."""
  s = float(spacing)
  aff = np.diag([-s, -s, s, 1.0])
  aff[1, 3] = (shape[1] - 1) * s
  return aff


def write_case(out, index, shape, layout, seed, spacing=1.0):
  """Writes one case folder atomically; returns its path."""
  lay = layouts.get_layout(layout)
  cid = case_id(index, lay.name)
  folder = os.path.join(out, cid)
  images, seg = generate_case(shape, lay.name, seed, index, spacing)
  aff = affine_for(shape, spacing)
  tmp = os.path.join(out, f'.tmp-{cid}-{uuid.uuid4().hex[:8]}')
  os.makedirs(tmp)
  try:
    for key, img in zip(lay.image_keys, images):
      vol = nib.Nifti1Image(np.clip(np.round(img), 0, 32767).astype(np.int16), aff)
      vol.set_qform(aff, code=1)
      vol.set_sform(aff, code=1)
      nib.save(vol, os.path.join(tmp, f'{cid}{lay.sep}{key}.nii.gz'))
    vol = nib.Nifti1Image(seg.astype(np.uint8), aff)
    vol.set_qform(aff, code=1)
    vol.set_sform(aff, code=1)
    nib.save(vol, os.path.join(tmp, f'{cid}{lay.sep}{lay.seg_key}.nii.gz'))
    if os.path.exists(folder):
      shutil.rmtree(folder)
    os.rename(tmp, folder)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return folder


def _write_case_job(args):
  return write_case(*args)


def generate_dataset(out, cases, shape=(240, 240, 155), layout='brats2021', seed=0,
                     spacing=1.0, workers=0, progress=False):
  """Writes `cases` case folders into `out`, idempotently.

  A file ``synthetic.json`` records the parameters; when it already matches, nothing is
  regenerated (cases missing from the folder are written again).
  """
  lay = layouts.get_layout(layout)
  params = {'cases': int(cases), 'shape': [int(s) for s in shape], 'layout': lay.name,
            'seed': int(seed), 'spacing': float(spacing)}
  os.makedirs(out, exist_ok=True)
  marker = os.path.join(out, 'synthetic.json')
  if os.path.exists(marker):
    with open(marker) as f:
      old = json.load(f)
    if old != params:
      raise ValueError(f'{out} already holds synthetic cases made with {old}; asked for '
                       f'{params}. Use another folder or delete it.')
  todo = [i for i in range(params['cases'])
          if not os.path.isdir(os.path.join(out, case_id(i, lay.name)))]
  jobs = [(out, i, tuple(params['shape']), lay.name, params['seed'], params['spacing'])
          for i in todo]
  # A bar on a terminal only: nothing in a log file.
  bar = Progress(len(jobs), 'synthetic cases', unit='case', enabled=progress, log_lines=False)
  try:
    if workers and workers > 0 and len(jobs) > 1:
      ctx = multiprocessing.get_context('spawn')
      with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as ex:
        for _ in ex.map(_write_case_job, jobs):
          bar.update()
    else:
      for job in jobs:
        _write_case_job(job)
        bar.update()
  finally:
    bar.close()
  tmp = f'{marker}.tmp-{uuid.uuid4().hex[:8]}'
  with open(tmp, 'w') as f:
    json.dump(params, f, indent=1)
  os.replace(tmp, marker)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(
      prog='python -m mstkd_jax.data.synthetic',
      description='Write synthetic BraTS-like cases as NIfTI case folders.')
  p.add_argument('--out', required=True, help='output folder (created)')
  p.add_argument('--cases', type=int, required=True, help='number of cases')
  p.add_argument('--shape', type=int, nargs=3, default=(240, 240, 155), metavar=('X', 'Y', 'Z'))
  p.add_argument('--layout', default='brats2021', help='brats2021 (also FeTS) or brats2024')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--spacing', type=float, default=1.0, help='voxel size in mm')
  p.add_argument('--workers', type=int, default=0, help='parallel processes (0: none)')
  args = p.parse_args(argv)
  generate_dataset(args.out, args.cases, tuple(args.shape), args.layout, args.seed,
                   args.spacing, args.workers, progress=True)
  print(f'{args.cases} {layouts.get_layout(args.layout).name} cases of shape '
        f'{tuple(args.shape)} in {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
