"""Preprocessing into model space and back: scaling, resampling, the box around the brain."""

import os

import nibabel as nib
import numpy as np
import pytest

from configs import brats
from mstkd_jax.data import layouts
from mstkd_jax.data import pipeline
from mstkd_jax.data import preprocess
from mstkd_jax.data import synthetic

SHAPE = (48, 48, 40)


@pytest.fixture(scope='module')
def case(tmp_path_factory):
  root = synthetic.generate_dataset(str(tmp_path_factory.mktemp('pre')), 1, SHAPE, 'brats2021',
                                    seed=3, spacing=1.2)
  return layouts.discover_cases(root)[0]


@pytest.fixture(scope='module')
def raw(case):
  return preprocess.read_case(case)


@pytest.mark.parametrize('input_shape', [(32, 32, 32), (64, 72, 48), (16, 40, 20)])
def test_round_trip_is_exact_without_resampling(raw, input_shape):
  settings = preprocess.Settings(input_shape=input_shape)
  image, codes, meta = preprocess.preprocess(raw, settings)
  assert image.dtype == np.float32 and codes.dtype == np.uint8
  assert all(b >= t for b, t in zip(image.shape[:3], input_shape))
  assert tuple(meta['box_size']) == image.shape[:3] == codes.shape
  # Labels and the brain come back exactly, in the original geometry.
  back = preprocess.restore_geometry(codes, meta)
  assert back.shape == raw.codes.shape and back.dtype == np.uint8
  np.testing.assert_array_equal(back, raw.codes)
  scaled = np.stack([preprocess.normalize_channel(raw.image[..., c], 'minmax')[0]
                     for c in range(4)], -1)
  np.testing.assert_array_equal(preprocess.restore_geometry(image, meta), scaled)
  np.testing.assert_array_equal(np.asarray(meta['original_affine']), raw.affine)
  assert tuple(meta['original_shape']) == raw.codes.shape
  # Going forward again gives the same model-space arrays.
  np.testing.assert_array_equal(preprocess.to_model_space(raw.codes, meta), codes)


def test_box_contains_brain_and_is_centred(raw):
  settings = preprocess.Settings(input_shape=(32, 64, 24))
  _, _, meta = preprocess.preprocess(raw, settings)
  brain = np.any(raw.image != 0, axis=-1)
  for axis, (start, size, (lo, hi)) in enumerate(zip(meta['box_start'], meta['box_size'],
                                                      meta['brain_bbox'])):
    assert start <= lo and hi <= start + size
    if size > hi - lo:
      # Extended around the brain: centred unless the volume's edge stops it.
      n = brain.shape[axis]
      assert start in (0, n - size) or abs((start + size / 2) - (lo + hi) / 2) <= 1 or start < 0


def test_round_trip_geometry_with_resampling(raw, case):
  settings = preprocess.Settings(input_shape=(24, 24, 24), spacing=2.4)
  image, codes, meta = preprocess.preprocess(raw, settings)
  np.testing.assert_allclose(meta["spacing"], [2.4] * 3, rtol=1e-5)
  factors = np.asarray(meta['factors'])
  np.testing.assert_allclose(factors, [2.0] * 3, rtol=1e-5)
  assert tuple(meta['resampled_shape']) == (24, 24, 20)
  # Voxel (0,0,0) of the coarse grid sits at the centre of original voxels 0..1 (world mm).
  orig, new = np.asarray(meta['original_affine']), np.asarray(meta['resampled_affine'])
  np.testing.assert_allclose(new @ [0, 0, 0, 1], orig @ [0.5, 0.5, 0.5, 1], atol=1e-4)
  np.testing.assert_allclose(new @ [23, 23, 19, 1], orig @ [46.5, 46.5, 38.5, 1], atol=1e-4)
  back = preprocess.restore_geometry(codes, meta)
  assert back.shape == raw.codes.shape and back.dtype == codes.dtype
  wt, wt_back = raw.codes > 0, back > 0
  dice = 2 * (wt & wt_back).sum() / (wt.sum() + wt_back.sum())
  assert dice > 0.8
  probs = preprocess.restore_geometry(image, meta)   # float: trilinear
  assert probs.shape == raw.image.shape
  # The written NIfTI has the original geometry and header.
  out = os.path.join(os.path.dirname(case.seg), '..', 'restored.nii.gz')
  preprocess.write_nifti(back, meta, out, dtype=np.uint8)
  img = nib.load(out)
  assert img.shape == raw.codes.shape
  np.testing.assert_allclose(img.affine, nib.load(case.seg).affine)
  np.testing.assert_array_equal(np.asanyarray(img.dataobj), back)
  os.remove(out)


def test_header_is_recoverable(raw):
  _, _, meta = preprocess.preprocess(raw, preprocess.Settings(input_shape=(32, 32, 32)))
  header = preprocess.header_from_meta(meta)
  assert header.binaryblock == raw.header.binaryblock
  np.testing.assert_allclose(header.get_best_affine(), raw.affine)


def test_centre_window(raw):
  image, codes, meta = preprocess.preprocess(raw, preprocess.Settings(input_shape=(16, 16, 16)))
  img_c, meta_c = pipeline.centre_crop(image, meta, (16, 16, 16))
  codes_c, _ = pipeline.centre_crop(codes, meta, (16, 16, 16))
  assert img_c.shape == (16, 16, 16, 4) and tuple(meta_c['box_size']) == (16, 16, 16)
  back = preprocess.restore_geometry(codes_c, meta_c)
  window = tuple(slice(s, s + 16) for s in meta_c['box_start'])
  np.testing.assert_array_equal(back[window], raw.codes[window])
  outside = np.ones(back.shape, bool)
  outside[window] = False
  assert not back[outside].any()


def test_normalizations():
  rs = np.random.RandomState(0)
  x = np.zeros((10, 10, 10), np.float32)
  x[2:8, 2:8, 2:8] = rs.rand(6, 6, 6) * 500 + 100
  y, st = preprocess.normalize_channel(x, 'minmax')
  assert y.min() == 0 and y.max() == 1 and st == {'min': 0.0, 'max': float(x.max())}
  z, _ = preprocess.normalize_channel(x, 'zscore')
  brain = x > 0
  assert abs(z[brain].mean()) < 1e-5 and abs(z[brain].std() - 1) < 1e-4
  assert not z[~brain].any()
  with np.errstate(all='raise'):   # a constant volume never divides by zero
    for method in ('minmax', 'zscore'):
      for value in (0.0, 7.0):
        out, _ = preprocess.normalize_channel(np.full((4, 4, 4), value, np.float32), method)
        assert not out.any()


def test_zscore_and_spacing_settings_change_fingerprint():
  a = preprocess.Settings()
  assert a.fingerprint() == preprocess.Settings().fingerprint()
  assert a.fingerprint() != preprocess.Settings(normalization='zscore').fingerprint()
  assert a.fingerprint() != preprocess.Settings(spacing=2.0).fingerprint()
  assert a.fingerprint() != preprocess.Settings(input_shape=(128, 128, 128)).fingerprint()
  with pytest.raises(ValueError, match='normalization'):
    preprocess.Settings(normalization='max')


def test_preprocess_patient_with_missing_modalities(case, raw):
  cfg = brats.get_config('tiny')
  paths = {'FLAIR': case.images[0], 't1c': case.images[2]}
  image, meta = pipeline.preprocess_patient(paths, cfg)
  assert meta['present'] == [True, False, True, False]
  assert not image[..., 1].any() and not image[..., 3].any()
  assert image[..., 0].any() and image[..., 2].any()
  assert all(b >= t for b, t in zip(image.shape[:3], cfg.data.input_shape))
  full, _, meta_full = preprocess.preprocess(raw, preprocess.Settings.from_config(cfg))
  assert meta['box_start'] == meta_full['box_start']
  np.testing.assert_array_equal(image[..., 0], full[..., 0])
  np.testing.assert_array_equal(image[..., 2], full[..., 2])
  # Predictions map back to the patient's grid.
  pred = np.zeros(image.shape[:3], np.uint8)
  pred[tuple(s // 2 for s in pred.shape)] = 1
  back = pipeline.restore_geometry(pred, meta)
  assert back.shape == raw.codes.shape and back.sum() == 1
  with pytest.raises(ValueError, match='no modality'):
    pipeline.preprocess_patient({}, cfg)
  with pytest.raises(ValueError, match='unknown modality'):
    pipeline.preprocess_patient({'PD': case.images[0]}, cfg)
  with pytest.raises(layouts.BadCaseError, match='file not found'):
    pipeline.preprocess_patient({'T2': '/nonexistent/t2.nii.gz'}, cfg)


def test_restore_rejects_wrong_shape(raw):
  _, codes, meta = preprocess.preprocess(raw, preprocess.Settings(input_shape=(32, 32, 32)))
  with pytest.raises(ValueError, match='does not match the box'):
    preprocess.restore_geometry(codes[:-1], meta)
