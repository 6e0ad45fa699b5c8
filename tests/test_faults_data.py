"""Faults of the data: a damaged preprocessing cache is rebuilt, never used; non-finite values
in a training batch or an evaluation input stop the run naming the case."""

import json
import os
import shutil
import zlib

import numpy as np
import pytest

from configs import brats
from mstkd_jax.data import cache
from mstkd_jax.data import pipeline
from mstkd_jax.data.layouts import DataError

CASES = 4


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """A workdir of four small synthetic cases (split 2/1/1) with its cache built."""
  workdir = str(tmp_path_factory.mktemp('faults_data'))
  cfg = brats.get_config('tiny')
  cfg.data.synthetic_cases = CASES
  cfg.data.synthetic_shape = (48, 48, 40)
  cfg.data.input_shape = (32, 32, 24)
  cfg.data.split = (0.5, 0.25, 0.25)
  dataset = pipeline.prepare(cfg, workdir, progress=False)
  return cfg, workdir, dataset


@pytest.fixture
def fresh(prepared, tmp_path):
  """A workdir of its own with a copy of the cases and the split (its cache built by the
  test's first ``prepare``), to damage."""
  cfg, workdir, _ = prepared
  copy = str(tmp_path / 'work')
  os.makedirs(copy)
  shutil.copytree(os.path.join(workdir, 'synthetic'), os.path.join(copy, 'data'))
  shutil.copy(os.path.join(workdir, 'split.json'), copy)
  cfg = cfg.copy_and_resolve_references()
  cfg.data.root = os.path.join(copy, 'data')
  with open(os.path.join(copy, 'split.json')) as f:
    split = json.load(f)
  return cfg, copy, split


def _damage(path, seed=0, size=2000):
  """Random bytes written into the middle of a file (its size unchanged), as bit rot does."""
  rs = np.random.RandomState(seed)
  length = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.seek(length // 2)
    f.write(rs.bytes(min(size, length // 4)))


class _Warnings:
  def __init__(self, monkeypatch):
    self.lines = []
    monkeypatch.setattr(cache.logging, 'warning', self.record)

  def record(self, message, *args):
    self.lines.append(message % args)


def test_a_damaged_cache_entry_is_rebuilt_with_one_warning(fresh, monkeypatch):
  cfg, workdir, split = fresh
  dataset = pipeline.prepare(cfg, workdir, progress=False)
  case_id = split['test'][0]
  entry = dataset.entries[case_id]
  good = np.array(np.load(os.path.join(entry, 'image.npy')))
  with open(os.path.join(entry, 'meta.json')) as f:
    assert set(json.load(f)['checksums']) == {'image.npy', 'label.npy'}
  _damage(os.path.join(entry, 'image.npy'))
  cache._VERIFIED.clear()       # pylint: disable=protected-access  (a new process)
  warnings = _Warnings(monkeypatch)
  dataset = pipeline.prepare(cfg, workdir, progress=False)
  assert len(warnings.lines) == 1, warnings.lines
  assert case_id in warnings.lines[0] and 'image.npy does not match' in warnings.lines[0]
  np.testing.assert_array_equal(np.load(os.path.join(dataset.entries[case_id], 'image.npy')),
                                good)
  # A damaged label map too.
  _damage(os.path.join(dataset.entries[case_id], 'label.npy'), size=300)
  cache._VERIFIED.clear()       # pylint: disable=protected-access
  pipeline.prepare(cfg, workdir, progress=False)
  assert 'label.npy does not match' in warnings.lines[-1]


def test_entries_without_checksums_are_rebuilt(fresh):
  cfg, workdir, split = fresh
  dataset = pipeline.prepare(cfg, workdir, progress=False)
  entry = dataset.entries[split['train'][0]]
  meta_path = os.path.join(entry, 'meta.json')
  with open(meta_path) as f:
    meta = json.load(f)
  meta.pop('checksums')
  meta.pop('checksum')
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  before = os.stat(os.path.join(entry, 'image.npy')).st_ino
  pipeline.prepare(cfg, workdir, progress=False)
  with open(meta_path) as f:
    assert 'checksums' in json.load(f)
  assert os.stat(os.path.join(entry, 'image.npy')).st_ino != before


def test_checksums_are_read_once_per_process_and_entry(fresh, monkeypatch):
  cfg, workdir, _ = fresh
  pipeline.prepare(cfg, workdir, progress=False)
  cache._VERIFIED.clear()       # pylint: disable=protected-access
  reads = []
  real = cache.file_checksum
  monkeypatch.setattr(cache, 'file_checksum', lambda path: reads.append(path) or real(path))
  pipeline.prepare(cfg, workdir, progress=False)
  assert len(reads) == 2 * CASES
  pipeline.prepare(cfg, workdir, progress=False)
  assert len(reads) == 2 * CASES


def _poison(entry):
  """NaN in the middle of a cached image, checksum updated: only the values are wrong."""
  path = os.path.join(entry, 'image.npy')
  image = np.load(path)
  centre = tuple(s // 2 for s in image.shape[:3])
  image[centre[0] - 3:centre[0] + 3, centre[1] - 3:centre[1] + 3, :, :] = np.nan
  np.save(path, image)
  meta_path = os.path.join(entry, 'meta.json')
  with open(meta_path) as f:
    meta = json.load(f)
  if 'checksums' in meta:
    with open(path, 'rb') as f:
      meta['checksums']['image.npy'] = f'{zlib.crc32(f.read()):08x}'
  with open(meta_path, 'w') as f:
    json.dump(meta, f)


def test_non_finite_evaluation_input_names_the_case(fresh):
  cfg, workdir, split = fresh
  dataset = pipeline.prepare(cfg, workdir, progress=False)
  case_id = split['test'][0]
  _poison(dataset.entries[case_id])
  for full_box in (False, True):
    cases = pipeline.load_eval_cases(pipeline.prepare(cfg, workdir, progress=False),
                                     'test', full_box=full_box)
    with pytest.raises(DataError, match=f'case {case_id}: its evaluation input holds'):
      cases[0]   # pylint: disable=pointless-statement


@pytest.mark.parametrize('kind', ['threads', pytest.param('processes', marks=pytest.mark.slow)])
def test_non_finite_training_batch_names_the_case(fresh, kind):
  cfg, workdir, split = fresh
  dataset = pipeline.prepare(cfg, workdir, progress=False)
  for case_id in split['train']:
    _poison(dataset.entries[case_id])
  options = {'worker_count': 1, 'threads': 0} if kind == 'processes' else {'threads': 1,
                                                                           'worker_count': 0}
  loader = pipeline.make_train_loader(pipeline.prepare(cfg, workdir, progress=False), 1, seed=0,
                                      **options)
  try:
    with pytest.raises(Exception) as info:
      next(loader)
  finally:
    loader.close()
  assert isinstance(info.value, DataError), repr(info.value)
  assert any(f'case {c}: its training sample holds' in str(info.value) for c in split['train'])
