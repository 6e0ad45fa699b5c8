"""mstkd_jax.scoring gives the numbers of mstkd_jax.metrics, value for value: masks, counts and
surfaces on the device and on the host, Dice and HD95 through every path of the distance
computation (the margin box, its second try, the joint box), both conventions and modes."""

import concurrent.futures

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from mstkd_jax import metrics, scoring


def _blob(rng, shape, level, sigma=2.5):
  field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
  return field > level * field.std()


def _case(seed, shape=(30, 26, 20), outputs=8):
  """A one-hot label [X, Y, Z, 4] and ``outputs`` probability volumes: blobs of every size,
  an empty ET, pure noise, a far-away false positive, masks touching the array's faces."""
  rng = np.random.default_rng(seed)
  label = np.zeros(shape + (4,), np.float32)
  for c, level in ((1, 1.0), (2, 1.5), (0, 1.8)):
    label[..., c] = _blob(rng, shape, level)
  label[..., 3] = 1.0 - label[..., :3].max(-1)
  probs = rng.random((outputs,) + shape + (4,)).astype(np.float32) * 0.3
  for k in range(outputs):
    for c in range(3):
      probs[k, ..., c] += _blob(rng, shape, 0.4 + 0.3 * k + 0.2 * c) * 0.5
  probs[1] = label * 0.9                       # the reference itself
  probs[2, ..., 2] = 0.0                       # ET missed
  probs[3] = rng.random(shape + (4,))          # noise everywhere
  probs[4, ..., :3] = 0.0                      # nothing found
  probs[4, :2, :2, :2, :3] = 0.9               # ... but a corner voxel block, far away
  probs[5, 0, :, :, 1] = 0.9                   # a face of the array
  probs[6, ..., :3] = np.maximum(label[..., :3], 0) * 0.9
  probs[6, -3:, -3:, -3:, :3] = 0.9            # the reference plus a far false positive
  return label, probs


def _expected(label, probs, spacing, convention='brats', mode='pooled'):
  truth = metrics.region_masks(label)
  return [metrics.case_metrics(metrics.region_masks(p), truth, spacing, convention, mode)
          for p in probs]


@pytest.mark.parametrize('spacing', [(1.0, 1.0, 1.0), (1.2, 0.9, 2.5), (2.0, 2.0, 2.0)])
@pytest.mark.parametrize('seed', range(3))
def test_case_metrics_equal_the_metric_functions(seed, spacing):
  label, probs = _case(seed)
  truth, reference = scoring.reference(label)
  output = scoring.Summary.join([(scoring.summarize(probs[:5], truth), 5),
                                 (scoring.summarize(probs[5:], truth), 3)])
  for convention in metrics.CONVENTIONS:
    for mode in ('pooled', 'max'):
      got = scoring.case_metrics(reference, output, spacing, convention, mode)
      assert got == _expected(label, probs, spacing, convention, mode)


def test_threads_and_device_give_the_same_numbers():
  label, probs = _case(7)
  truth, reference = scoring.reference(label)
  on_host = scoring.Summary.join([(scoring.summarize(probs, truth), len(probs))])
  dev_truth, dev_reference = scoring.reference_on_device(jnp.asarray(label))
  on_device = scoring.Summary.join([(scoring.summarize_on_device(jnp.asarray(probs), dev_truth),
                                     len(probs))])
  dev_reference = scoring.Summary.join([(dev_reference, 1)])
  for a, b in ((on_host, on_device), (reference, dev_reference)):
    for field in ('count', 'overlap', 'bits'):
      np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    for x, y in zip(a.extent, b.extent):
      np.testing.assert_array_equal(x, y)
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    threaded = scoring.case_metrics(dev_reference, on_device, (1.2, 0.9, 2.5), pool=pool)
  assert threaded == _expected(label, probs, (1.2, 0.9, 2.5))
  counts = scoring.dice_counts(jnp.asarray(probs), dev_truth)
  np.testing.assert_array_equal(np.asarray(counts['count']), on_host.count)
  np.testing.assert_array_equal(np.asarray(counts['overlap']), on_host.overlap)


def test_surfaces_are_the_metric_surfaces():
  label, probs = _case(3)
  truth, _ = scoring.reference(label)
  summary = scoring.Summary.join([(scoring.summarize(probs, truth), len(probs))])
  for k, p in enumerate(probs):
    masks = metrics.region_masks(p)
    for r, region in enumerate(metrics.REGIONS):
      surface = metrics._surface(masks[region])  # pylint: disable=protected-access
      np.testing.assert_array_equal(summary.surface(k, r), surface)
      box = summary.box(k, r)
      if masks[region].any():
        expected = metrics.bounding_slices(masks[region], 0)
        assert [(s.start, s.stop - 1) for s in expected] == box
      else:
        assert box is None


def test_margin_paths_on_a_full_size_volume():
  """A dense output whose surface lies far inside the reference's margin box (second try)
  and a far-away one (the joint box), at the full input size."""
  shape = (160, 192, 128)
  grid = np.ogrid[tuple(slice(0, s) for s in shape)]
  ball = lambda c, r: sum(((g - x) / r) ** 2 for g, x in zip(grid, c)) < 1
  label = np.zeros(shape + (4,), np.float32)
  label[..., 1] = ball((80, 90, 60), 20)
  probs = np.zeros((3,) + shape + (4,), np.float32)
  probs[0, ..., 1] = ~ball((80, 90, 60), 40)          # everything but a large hole
  probs[1, ..., 1] = ball((20, 30, 100), 8)           # only far away
  probs[2, ..., 1] = ball((84, 95, 62), 18)
  probs[2, 150:156, 3:6, 120:128, 1] = 1.0
  truth, reference = scoring.reference(label)
  output = scoring.Summary.join([(scoring.summarize(probs, truth), 3)])
  assert scoring.case_metrics(reference, output) == _expected(label, probs, (1.0, 1.0, 1.0))


def test_bad_arguments():
  label, probs = _case(0)
  truth, reference = scoring.reference(label)
  output = scoring.Summary.join([(scoring.summarize(probs, truth), len(probs))])
  with pytest.raises(ValueError, match='convention'):
    scoring.case_metrics(reference, output, convention='other')
  with pytest.raises(ValueError, match='mode'):
    scoring.case_metrics(reference, output, mode='mean')
