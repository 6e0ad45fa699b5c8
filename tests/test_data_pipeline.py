"""The grain training pipeline and the evaluation cases."""

import json
import os

import numpy as np
import pytest

from configs import brats
from mstkd_jax import optim
from mstkd_jax.data import augment
from mstkd_jax.data import layouts
from mstkd_jax.data import pipeline
from mstkd_jax.data import preprocess

BATCH = 2


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """Five synthetic cases (synthetic root), split 3/1/1, cache built once."""
  workdir = str(tmp_path_factory.mktemp('pipe'))
  cfg = brats.get_config('tiny')
  cfg.data.synthetic_cases = 5
  cfg.data.synthetic_shape = (48, 48, 40)
  cfg.data.input_shape = (32, 32, 24)
  cfg.data.split = (0.6, 0.2, 0.2)
  cfg.data.rotation_prob = 0.5
  pipeline.prepare(cfg, workdir, progress=False)
  return cfg, workdir


def _take(loader, n):
  out = [next(loader) for _ in range(n)]
  return [{k: np.array(v) for k, v in b.items()} for b in out]


def _loader(setup, seed=0, **kw):
  cfg, workdir = setup
  kw.setdefault('worker_count', 0)
  return pipeline.make_train_loader(pipeline.prepare(cfg, workdir, progress=False), BATCH,
                                    seed=seed, **kw)


def test_batches_have_the_contracted_form(setup):
  cfg, _ = setup
  loader = _loader(setup)
  batch = next(loader)
  assert set(batch) == {'image', 'label'}
  shape = (BATCH,) + tuple(cfg.data.input_shape) + (4,)
  for key, dtype in (('image', np.float32), ('label', np.uint8)):
    assert batch[key].shape == shape and batch[key].dtype == dtype
  label = batch['label']
  assert set(np.unique(label)) <= {0, 1}
  np.testing.assert_array_equal(label.sum(-1), 1)           # one channel per voxel
  np.testing.assert_array_equal(label[..., 3], 1 - label[..., :3].max(-1))
  assert np.isfinite(batch['image']).all()
  assert optim.steps_per_epoch(cfg, len(loader.case_ids), BATCH) == 3 // BATCH == 1
  assert len(loader.case_ids) == 3
  loader.close()


def test_same_seed_same_batches_and_other_seed_other_batches(setup):
  a, b, c = _loader(setup), _loader(setup), _loader(setup, seed=1)
  ba, bb, bc = _take(a, 4), _take(b, 4), _take(c, 4)
  for x, y in zip(ba, bb):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert any(not np.array_equal(x['image'], z['image']) for x, z in zip(ba, bc))
  # Threads in the main process do not change anything either.
  for threads in (1, 2):
    d = _loader(setup, threads=threads)
    for x, y in zip(ba, _take(d, 4)):
      np.testing.assert_array_equal(x['image'], y['image'])


def test_epochs_cover_every_case_with_new_shuffles(setup):
  cfg, workdir = setup
  entries = pipeline.prepare(cfg, workdir, progress=False).entries
  train = sorted(pipeline.make_split(cfg, workdir)['train'])
  ds = pipeline.build_train_dataset([entries[i] for i in train],
                                    [[48, 48, 40]] * len(train),
                                    augment.AugmentOptions((32, 32, 24)), 1, seed=0)
  parent = ds._parent  # pylint: disable=protected-access
  orders = [[parent[e * 3 + k]['entry'] for k in range(3)] for e in range(6)]
  for order in orders:
    assert sorted(order) == sorted(entries[i] for i in train)
  assert len({tuple(o) for o in orders}) > 1


def test_state_save_and_restore(setup):
  loader = _loader(setup)
  _take(loader, 3)
  state = loader.get_state()
  assert isinstance(state, bytes) and json.loads(state)['step'] == 3
  expected = _take(loader, 2)
  fresh = _loader(setup)
  fresh.set_state(state)
  for x, y in zip(expected, _take(fresh, 2)):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  with pytest.raises(ValueError, match='another input pipeline'):
    _loader(setup, seed=3).set_state(state)


def test_sharding_by_process(setup):
  cfg, workdir = setup
  dataset = pipeline.prepare(cfg, workdir, progress=False)
  parts = [pipeline.make_train_loader(dataset, 1, seed=0, process_index=i,
                                      process_count=2, worker_count=0)
           for i in range(2)]
  ids = [p.case_ids for p in parts]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == sorted(pipeline.make_split(cfg, workdir)['train'])


def test_same_batches_with_worker_processes(setup):
  """One small multiprocess run: grain workers give exactly the in-process batches."""
  expected = _take(_loader(setup), 3)
  loader = _loader(setup, worker_count=2)
  try:
    got = _take(loader, 3)
    state = loader.get_state()
    more = _take(loader, 1)
  finally:
    loader.close()
  for x, y in zip(expected, got):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  # The state does not depend on the worker count.
  inproc = _loader(setup)
  inproc.set_state(state)
  np.testing.assert_array_equal(_take(inproc, 1)[0]['image'], more[0]['image'])


def test_augmentation_matches_a_plain_reference():
  rs = np.random.RandomState(0)
  box = (20, 18, 16)
  image = (rs.rand(*box, 4) * (rs.rand(*box, 1) > 0.3)).astype(np.float32)
  codes = rs.randint(0, 5, box).astype(np.uint8)
  opts = augment.AugmentOptions((16, 16, 12), True, 0.0, 0.0, 0.1, 0.1)
  rng = np.random.default_rng(0)
  for _ in range(8):
    params = augment.draw(box, opts, rng)
    out_i = np.empty((16, 16, 12, 4), np.float32)
    out_l = np.empty_like(out_i)
    augment.assemble(image, codes, params, opts, out_i, out_l, chunk=3)
    out_u8 = np.empty(out_i.shape, np.uint8)      # the training batches' label type
    augment.assemble(image, codes, params, opts, np.empty_like(out_i), out_u8, chunk=3)
    np.testing.assert_array_equal(out_u8, out_l)
    window = tuple(slice(o, o + s) for o, s in zip(params['offset'], opts.input_shape))
    ref, lab = image[window], codes[window]
    for axis, flip in enumerate(params['flips']):
      if flip:
        ref, lab = np.flip(ref, axis), np.flip(lab, axis)
    scale, shift = np.float32(params['scale']), np.float32(params['shift'])
    ref = np.where(ref != 0, ref * scale + shift, 0)
    np.testing.assert_allclose(out_i, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out_l, layouts.codes_to_onehot(lab))


def test_rotation_keeps_labels_consistent():
  box = (24, 24, 24)
  codes = np.zeros(box, np.uint8)
  codes[6:18, 6:18, 6:18] = 2
  codes[9:15, 9:15, 9:15] = 3
  image = np.stack([(codes > 0) * (c + 1.0) for c in range(4)], -1).astype(np.float32)
  opts = augment.AugmentOptions((24, 24, 24), False, 10.0, 1.0, 0.0, 0.0)
  params = augment.draw(box, opts, np.random.default_rng(1))
  assert params['angles'] is not None and max(map(abs, params['angles'])) <= 10
  out_i = np.empty(box + (4,), np.float32)
  out_l = np.empty_like(out_i)
  augment.assemble(image, codes, params, opts, out_i, out_l)
  assert abs(out_l[..., 1].sum() - (codes == 2).sum()) < 0.15 * (codes == 2).sum()
  assert out_l[12, 12, 12, 2] == 1 and out_l[0, 0, 0, 3] == 1
  np.testing.assert_array_equal(out_l.sum(-1), 1)


def test_eval_cases_fixed_order_and_restorable(setup):
  cfg, workdir = setup
  dataset = pipeline.prepare(cfg, workdir, progress=False)
  split = dataset.split
  cases = pipeline.load_eval_cases(dataset, 'test')
  assert cases.case_ids == sorted(split['test'])
  ids = [c.case_id for c in cases]
  assert ids == [c.case_id for c in pipeline.load_eval_cases(dataset, 'test')]
  case = cases[0]
  assert case.image.shape == tuple(cfg.data.input_shape) + (4,)
  assert case.label.shape == tuple(cfg.data.input_shape) + (4,)
  assert case.image.dtype == case.label.dtype == np.float32
  assert case.spacing == (1.0, 1.0, 1.0)
  np.testing.assert_array_equal(case.label, layouts.codes_to_onehot(case.codes))
  # Writing a prediction back: the label itself lands where it came from.
  source = {c.case_id: c for c in dataset.cases}[case.case_id]
  raw = preprocess.read_case(source)
  back = pipeline.restore_geometry(case.codes, case.meta)
  window = tuple(slice(max(s, 0), s + n) for s, n in zip(case.meta['box_start'],
                                                          case.meta['box_size']))
  np.testing.assert_array_equal(back[window], raw.codes[window])
  assert back.shape == raw.codes.shape
  # The whole box, for sliding windows, holds every tumour voxel.
  full = pipeline.load_eval_cases(dataset, 'test', full_box=True)[0]
  assert all(b >= t for b, t in zip(full.image.shape[:3], cfg.data.input_shape))
  np.testing.assert_array_equal(pipeline.restore_geometry(full.codes, full.meta), raw.codes)
  assert len(pipeline.load_eval_cases(dataset, 'val')) == 1
  out = os.path.join(workdir, 'pred.nii.gz')
  pipeline.write_nifti(back, case.meta, out, dtype=np.uint8)
  assert os.path.exists(out)
