"""Dice / HD95 / region masks: hand-computed cases, a brute-force reference and MedPy."""

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from mstkd_jax import metrics
from mstkd_jax.data import layouts


def _voxels(shape, *points):
  mask = np.zeros(shape, bool)
  for p in points:
    mask[p] = True
  return mask


def _cube(shape, lo, hi):
  mask = np.zeros(shape, bool)
  mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
  return mask


def _blob(rng, shape, level=0.6, sigma=2.5):
  """A random smooth blob mask (several components, touching the array edge now and then)."""
  field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
  return field > level * field.std()


# ----------------------------------------------------------------------------------------------
# Dice


def test_dice_known_overlaps():
  a = _cube((8, 8, 8), (0, 0, 0), (2, 2, 2))
  half = _cube((8, 8, 8), (1, 0, 0), (3, 2, 2))          # 4 of 8 voxels shared
  assert metrics.dice(a, a) == 1.0
  assert metrics.dice(a, half) == pytest.approx(0.5)
  inside = _cube((8, 8, 8), (0, 0, 0), (1, 2, 2))         # 4 voxels, all inside a
  assert metrics.dice(inside, a) == pytest.approx(2 * 4 / 12)
  assert metrics.dice(a, _cube((8, 8, 8), (5, 5, 5), (7, 7, 7))) == 0.0


def test_dice_empty_masks():
  empty = np.zeros((4, 4, 4), bool)
  some = _voxels((4, 4, 4), (1, 1, 1))
  assert metrics.dice(empty, empty) == 1.0
  assert metrics.dice(empty, some) == 0.0
  assert metrics.dice(some, empty) == 0.0


def test_dice_shape_mismatch_raises():
  with pytest.raises(ValueError, match='shapes differ'):
    metrics.dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


# ----------------------------------------------------------------------------------------------
# HD95: hand-computed


@pytest.mark.parametrize('mode', ['pooled', 'max'])
def test_hd95_single_voxel_shift_anisotropic(mode):
  a = _voxels((6, 6, 8), (2, 2, 2))
  b = _voxels((6, 6, 8), (2, 2, 4))
  assert metrics.hd95(a, b, spacing=(1, 1, 3), mode=mode) == pytest.approx(6.0)
  assert metrics.hd95(b, a, spacing=(1, 1, 3), mode=mode) == pytest.approx(6.0)
  c = _voxels((6, 6, 8), (3, 4, 2))                       # shift (1, 2, 0) voxels
  assert metrics.hd95(a, c, spacing=(2, 3, 1), mode=mode) == pytest.approx(math.sqrt(4 + 36))
  assert metrics.hd95(a, a, spacing=(2, 3, 1), mode=mode) == 0.0


def test_hd95_pooled_versus_max():
  # A = one voxel; B = that voxel and one 10 voxels away. d(A->B) = [0]; d(B->A) = [0, 10].
  # pooled: percentile95([0, 0, 10]) = 0.9 * 10; max: max(0, percentile95([0, 10])) = 0.95 * 10.
  a = _voxels((4, 4, 16), (1, 1, 2))
  b = _voxels((4, 4, 16), (1, 1, 2), (1, 1, 12))
  assert metrics.hd95(a, b, spacing=(1, 1, 0.5)) == pytest.approx(4.5)
  assert metrics.hd95(a, b, spacing=(1, 1, 0.5), mode='max') == pytest.approx(4.75)


@pytest.mark.parametrize('mode', ['pooled', 'max'])
def test_hd95_nested_cubes(mode):
  # A: 10^3 cube; B: A less a one-voxel shell. Every B surface voxel is 1 from A's surface; A's
  # face / edge / corner voxels are 1 / sqrt2 / sqrt3 from B's: 384, 96 and 8 of them. Pooled:
  # 680 ones, 96 sqrt2, 8 sqrt3 -> the 95th percentile (index 743.85 of 784) is sqrt2; the
  # directed A->B one (index 462.65 of 488) is sqrt2 too.
  a = _cube((14, 14, 14), (2, 2, 2), (12, 12, 12))
  b = _cube((14, 14, 14), (3, 3, 3), (11, 11, 11))
  forward, backward = metrics.surface_distances(a, b)
  assert np.allclose(np.sort(forward),
                     np.sort([1.0] * 384 + [math.sqrt(2)] * 96 + [math.sqrt(3)] * 8))
  assert np.allclose(backward, 1.0) and len(backward) == 8 ** 3 - 6 ** 3
  assert metrics.hd95(a, b, mode=mode) == pytest.approx(math.sqrt(2))


def test_hd95_shifted_cube_anisotropic():
  # Two 4^3 cubes shifted by 3 voxels along axis 0 with 2 mm voxels there: the surfaces are the
  # same set translated by 6 mm along that axis, but a voxel near the other cube's side finds a
  # closer surface voxel. Checked against the brute-force reference below.
  a = _cube((12, 8, 8), (1, 2, 2), (5, 6, 6))
  b = _cube((12, 8, 8), (4, 2, 2), (8, 6, 6))
  spacing = (2.0, 1.0, 0.7)
  for mode in ('pooled', 'max'):
    assert metrics.hd95(a, b, spacing, mode=mode) == pytest.approx(
        _brute_force_hd95(a, b, spacing, mode))


def test_hd95_empty_masks_under_both_conventions():
  empty = np.zeros((5, 5, 5), bool)
  some = _voxels((5, 5, 5), (2, 2, 2))
  for convention in ('brats', 'authors'):
    assert metrics.hd95(empty, empty, convention=convention) == 0.0
  assert metrics.hd95(empty, some, convention='brats') == metrics.BRATS_EMPTY_HD95 == 373.13
  assert metrics.hd95(some, empty, convention='brats') == 373.13
  assert metrics.hd95(empty, some, convention='authors') == 0.0
  assert metrics.hd95(some, empty, convention='authors') == 0.0
  with pytest.raises(ValueError, match='convention'):
    metrics.hd95(some, some, convention='nnunet')


def test_conventions_agree_when_both_masks_are_present():
  rng = np.random.default_rng(3)
  a, b = _blob(rng, (20, 24, 16)), _blob(rng, (20, 24, 16))
  assert metrics.hd95(a, b, convention='brats') == metrics.hd95(a, b, convention='authors')


# ----------------------------------------------------------------------------------------------
# HD95: against an independent brute force and MedPy


def _brute_force_surface(mask):
  """Voxels of the mask with at least one of the 6 face neighbours outside it / the array."""
  padded = np.pad(mask, 1)
  inner = np.ones_like(mask)
  for axis in range(3):
    for step in (-1, 1):
      inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
  return mask & ~inner


def _brute_force_hd95(a, b, spacing, mode='pooled'):
  pa = np.argwhere(_brute_force_surface(a)) * np.asarray(spacing)
  pb = np.argwhere(_brute_force_surface(b)) * np.asarray(spacing)
  d = cdist(pa, pb)
  forward, backward = d.min(axis=1), d.min(axis=0)
  if mode == 'pooled':
    return np.percentile(np.concatenate([forward, backward]), 95)
  return max(np.percentile(forward, 95), np.percentile(backward, 95))


@pytest.mark.parametrize('seed', range(4))
def test_hd95_matches_brute_force_on_random_blobs(seed):
  rng = np.random.default_rng(seed)
  shape = (18, 22, 14)
  a, b = _blob(rng, shape, sigma=2.0), _blob(rng, shape, sigma=2.0)
  spacing = tuple(rng.uniform(0.5, 2.0, size=3))
  for mode in ('pooled', 'max'):
    assert metrics.hd95(a, b, spacing, mode=mode) == pytest.approx(
        _brute_force_hd95(a, b, spacing, mode), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize('seed', range(4))
def test_matches_medpy_on_random_blobs(seed):
  medpy_binary = pytest.importorskip('medpy.metric.binary')
  rng = np.random.default_rng(100 + seed)
  shape = (30, 36, 24)
  a, b = _blob(rng, shape), _blob(rng, shape)
  assert a.any() and b.any()
  spacing = (1.0, 1.0, 1.0) if seed == 0 else tuple(rng.uniform(0.5, 2.0, size=3))
  assert metrics.hd95(a, b, spacing) == pytest.approx(
      medpy_binary.hd95(a, b, voxelspacing=spacing), rel=1e-12)
  assert metrics.hd95(a, b, spacing, crop=False) == pytest.approx(
      medpy_binary.hd95(a, b, voxelspacing=spacing), rel=1e-12)
  assert metrics.dice(a, b) == pytest.approx(medpy_binary.dc(a, b), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Bounding-box crop


@pytest.mark.parametrize('seed', range(3))
def test_crop_gives_identical_distances(seed):
  rng = np.random.default_rng(200 + seed)
  shape = (26, 30, 20)
  a, b = _blob(rng, shape, level=1.0), _blob(rng, shape, level=1.0)
  if seed == 1:                                          # a mask touching two array faces
    a[0, :5, :5] = True
    b[:4, -1, :] = True
  spacing = (1.2, 0.9, 2.5)
  cropped = metrics.surface_distances(a, b, spacing, crop=True)
  full = metrics.surface_distances(a, b, spacing, crop=False)
  for c, f in zip(cropped, full):
    np.testing.assert_array_equal(c, f)
  for mode in ('pooled', 'max'):
    assert (metrics.hd95(a, b, spacing, mode=mode, crop=True)
            == metrics.hd95(a, b, spacing, mode=mode, crop=False))


def test_crop_on_full_size_volume():
  shape = (160, 192, 128)
  grid = np.ogrid[tuple(slice(0, s) for s in shape)]

  def ellipsoid(centre, radii):
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) < 1

  a = ellipsoid((80, 90, 60), (20, 25, 15))
  b = ellipsoid((84, 95, 62), (18, 28, 14))
  b[150:156, 3:6, 120:128] = True                        # a far-away false positive at the edge
  assert metrics.hd95(a, b, crop=True) == metrics.hd95(a, b, crop=False)


# ----------------------------------------------------------------------------------------------
# Regions and per-case metrics


def _label_volume():
  labels = np.zeros((6, 5, 4), np.int32)
  labels[1, 1, 1] = 1            # NETC
  labels[2, 2, 2] = 2            # SNFH
  labels[3, 3, 3] = 3            # ET (BraTS 2024)
  labels[4, 4, 0] = 4            # resection cavity (BraTS 2024) / ET (FeTS)
  return labels


def _points(mask):
  return {tuple(int(i) for i in p) for p in np.argwhere(mask)}


def _regions(labels, layout):
  """WT / TC / ET of a label volume through the layouts' one label table."""
  return layouts.region_masks(layouts.labels_to_codes(labels, layout))


def test_regions_from_labels_both_schemes():
  labels = _label_volume()
  r = _regions(labels, 'brats2024')
  assert _points(r['WT']) == {(1, 1, 1), (2, 2, 2), (3, 3, 3)}
  assert _points(r['TC']) == {(1, 1, 1), (3, 3, 3)}
  assert _points(r['ET']) == {(3, 3, 3)}
  r = _regions(labels, 'fets')
  assert _points(r['WT']) == {(1, 1, 1), (2, 2, 2), (4, 4, 0)}
  assert _points(r['TC']) == {(1, 1, 1), (4, 4, 0)}
  assert _points(r['ET']) == {(4, 4, 0)}


def test_region_masks_from_one_hot_and_probabilities():
  labels = _label_volume()
  # Channels (NETC, SNFH, ET, background), channels-last, BraTS 2024 labels; cavity = background.
  one_hot = np.stack([labels == 1, labels == 2, labels == 3,
                      ~np.isin(labels, (1, 2, 3))], axis=-1).astype(np.float32)
  expected = _regions(labels, 'brats2024')
  got = metrics.region_masks(one_hot)
  for region in metrics.REGIONS:
    np.testing.assert_array_equal(got[region], expected[region])
  # Channels-first gives the same.
  got = metrics.region_masks(np.moveaxis(one_hot, -1, 0), channel_axis=0)
  for region in metrics.REGIONS:
    np.testing.assert_array_equal(got[region], expected[region])
  # Sigmoid outputs: strictly above 0.5 counts; several channels may be on at once.
  probs = np.zeros((2, 1, 1, 4), np.float32)
  probs[0, 0, 0] = (0.5, 0.51, 0.2, 0.9)   # NETC at exactly 0.5 is off; SNFH on -> WT only
  probs[1, 0, 0] = (0.7, 0.1, 0.8, 0.0)    # NETC and ET on -> WT, TC, ET
  got = metrics.region_masks(probs)
  assert got['WT'][:, 0, 0].tolist() == [True, True]
  assert got['TC'][:, 0, 0].tolist() == [False, True]
  assert got['ET'][:, 0, 0].tolist() == [False, True]


def test_case_metrics():
  shape = (12, 12, 12)
  true = {'WT': _cube(shape, (2, 2, 2), (8, 8, 8)),
          'TC': _cube(shape, (3, 3, 3), (6, 6, 6)),
          'ET': np.zeros(shape, bool)}
  pred = {'WT': true['WT'].copy(),
          'TC': _cube(shape, (3, 3, 4), (6, 6, 7)),
          'ET': _voxels(shape, (4, 4, 4))}
  for convention, et_hd in (('brats', 373.13), ('authors', 0.0)):
    m = metrics.case_metrics(pred, true, spacing=(1, 1, 2), convention=convention)
    assert set(m) == {'WT', 'TC', 'ET'}
    assert m['WT'] == {'dice': 1.0, 'hd95': 0.0}
    assert m['TC']['dice'] == pytest.approx(2 * 18 / 54)
    # 3^3 cubes one voxel (2 mm) apart along z: of the 52 surface distances 32 are 0, 2 are 1 mm
    # and 18 are 2 mm (the end faces), so the 95th percentile is 2 mm.
    assert m['TC']['hd95'] == pytest.approx(2.0)
    assert m['ET'] == {'dice': 0.0, 'hd95': et_hd}
    assert all(isinstance(v, float) for r in m.values() for v in r.values())
