"""Training augmentation (docs/method.md, "Optimisation and data"), split in two for speed and determinism.

``draw`` picks every random number of one sample from a ``np.random.Generator`` (grain seeds it
from the pipeline seed and the sample's global index, so the choice does not depend on worker
count or timing): crop offset inside the cached box, flips of the three axes (p 0.5 each),
optionally a small rotation, and a per-modality intensity scale and shift.

``assemble`` then reads the crop straight from the memory-mapped cache into the output batch
slot (flips are negative strides of the same read), applies the intensity change in place, and
writes the one-hot label with one table look-up (uint8 in training batches: a quarter of the
bytes of float32 to write, move between processes and copy to the accelerator). A rotation, when drawn, resamples the crop
from the surrounding box (trilinear images, nearest-neighbour labels) so its corners hold real
voxels where the box has them; it is much slower than the rest, hence ``rotation_prob``.
"""

import dataclasses
import math

import numpy as np
from scipy import ndimage

from mstkd_jax.data import layouts


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
  input_shape: tuple
  flips: bool = True
  rotation_degrees: float = 0.0
  rotation_prob: float = 0.0
  intensity_scale: float = 0.0
  intensity_shift: float = 0.0

  @classmethod
  def from_config(cls, config):
    d = config.data
    return cls(input_shape=tuple(int(s) for s in d.input_shape), flips=bool(d.flips),
               rotation_degrees=float(d.rotation_degrees), rotation_prob=float(d.rotation_prob),
               intensity_scale=float(d.intensity_scale),
               intensity_shift=float(d.intensity_shift))


def draw(box_size, opts, rng):
  """All random choices of one training sample, as a small dict of plain numbers."""
  t = opts.input_shape
  offset = [int(rng.integers(0, max(b - s, 0) + 1)) if b > s else (b - s) // 2
            for b, s in zip(box_size, t)]
  flips = [bool(v) for v in rng.random(3) < 0.5] if opts.flips else [False] * 3
  angles = None
  if opts.rotation_prob > 0 and opts.rotation_degrees > 0:
    if rng.random() < opts.rotation_prob:
      angles = [float(a) for a in rng.uniform(-opts.rotation_degrees, opts.rotation_degrees, 3)]
  scale = (rng.uniform(1 - opts.intensity_scale, 1 + opts.intensity_scale, 4)
           if opts.intensity_scale > 0 else np.ones(4))
  shift = (rng.uniform(-opts.intensity_shift, opts.intensity_shift, 4)
           if opts.intensity_shift > 0 else np.zeros(4))
  return {'offset': offset, 'flips': flips, 'angles': angles,
          'scale': [float(v) for v in scale], 'shift': [float(v) for v in shift]}


def rotation_matrix(angles_deg):
  """Rotation about the three voxel axes (x, then y, then z), angles in degrees."""
  ax, ay, az = (math.radians(a) for a in angles_deg)
  rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
  ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
  rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


def _flip_view(arr, flips):
  return arr[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]


def _crop(vol, offset, size):
  """vol[offset:offset+size] (first 3 axes), a view when inside, else a zero-padded copy."""
  if all(o >= 0 and o + s <= n for o, s, n in zip(offset, size, vol.shape)):
    return vol[tuple(slice(o, o + s) for o, s in zip(offset, size))]
  out = np.zeros(tuple(size) + vol.shape[3:], vol.dtype)
  src, dst = [], []
  for o, s, n in zip(offset, size, vol.shape):
    lo, hi = max(o, 0), min(o + s, n)
    src.append(slice(lo, hi))
    dst.append(slice(lo - o, hi - o))
  out[tuple(dst)] = vol[tuple(src)]
  return out


def _rotated_crop(image, codes, offset, size, angles):
  """Crop of `size` at `offset` rotated about its centre, sampled from the whole box."""
  rot = rotation_matrix(angles)
  centre_out = (np.asarray(size) - 1) / 2.0
  centre_in = np.asarray(offset) + centre_out
  # input = rot @ (out - centre_out) + centre_in
  shift = centre_in - rot @ centre_out
  # Only read the part of the box that the rotated crop can touch.
  corners = np.array([[x, y, z] for x in (0, size[0] - 1) for y in (0, size[1] - 1)
                      for z in (0, size[2] - 1)], np.float64)
  touched = corners @ rot.T + shift
  lo = np.maximum(np.floor(touched.min(0)).astype(int) - 1, 0)
  hi = np.minimum(np.ceil(touched.max(0)).astype(int) + 2, image.shape[:3])
  sub = tuple(slice(a, b) for a, b in zip(lo, hi))
  img = np.asarray(image[sub])
  lab = np.asarray(codes[sub])
  shift = shift - lo
  out_img = np.empty(tuple(size) + (image.shape[3],), np.float32)
  for c in range(image.shape[3]):
    ndimage.affine_transform(img[..., c], rot, offset=shift, output_shape=tuple(size),
                             output=out_img[..., c], order=1, mode='constant', cval=0.0)
  out_lab = ndimage.affine_transform(lab, rot, offset=shift, output_shape=tuple(size), order=0,
                                     mode='constant', cval=0)
  return out_img, out_lab


def _as_voxels(arr):
  """[..., 4] float32 -> [...] 16-byte elements (a view): a voxel's 4 channels move as one."""
  return arr.view(np.complex128)[..., 0]


# One-hot rows of the label codes, each viewed as one element of its voxel's size, so that one
# np.take writes a voxel's 4 channels: float32 (16 bytes) or uint8 (4 bytes) labels.
_ONEHOT_VOXELS = {
    np.dtype(np.float32): layouts.CODE_TO_ONEHOT.view(np.complex128)[:, 0],
    np.dtype(np.uint8): layouts.CODE_TO_ONEHOT.astype(np.uint8).view(np.uint32)[:, 0],
}


def _label_voxels(out_label):
  """(table, view): the one-hot table and the [..., 4] label as one element per voxel."""
  table = _ONEHOT_VOXELS.get(out_label.dtype)
  if table is None:
    raise ValueError(f'labels must be float32 or uint8, not {out_label.dtype}')
  return table, out_label.view(table.dtype)[..., 0]


def assemble(image, codes, params, opts, out_image, out_label, chunk=8):
  """Writes one augmented sample into out_image [H,W,D,4] float32 and out_label [H,W,D,4] (one-hot,
  float32 or uint8).

  image/codes: the cached box (memory-mapped arrays are fine; they are only read). The work is
  done in slabs of `chunk` rows along the first axis so that each slab is copied, scaled and
  shifted while it is in the CPU cache (about 3x faster than whole-volume passes).
  """
  size = tuple(opts.input_shape)
  if params['angles'] is not None:
    img, lab = _rotated_crop(image, codes, params['offset'], size, params['angles'])
  else:
    img = _crop(image, params['offset'], size)
    lab = _crop(codes, params['offset'], size)
  img = _flip_view(_as_voxels(img), params['flips'])
  lab = _flip_view(lab, params['flips'])
  out_voxels = _as_voxels(out_image)
  onehot_table, out_onehot = _label_voxels(out_label)
  depth = size[2]
  scale = np.tile(np.asarray(params['scale'], np.float32), depth)
  shift = np.tile(np.asarray(params['shift'], np.float32), depth)
  do_scale, do_shift = bool(np.any(scale != 1)), bool(np.any(shift != 0))
  for i in range(0, size[0], chunk):
    rows = slice(i, min(i + chunk, size[0]))
    np.copyto(out_voxels[rows], img[rows])
    # Rows of D*4 values, so the per-channel factors broadcast along a long inner loop.
    slab = out_image[rows].reshape(-1, depth * 4)
    if do_scale:
      np.multiply(slab, scale, out=slab)
    if do_shift:
      # Background (0) stays 0, as does an absent modality.
      np.add(slab, shift, out=slab, where=slab != 0)
    np.take(onehot_table, np.ascontiguousarray(lab[rows]), out=out_onehot[rows])
