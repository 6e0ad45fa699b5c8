"""Scoring a case's network outputs fast, with the numbers of ``metrics``.

The 15-subset evaluation scores 15 or 16 outputs per case. ``metrics.case_metrics`` scores one
output on the host from its float probabilities; this module gives the same Dice and HD95
(tests/test_scoring.py compares them value for value) with each piece of work where it is
cheapest:

* on the device, one compiled program per batch of outputs (``summarize``): thresholds, the
  WT / TC / ET masks, the voxel counts of Dice (|P| and |P & T|), the surface of every mask (the
  mask minus its 6-connected erosion, as in ``metrics``) packed as bits into one uint8 volume,
  and the extent of every mask along each axis (its bounding box). Only these come back to the
  host: 1 byte per voxel instead of the 16 of four float32 probabilities. ``dice_counts`` is the
  Dice part alone (validation during training).
* on the host, HD95's exact distance transforms (scipy's feature transform, which releases the
  GIL, so ``case_metrics`` runs them in threads when given a pool):

  - reference -> output surface: per region, one feature transform of the reference's surface
    over the joint box of the reference and every output of the case, read at each output's
    surface voxels (``metrics`` computes one per output);
  - output -> reference surface: the feature transform of the output's surface over the
    reference's box grown by ``MARGIN`` voxels. Exact when every reference surface voxel lies
    closer to an output surface voxel than anything outside that box can be; otherwise it is
    computed again over the joint box of the two masks (what ``metrics`` does);
  - distances are computed at the surface voxels only, with scipy's own formula, so every
    value is the one ``scipy.ndimage.distance_transform_edt`` gives.

Both directions see the same surface voxels and the same nearest neighbours as
``metrics.surface_distances`` (its crop argument holds for any box that contains the two
surfaces), and the 95th percentile of the same values is the same number.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from mstkd_jax import metrics

REGIONS = metrics.REGIONS
# Voxels added around the reference's box for the output -> reference distances, and the
# largest share of the joint box such a box may have to be worth trying.
MARGIN = 8
NEAR_FRACTION = 0.5


# ----------------------------------------------------------------------------------------------
# Masks, counts, surfaces: the same code on the device (jnp) and on the host (np)


def region_masks(probs, xp=np, threshold=0.5):
  """[..., C] probabilities or one-hot labels -> [..., 3] WT / TC / ET masks (channels as in
  ``metrics.region_masks``: on where a channel exceeds ``threshold``)."""
  netc, snfh, et = (probs[..., c] > threshold for c in range(3))
  return xp.stack([netc | snfh | et, netc | et, et], axis=-1)


def _eroded(masks, xp):
  """6-connected erosion of [N, X, Y, Z, R] masks over the axes 1-3, the outside counting as
  background (``scipy.ndimage.binary_erosion`` with ``border_value=0``)."""
  padded = xp.pad(masks, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  out = masks
  for axis in (1, 2, 3):
    for start in (0, 2):   # the neighbour before and after along this axis
      index = [slice(None), slice(1, -1), slice(1, -1), slice(1, -1)]
      index[axis] = slice(start, start + masks.shape[axis])
      out = out & padded[tuple(index)]
  return out


def summarize(probs, truth, xp=np):
  """What the host needs of [N, X, Y, Z, C] outputs scored against ``truth`` [X, Y, Z, 3]
  region masks: {'count' [N, 3] |P|, 'overlap' [N, 3] |P & T| (int32), 'bits' [N, X, Y, Z]
  uint8 (bit r: the surface of region r), 'extent' (3 arrays [N, n_axis, 3]: where a mask
  has voxels along that axis)}."""
  masks = region_masks(probs, xp)
  surface = masks & ~_eroded(masks, xp)
  bits = surface[..., 0].astype(xp.uint8)
  for r in (1, 2):
    bits = bits | (surface[..., r].astype(xp.uint8) << r)
  spatial = (1, 2, 3)
  return {'count': xp.sum(masks, axis=spatial, dtype=xp.int32),
          'overlap': xp.sum(masks & truth[None], axis=spatial, dtype=xp.int32),
          'bits': bits,
          'extent': tuple(xp.any(masks, axis=tuple(a for a in spatial if a != axis))
                          for axis in spatial)}


@jax.jit
def summarize_on_device(probs, truth):
  """``summarize`` compiled: probabilities and masks on the device, the summary left there."""
  return summarize(probs, truth, jnp)


@jax.jit
def dice_counts(probs, truth):
  """{'count', 'overlap'} of ``summarize`` alone, on the device (validation's Dice)."""
  masks = region_masks(probs, jnp)
  return {'count': jnp.sum(masks, axis=(1, 2, 3), dtype=jnp.int32),
          'overlap': jnp.sum(masks & truth[None], axis=(1, 2, 3), dtype=jnp.int32)}


@dataclasses.dataclass
class Summary:
  """``summarize``'s arrays on the host for N masks (outputs, or the reference with N = 1)."""
  count: np.ndarray
  overlap: np.ndarray
  bits: np.ndarray
  extent: tuple

  @classmethod
  def join(cls, parts):
    """One Summary from (``summarize`` dict, rows) pairs: the first ``rows`` rows of each
    (the rest: padding of a last batch); device arrays are fetched."""
    parts = [(jax.device_get(p), rows) for p, rows in parts]
    cat = lambda get: np.concatenate([np.asarray(get(p))[:rows] for p, rows in parts])
    return cls(cat(lambda p: p['count']), cat(lambda p: p['overlap']),
               cat(lambda p: p['bits']),
               tuple(cat(lambda p, a=a: p['extent'][a]) for a in range(3)))

  def surface(self, index, region):
    """Bool [X, Y, Z]: the surface of ``region`` (0-2) of mask ``index``."""
    return (self.bits[index] & np.uint8(1 << region)) != 0

  def box(self, index, region):
    """Per axis (first, last) voxel of the mask, or None when it is empty."""
    out = []
    for extent in self.extent:
      hits = np.flatnonzero(extent[index, :, region])
      if not hits.size:
        return None
      out.append((int(hits[0]), int(hits[-1])))
    return out


def reference(label):
  """(truth region masks [X, Y, Z, 3], its Summary) of a case's one-hot label [X, Y, Z, C]."""
  label = np.asarray(label)
  truth = region_masks(label)
  return truth, Summary.join([(summarize(label[None], truth), 1)])


@jax.jit
def reference_on_device(label):
  """``reference`` on the device: (truth masks, the label's ``summarize`` dict), both left
  there (``Summary.join([(summary, 1)])`` fetches the latter)."""
  truth = region_masks(label, jnp)
  return truth, summarize(label[None], truth, jnp)


def dice_from_counts(count, overlap, truth_count):
  """``metrics.dice`` from voxel counts: 1.0 when both masks are empty."""
  total = int(count) + int(truth_count)
  return 1.0 if total == 0 else 2.0 * int(overlap) / total


# ----------------------------------------------------------------------------------------------
# HD95 on the host


def _slices(boxes, margin, shape):
  """Slices of the union of ``boxes`` ((first, last) per axis) grown by ``margin``, clipped."""
  return tuple(slice(max(min(b[a][0] for b in boxes) - margin, 0),
                     min(max(b[a][1] for b in boxes) + margin + 1, shape[a]))
               for a in range(len(shape)))


def _nearest(surface, spacing):
  """scipy's exact feature transform: for every voxel the index of the nearest True voxel."""
  return ndimage.distance_transform_edt(~surface, sampling=spacing, return_distances=False,
                                        return_indices=True)


def _distances(features, points, spacing):
  """Distances (mm) from ``points`` (3 index arrays into ``features``' box) to their nearest
  feature, with the float operations of ``scipy.ndimage.distance_transform_edt``."""
  points = np.stack(points)
  dt = (features[(slice(None),) + tuple(points)] - points).astype(np.float64)
  for axis, step in enumerate(spacing):
    dt[axis, ...] *= step
  np.multiply(dt, dt, dt)
  return np.sqrt(np.add.reduce(dt, axis=0))


def _local(points, box):
  """Global voxel indices -> indices inside the box ``box`` (slices)."""
  return tuple(p - s.start for p, s in zip(points, box))


def _to_output(output, index, region, truth_points, truth_box, spacing):
  """Distances from the reference's surface voxels to the output's surface.

  First over the reference's box grown by ``MARGIN`` voxels. A voxel outside a box grown by m
  lies more than m voxels away along some axis, so the distances found are exact when all are
  below (m + 1) x the smallest voxel size; otherwise their largest, an upper bound of every
  true distance, gives the margin that makes the second box exact. Boxes never exceed the
  joint box of the two masks grown by one voxel (``metrics.surface_distances``' box), which
  is used directly when a smaller box would hold more than ``NEAR_FRACTION`` of it."""
  surface = output.surface(index, region)
  shape = surface.shape
  joint = _slices([truth_box, output.box(index, region)], 1, shape)
  margin = MARGIN
  for _ in range(2):
    near = tuple(slice(max(n.start, j.start), min(n.stop, j.stop))
                 for n, j in zip(_slices([truth_box], margin, shape), joint))
    # A box not much smaller than the joint one saves less than a second try would cost.
    if _volume(near) > NEAR_FRACTION * _volume(joint) or not surface[near].any():
      break
    d = _distances(_nearest(surface[near], spacing), _local(truth_points, near), spacing)
    if d.max() < (margin + 1) * min(spacing):
      return d
    margin = int(np.ceil(d.max() / min(spacing)))
  return _distances(_nearest(surface[joint], spacing), _local(truth_points, joint), spacing)


def _volume(box):
  return int(np.prod([s.stop - s.start for s in box]))


def _percentile(forward, backward, mode):
  if mode == 'pooled':
    return float(np.percentile(np.concatenate([forward, backward]), 95))
  return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


@dataclasses.dataclass
class _Region:
  """One region of a case: its reference surface and the outputs to measure against it."""
  index: int
  both: list            # outputs with a non-empty mask (the reference's is non-empty too)
  surface: np.ndarray   # the reference's surface [X, Y, Z]
  box: list             # the reference's bounding box
  points: tuple         # the reference's surface voxels (index arrays)


def _to_reference(region, output, spacing):
  """{output: distances from its surface voxels to the reference's surface}: one feature
  transform over the joint box of the reference and every output."""
  joint = _slices([region.box] + [output.box(i, region.index) for i in region.both], 1,
                  region.surface.shape)
  features = _nearest(region.surface[joint], spacing)
  return {i: _distances(features, _local(np.nonzero(output.surface(i, region.index)), joint),
                        spacing) for i in region.both}


def _hd95_tasks(truth, output):
  """The regions whose HD95 needs distances (both masks non-empty for some output)."""
  regions = []
  for r in range(len(REGIONS)):
    both = [i for i in range(len(output.count)) if output.count[i, r] and truth.count[0, r]]
    if both:
      surface = truth.surface(0, r)
      regions.append(_Region(r, both, surface, truth.box(0, r), np.nonzero(surface)))
  return regions


def case_metrics(truth, output, spacing=(1.0, 1.0, 1.0), convention='brats', mode='pooled',
                 pool=None):
  """``metrics.case_metrics`` of every output of one case from Summaries (``truth``: the
  reference's, N = 1): a list (one per output) of {region: {'dice', 'hd95'}}. ``pool`` (a
  ``concurrent.futures`` executor, optional) runs the distance transforms in its threads."""
  metrics._check_convention(convention)  # pylint: disable=protected-access
  if mode not in ('pooled', 'max'):
    raise ValueError(f"unknown mode {mode!r}; use 'pooled' or 'max'")
  spacing = metrics._normalise_spacing(spacing, 3)  # pylint: disable=protected-access
  regions = _hd95_tasks(truth, output)
  tasks = [(g, None) for g in regions] + [(g, i) for g in regions for i in g.both]

  def work(task):
    g, i = task
    if i is None:
      return _to_reference(g, output, spacing)
    return _to_output(output, i, g.index, g.points, g.box, spacing)

  done = list(pool.map(work, tasks)) if pool else [work(t) for t in tasks]
  results = dict(zip([(g.index, i) for g, i in tasks], done))
  one_empty = metrics.BRATS_EMPTY_HD95 if convention == 'brats' else 0.0
  out = []
  for i in range(len(output.count)):
    scores = {}
    for r, name in enumerate(REGIONS):
      count, truth_count = int(output.count[i, r]), int(truth.count[0, r])
      if count and truth_count:
        hd95 = _percentile(results[(r, None)][i], results[(r, i)], mode)
      else:
        hd95 = 0.0 if count == truth_count == 0 else one_empty
      scores[name] = {'dice': dice_from_counts(count, output.overlap[i, r], truth_count),
                      'hd95': hd95}
    out.append(scores)
  return out
