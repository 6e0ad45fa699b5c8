"""Reading and checking NIfTI cases, preprocessing into model space, and undoing it.

One case goes through these steps (all in the volume's own voxel axes, never reoriented):

1. read the four modalities and the label with nibabel and check them (readable NIfTI, 3D,
   finite, not constant, same shape and affine, label values in the layout's convention);
2. scale each modality on the whole volume: ``minmax`` (x - min) / (max - min) (authors), or
   ``zscore``: (x - mean) / std over the voxels > 0, the others set to 0;
3. optionally resample to an isotropic voxel size ``spacing`` (mm): images trilinear, labels by
   nearest neighbour, on a grid whose outer voxel edges coincide with the original ones;
4. take a *box* around the brain (voxels != 0 in any modality): per axis the brain's extent
   when it is at least the model's input size, otherwise a window of the input size centred on
   the brain (shifted to stay inside the volume; zero padding only where the volume itself is
   smaller). The box is given by ``box_start`` (may be negative where padded) and ``box_size``
   in voxels of the resampled grid; voxels of the box outside the volume are 0.

Everything needed to undo it is in a JSON-able metadata dict (``meta``): the original shape,
affine and NIfTI header (``header_from_meta``), the resampled grid, the box. ``restore_geometry``
maps any array in the box (a prediction) back onto the original voxel grid; ``write_nifti``
saves it with the original affine and header. Outside the box the restored volume is 0.
"""

import base64
import dataclasses
import hashlib
import json
import os
from typing import Optional

from absl import logging
import nibabel as nib
import numpy as np
from scipy import ndimage

from mstkd_jax.data import layouts
from mstkd_jax.data.layouts import BadCaseError, Problem
from mstkd_jax.modalities import channel_index

# Bumped whenever preprocessing changes what it writes (invalidates every cache).
PREPROCESS_VERSION = 1
AFFINE_ATOL = 1e-3   # mm; BraTS files of one case agree to float32 rounding


@dataclasses.dataclass(frozen=True)
class Settings:
  """What changes the preprocessed arrays (and so the cache fingerprint)."""
  input_shape: tuple = (160, 192, 128)
  normalization: str = 'minmax'
  spacing: Optional[float] = None

  def __post_init__(self):
    if self.normalization not in ('minmax', 'zscore'):
      raise ValueError(f"data.normalization must be 'minmax' or 'zscore', "
                       f'got {self.normalization!r}')
    if self.spacing is not None and not self.spacing > 0:
      raise ValueError(f'data.spacing must be positive or None, got {self.spacing!r}')
    object.__setattr__(self, 'input_shape', tuple(int(s) for s in self.input_shape))
    if len(self.input_shape) != 3 or min(self.input_shape) < 1:
      raise ValueError(f'data.input_shape must be 3 positive ints, got {self.input_shape}')

  @classmethod
  def from_config(cls, config):
    d = config.data
    return cls(input_shape=tuple(d.input_shape), normalization=d.normalization,
               spacing=None if d.spacing is None else float(d.spacing))

  def as_dict(self):
    return {'version': PREPROCESS_VERSION, 'input_shape': list(self.input_shape),
            'normalization': self.normalization, 'spacing': self.spacing}

  def fingerprint(self, extra=None):
    blob = json.dumps({**self.as_dict(), 'extra': extra}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Reading and checking


@dataclasses.dataclass
class RawCase:
  """A case as read from disk, checked, in its original geometry."""
  case_id: str
  layout: str
  image: np.ndarray            # float32 [X, Y, Z, 4], absent modalities 0
  present: tuple               # 4 bools
  codes: Optional[np.ndarray]  # uint8 canonical label codes [X, Y, Z], or None
  affine: np.ndarray           # 4x4
  header: object               # nibabel header of the reference file
  reference_file: str


# The largest volume read (voxels): 1024^3, 4 GiB as float32. A BraTS volume has 9 M; a header
# claiming more is damaged or not an MRI volume, and reading it would exhaust the memory.
MAX_VOXELS = 1024 ** 3


def _read_nifti(path, case_id, problems):
  """Returns (data array, image) or (None, None) after adding a problem."""
  name = os.path.basename(path)
  try:
    img = nib.load(path)
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
      problems.append(Problem(case_id, name, f'not a NIfTI image ({type(img).__name__})'))
      return None, None
    voxels = int(np.prod(img.shape, dtype=np.int64))
    if voxels > MAX_VOXELS:
      problems.append(Problem(case_id, name, f'its header claims {"x".join(map(str, img.shape))}'
                              f' = {voxels:,} voxels, more than the {MAX_VOXELS:,} accepted: a '
                              'damaged header or not an MRI volume'))
      return None, None
    data = np.asanyarray(img.dataobj)
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).strip().splitlines()[0] if str(e).strip() else ''
    problems.append(Problem(case_id, name, f'unreadable or truncated NIfTI file '
                            f'({type(e).__name__}: {reason})'))
    return None, None
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    problems.append(Problem(case_id, name, f'expected a 3D volume, got shape {data.shape}'))
    return None, None
  return data, img


# An MRI scan has hundreds to thousands of distinct intensities; a label map or mask a handful.
LABEL_LIKE_MAX_VALUES = 16
# Fewer distinct intensities than this in a scan is suspicious (a warning, not an error).
FEW_VALUES_WARNING = 64


def _distinct_values(data, at_most):
  """The distinct values of ``data`` when there are at most ``at_most`` of them, else None
  (decided on a subsample first, so a real scan costs a fraction of a full np.unique)."""
  flat = data.reshape(-1)
  if len(np.unique(flat[::97])) > at_most:
    return None
  values = np.unique(flat)
  return values if len(values) <= at_most else None


def _check_image(data, case_id, name, problems):
  """Adds problems for non-finite, constant or label-like volumes (a segmentation or mask
  given as a scan: at most 16 distinct integer values); logs a warning for scans with few
  distinct intensities. Returns True when usable."""
  ok = True
  if np.issubdtype(data.dtype, np.floating):
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
      problems.append(Problem(case_id, name, f'{bad} NaN or Inf voxels'))
      ok = False
  if ok:
    lo, hi = data.min(), data.max()
    if lo == hi:
      problems.append(Problem(case_id, name, f'constant volume (every voxel = {float(lo):g}); '
                              'an image needs min < max'))
      ok = False
  if ok:
    values = _distinct_values(data, FEW_VALUES_WARNING - 1)
    if values is not None and len(values) <= LABEL_LIKE_MAX_VALUES and np.array_equal(
        values, np.round(values)):
      shown = ', '.join(f'{float(v):g}' for v in values)
      problems.append(Problem(case_id, name, f'looks like a label map or mask, not an MRI '
                              f'scan: only the integer values {shown} (a segmentation given as '
                              'an image?)'))
      ok = False
    elif values is not None:
      logging.warning('%s: %s: only %d distinct intensities; an MRI scan usually has hundreds '
                      '(is this the right file?)', case_id, name, len(values))
  return ok


def read_case(case, *, require_label=True, allow_missing_images=False):
  """Reads and checks a `layouts.Case`; raises BadCaseError listing every problem found.

  With allow_missing_images (prediction), absent modality files are zero channels and a
  constant modality is a problem only if no other modality is usable.
  """
  problems = []
  for p in case.problems:
    if allow_missing_images and p.message.startswith('missing modality'):
      continue
    if not require_label and p.message.startswith('missing label'):
      continue
    problems.append(p)
  lay = layouts.get_layout(case.layout)
  ref = None  # (shape, affine, file name, header, path)
  channels = [None] * 4

  def agree(data, img, name):
    nonlocal ref
    if ref is None:
      ref = (data.shape, img.affine, name, img.header, img.get_filename())
      return True
    if data.shape != ref[0]:
      problems.append(Problem(case.case_id, name,
                              f'shape {data.shape} differs from {ref[2]} {ref[0]}'))
      return False
    if not np.allclose(img.affine, ref[1], atol=AFFINE_ATOL, rtol=0):
      diff = float(np.abs(img.affine - ref[1]).max())
      problems.append(Problem(case.case_id, name,
                              f'affine differs from {ref[2]} (max difference {diff:.3g} mm)'))
      return False
    return True

  for c, path in enumerate(case.images):
    if path is None:
      continue
    name = os.path.basename(path)
    data, img = _read_nifti(path, case.case_id, problems)
    if data is None:
      continue
    found = []
    usable = _check_image(data, case.case_id, name, found)
    if allow_missing_images and found and found[0].message.startswith('constant'):
      logging.warning('%s; treated as a missing modality', found[0])
      found, usable = [], False
    problems.extend(found)
    if agree(data, img, name) and usable:
      channels[c] = data
  codes = None
  if case.seg is not None:
    name = os.path.basename(case.seg)
    seg, img = _read_nifti(case.seg, case.case_id, problems)
    if seg is not None and agree(seg, img, name):
      values = np.unique(seg)
      if np.issubdtype(values.dtype, np.floating):
        nonint = values[~np.isfinite(values) | (values != np.round(values))]
        if nonint.size:
          problems.append(Problem(case.case_id, name,
                                  f'non-integer label values {nonint[:8].tolist()}'))
          values = values[np.isfinite(values) & (values == np.round(values))]
      label_problems = layouts.check_labels([v.item() for v in values], lay.name,
                                            case.case_id, name)
      problems.extend(label_problems)
      if not label_problems:
        codes = layouts.labels_to_codes(seg, lay.name)
  if all(ch is None for ch in channels) and not problems:
    problems.append(Problem(case.case_id, '-', 'no usable modality'))
  if problems:
    raise BadCaseError(problems)
  shape = ref[0]
  image = np.zeros(shape + (4,), np.float32)
  for c, ch in enumerate(channels):
    if ch is not None:
      image[..., c] = ch
  return RawCase(case_id=case.case_id, layout=lay.name, image=image,
                 present=tuple(ch is not None for ch in channels), codes=codes,
                 affine=np.asarray(ref[1], np.float64), header=ref[3], reference_file=ref[4])


# ----------------------------------------------------------------------------------------------
# Scaling


def normalize_channel(x, method):
  """Scales one modality (float32 array); a constant volume gives zeros, never a division by 0.

  Returns (scaled array, stats dict).
  """
  x = np.asarray(x, np.float32)
  if method == 'minmax':
    lo, hi = float(x.min()), float(x.max())
    if hi > lo:
      out = (x - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    else:
      out = np.zeros_like(x)
    return out, {'min': lo, 'max': hi}
  if method == 'zscore':
    brain = x > 0
    n = int(np.count_nonzero(brain))
    vals = x[brain].astype(np.float64) if n else np.zeros(1)
    mean, std = float(vals.mean()), float(vals.std())
    out = np.zeros_like(x)
    if n and std > 0:
      out[brain] = (x[brain] - np.float32(mean)) * np.float32(1.0 / std)
    return out, {'mean': mean, 'std': std}
  raise ValueError(f'unknown normalization {method!r}')


# ----------------------------------------------------------------------------------------------
# Geometry


def voxel_sizes(affine):
  return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def resample_grid(shape, affine, spacing):
  """(new shape, new affine, factors) of the grid at `spacing` mm (None: unchanged).

  factors[i] = original voxels per new voxel along axis i. New voxel j covers original voxel
  coordinates f*j + (f-1)/2 +- f/2, so the outer edges of both grids coincide when n/f is whole.
  """
  shape = tuple(int(s) for s in shape)
  if spacing is None:
    return shape, np.asarray(affine, np.float64), np.ones(3)
  zooms = voxel_sizes(affine)
  factors = float(spacing) / zooms
  new_shape = tuple(max(1, int(round(n / f))) for n, f in zip(shape, factors))
  step = np.eye(4)
  step[:3, :3] = np.diag(factors)
  step[:3, 3] = (factors - 1) / 2
  return new_shape, np.asarray(affine, np.float64) @ step, factors


def _resample(vol, factors, offset, out_shape, order):
  """Resamples a 3D or 4D (channels last) array: out[j] = vol[factors * j + offset]."""
  if vol.ndim == 4:
    return np.stack([_resample(vol[..., c], factors, offset, out_shape, order)
                     for c in range(vol.shape[-1])], axis=-1)
  if order == 0:
    # Nearest neighbour by index arithmetic: exact and fast for labels.
    idx = [np.clip(np.floor(f * np.arange(n) + o + 0.5).astype(np.int64), 0, s - 1)
           for f, o, n, s in zip(factors, offset, out_shape, vol.shape)]
    return vol[np.ix_(*idx)]
  return ndimage.affine_transform(vol, np.asarray(factors, np.float64),
                                  offset=np.asarray(offset, np.float64),
                                  output_shape=tuple(out_shape), order=order, mode='nearest')


def to_resampled(vol, meta, order):
  """Original grid -> resampled grid (identity without resampling)."""
  factors = np.asarray(meta['factors'])
  if np.all(factors == 1):
    return vol
  return _resample(vol, factors, (factors - 1) / 2, meta['resampled_shape'], order)


def from_resampled(vol, meta, order):
  """Resampled grid -> original grid (identity without resampling)."""
  factors = np.asarray(meta['factors'])
  if np.all(factors == 1):
    return vol
  inv = 1.0 / factors
  return _resample(vol, inv, (inv - 1) / 2, meta['original_shape'], order)


def brain_box(mask, input_shape):
  """(box_start, box_size, brain bbox) around the nonzero voxels of `mask` (see module doc)."""
  shape = mask.shape
  starts, sizes, bbox = [], [], []
  for axis, (n, t) in enumerate(zip(shape, input_shape)):
    other = tuple(a for a in range(3) if a != axis)
    hit = np.flatnonzero(mask.any(axis=other))
    lo, hi = (int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, n)
    bbox.append((lo, hi))
    if hi - lo >= t:
      starts.append(lo)
      sizes.append(hi - lo)
    elif n >= t:
      start = (lo + hi) // 2 - t // 2
      starts.append(int(min(max(start, 0), n - t)))
      sizes.append(t)
    else:
      starts.append(-((t - n) // 2))
      sizes.append(t)
  return tuple(starts), tuple(sizes), tuple(bbox)


def extract_box(vol, start, size, fill=0):
  """vol[start:start+size] on the first 3 axes, with `fill` outside the volume."""
  out = np.full(tuple(size) + vol.shape[3:], fill, vol.dtype)
  src, dst = [], []
  for s, z, n in zip(start, size, vol.shape[:3]):
    lo, hi = max(s, 0), min(s + z, n)
    if hi <= lo:
      return out
    src.append(slice(lo, hi))
    dst.append(slice(lo - s, hi - s))
  out[tuple(dst)] = vol[tuple(src)]
  return out


def paste_box(box, start, shape, fill=0):
  """Inverse of extract_box: a volume of `shape` (3D) holding `box` at `start`, `fill` elsewhere."""
  out = np.full(tuple(shape) + box.shape[3:], fill, box.dtype)
  src, dst = [], []
  for s, z, n in zip(start, box.shape[:3], shape):
    lo, hi = max(s, 0), min(s + z, n)
    if hi <= lo:
      return out
    dst.append(slice(lo, hi))
    src.append(slice(lo - s, hi - s))
  out[tuple(dst)] = box[tuple(src)]
  return out


def centre_window(meta, size):
  """Meta of the centred `size` window of meta's box (a box already of `size` is kept)."""
  start, box = np.asarray(meta['box_start']), np.asarray(meta['box_size'])
  size = np.asarray(size)
  offset = (box - size) // 2
  new = dict(meta)
  new['box_start'] = [int(v) for v in start + offset]
  new['box_size'] = [int(v) for v in size]
  return new, tuple(int(v) for v in offset)


def crop_or_pad(vol, offset, size):
  """vol[offset:offset+size] on the first 3 axes, zero where outside (offset may be < 0)."""
  return extract_box(vol, offset, size)


# ----------------------------------------------------------------------------------------------
# Preprocessing and its inverse


def _header_to_meta(header):
  return {'header_class': type(header).__name__,
          'header': base64.b64encode(header.binaryblock).decode('ascii')}


def header_from_meta(meta):
  """The original NIfTI header (nibabel Nifti1Header / Nifti2Header)."""
  cls = nib.Nifti2Header if meta['header_class'].startswith('Nifti2') else nib.Nifti1Header
  block = base64.b64decode(meta['header'])
  return cls(binaryblock=block, check=False)


def preprocess(raw, settings):
  """RawCase -> (image [bx,by,bz,4] float32, codes [bx,by,bz] uint8 or None, meta dict)."""
  shape = raw.image.shape[:3]
  brain = np.zeros(shape, bool)
  image = np.zeros(raw.image.shape, np.float32)
  stats = []
  for c in range(4):
    if raw.present[c]:
      brain |= raw.image[..., c] != 0
      image[..., c], st = normalize_channel(raw.image[..., c], settings.normalization)
    else:
      st = None
    stats.append(st)
  new_shape, new_affine, factors = resample_grid(shape, raw.affine, settings.spacing)
  meta = {
      'case_id': raw.case_id,
      'layout': raw.layout,
      'present': list(raw.present),
      'original_shape': list(shape),
      'original_affine': np.asarray(raw.affine).tolist(),
      'original_spacing': voxel_sizes(raw.affine).tolist(),
      **_header_to_meta(raw.header),
      'reference_file': raw.reference_file,
      'factors': factors.tolist(),
      'resampled_shape': list(new_shape),
      'resampled_affine': new_affine.tolist(),
      'spacing': voxel_sizes(new_affine).tolist(),
      'normalization': settings.normalization,
      'stats': stats,
  }
  image = to_resampled(image, meta, order=1)
  brain = to_resampled(brain, meta, order=0)
  codes = None if raw.codes is None else to_resampled(raw.codes, meta, order=0)
  start, size, bbox = brain_box(brain, settings.input_shape)
  meta.update(box_start=list(start), box_size=list(size), brain_bbox=[list(b) for b in bbox])
  image = extract_box(image, start, size)
  if codes is not None:
    codes = extract_box(codes, start, size)
  return image, codes, meta


def restore_geometry(volume, meta, order=None):
  """Model-space `volume` [bx,by,bz] or [bx,by,bz,C] (the box of `meta`) -> original grid.

  order: 0 nearest neighbour (default for integer and boolean arrays: labels), 1 trilinear
  (default for floats: probabilities). Outside the box the result is 0. The result has
  meta['original_shape'] (+ channels) and lives on meta['original_affine'].
  """
  volume = np.asarray(volume)
  if tuple(volume.shape[:3]) != tuple(meta['box_size']):
    raise ValueError(f'volume shape {volume.shape[:3]} does not match the box '
                     f'{tuple(meta["box_size"])} of {meta.get("case_id")}')
  if order is None:
    order = 1 if np.issubdtype(volume.dtype, np.floating) else 0
  full = paste_box(volume, meta['box_start'], meta['resampled_shape'])
  return from_resampled(full, meta, order)


def to_model_space(volume, meta, order=None):
  """Original-grid `volume` -> the box of `meta` (what preprocess does to labels/images)."""
  volume = np.asarray(volume)
  if order is None:
    order = 1 if np.issubdtype(volume.dtype, np.floating) else 0
  return extract_box(to_resampled(volume, meta, order), meta['box_start'], meta['box_size'])


def write_nifti(volume, meta, path, dtype=None):
  """Writes an original-geometry volume with the original affine and header."""
  volume = np.asarray(volume)
  if dtype is not None:
    volume = volume.astype(dtype)
  header = header_from_meta(meta).copy()
  header.set_data_dtype(volume.dtype)
  cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
  img = cls(volume, np.asarray(meta['original_affine']), header=header)
  img.set_qform(np.asarray(meta['original_affine']))
  img.set_sform(np.asarray(meta['original_affine']))
  img.header['scl_slope'] = np.nan
  img.header['scl_inter'] = np.nan
  _atomic_nifti_save(img, path)


def _atomic_nifti_save(img, path):
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f'.tmp-{os.getpid()}-{os.path.basename(path)}')
  try:
    nib.save(img, tmp)
    os.replace(tmp, path)
  except OSError as e:
    if e.filename == tmp:        # name the file the caller asked for
      e.filename = path
    raise
  finally:
    if os.path.exists(tmp):      # a failed write (a full disk) leaves nothing behind
      os.remove(tmp)


def preprocess_files(paths, settings, case_id='patient', layout='brats2021'):
  """A new patient's files -> (image [bx,by,bz,4], meta); see pipeline.preprocess_patient."""
  images = [None] * 4
  for name, path in paths.items():
    if path is None:
      continue
    c = channel_index(name)
    if images[c] is not None:
      raise ValueError(f'two files given for channel {c} ({images[c]}, {path})')
    images[c] = os.fspath(path)
  if all(p is None for p in images):
    raise ValueError('no modality file given; need at least one of FLAIR, T1, T1Gd, T2')
  problems = [Problem(case_id, os.path.basename(p), 'file not found')
              for p in images if p is not None and not os.path.isfile(p)]
  if problems:
    raise BadCaseError(problems)
  case = layouts.Case(case_id=case_id, folder=os.path.dirname(next(p for p in images if p)),
                      layout=layout, images=tuple(images), seg=None)
  raw = read_case(case, require_label=False, allow_missing_images=True)
  image, _, meta = preprocess(raw, settings)
  return image, meta


def case_sources(case):
  """(path, size, mtime_ns) of every file of a case: a changed file invalidates its cache."""
  out = []
  for p in case.files:
    st = os.stat(p)
    out.append([os.path.abspath(p), int(st.st_size), int(st.st_mtime_ns)])
  return out

