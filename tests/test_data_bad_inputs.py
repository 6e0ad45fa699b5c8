"""Every kind of bad input gives an error naming the case, the file and the problem."""

import gzip
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from configs import brats
from mstkd_jax.data import cache
from mstkd_jax.data import check
from mstkd_jax.data import layouts
from mstkd_jax.data import pipeline
from mstkd_jax.data import preprocess
from mstkd_jax.data import synthetic

SHAPE = (40, 40, 32)
CID = 'BraTS2021_00000'


@pytest.fixture(scope='module')
def clean(tmp_path_factory):
  return synthetic.generate_dataset(str(tmp_path_factory.mktemp('clean')), 3, SHAPE,
                                    'brats2021', seed=5)


@pytest.fixture
def root(clean, tmp_path):
  """A fresh copy of three good cases to damage."""
  out = str(tmp_path / 'data')
  shutil.copytree(clean, out)
  return out


def _file(root, key, case_id=CID):
  return os.path.join(root, case_id, f'{case_id}_{key}.nii.gz')


def _rewrite(path, data=None, affine=None):
  img = nib.load(path)
  data = np.asanyarray(img.dataobj) if data is None else data
  out = nib.Nifti1Image(data, img.affine if affine is None else affine)
  nib.save(out, path)


def _problems(root):
  case = {c.case_id: c for c in layouts.discover_cases(root)}[CID]
  return check.check_case(case)


def _expect(root, file_name, *words):
  """Exactly the damaged case has problems; one names `file_name` and every word."""
  problems = _problems(root)
  assert problems, 'expected a problem'
  hits = [p for p in problems if file_name in p.file and all(w in p.message for w in words)]
  assert hits, [str(p) for p in problems]
  assert all(p.case == CID for p in problems)
  text = str(hits[0])
  assert CID in text and file_name in text
  # The check command reports it and fails; the other cases are fine.
  results, _ = check.check_root(root)
  assert [cid for cid, ps in results if ps] == [CID]
  assert check.main(['--root', root, '--quiet']) == 1
  # Reading the case for training raises the same, with case and file in the message.
  case = {c.case_id: c for c in layouts.discover_cases(root)}[CID]
  with pytest.raises(layouts.BadCaseError) as err:
    preprocess.read_case(case)
  assert CID in str(err.value) and file_name in str(err.value)
  return problems


def test_clean_data_passes_check(clean, capsys):
  assert check.main(['--root', clean, '--quiet']) == 0
  assert '3 cases (3 brats2021): 3 usable, 0 with problems' in capsys.readouterr().out


def test_missing_modality(root):
  os.remove(_file(root, 't1ce'))
  _expect(root, f'{CID}_t1ce.nii.gz', 'missing modality file')


def test_missing_label(root):
  os.remove(_file(root, 'seg'))
  _expect(root, f'{CID}_seg.nii.gz', 'missing label file')


def test_truncated_gzip(root):
  path = _file(root, 'flair')
  with open(path, 'rb') as f:
    blob = f.read()
  with open(path, 'wb') as f:
    f.write(blob[:len(blob) // 2])
  _expect(root, f'{CID}_flair.nii.gz', 'unreadable or truncated')


def test_truncated_uncompressed(root):
  path = _file(root, 't2')
  with gzip.open(path) as f:
    blob = f.read()
  os.remove(path)
  with open(path[:-3], 'wb') as f:
    f.write(blob[:len(blob) // 2])
  _expect(root, f'{CID}_t2.nii', 'unreadable or truncated')


def test_not_a_nifti_file(root):
  with open(_file(root, 't1'), 'wb') as f:
    f.write(b'<html>this is a download error page, not an MRI</html>' * 20)
  _expect(root, f'{CID}_t1.nii.gz', 'unreadable')
  # Also a valid gzip holding something else.
  with gzip.open(_file(root, 't1'), 'wb') as f:
    f.write(b'not a nifti header' * 100)
  _expect(root, f'{CID}_t1.nii.gz', 'unreadable')


def test_shape_mismatch(root):
  path = _file(root, 't2')
  data = np.asanyarray(nib.load(path).dataobj)[:, :, :-2]
  _rewrite(path, data=data)
  _expect(root, f'{CID}_t2.nii.gz', 'shape', 'differs')


def test_affine_mismatch(root):
  path = _file(root, 't1')
  aff = nib.load(path).affine.copy()
  aff[0, 3] += 2.0
  _rewrite(path, affine=aff)
  _expect(root, f'{CID}_t1.nii.gz', 'affine differs', '2 mm')


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_non_finite_voxels(root, bad):
  path = _file(root, 't1ce')
  data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
  data[10, 10, 10:13] = bad
  _rewrite(path, data=data)
  _expect(root, f'{CID}_t1ce.nii.gz', '3 NaN or Inf voxels')


@pytest.mark.parametrize('value', [0, 120])
def test_constant_volume(root, value):
  path = _file(root, 'flair')
  _rewrite(path, data=np.full(SHAPE, value, np.int16))
  _expect(root, f'{CID}_flair.nii.gz', 'constant volume')


def test_label_values_outside_convention(root):
  path = _file(root, 'seg')
  seg = np.asanyarray(nib.load(path).dataobj).copy()
  seg[seg == 4] = 3          # a BraTS 2024 label in a BraTS 2021 case
  seg[0, 0, 0] = 7
  _rewrite(path, data=seg)
  problems = _expect(root, f'{CID}_seg.nii.gz', 'label values 3, 7', 'brats2021')
  assert '[0, 1, 2, 4]' in problems[0].message


def test_two_candidates_for_one_modality(root):
  path = _file(root, 't2')
  shutil.copy(path, path[:-3])     # X_t2.nii next to X_t2.nii.gz
  _expect(root, f'{CID}_t2.nii', '2 candidate files for t2')


def test_problems_are_all_reported(root):
  os.remove(_file(root, 't1'))
  _rewrite(_file(root, 'flair'), data=np.zeros(SHAPE, np.int16))
  messages = sorted(p.message for p in _problems(root))
  assert len(messages) == 2
  assert messages[0].startswith('constant volume') and messages[1].startswith('missing')


@pytest.mark.parametrize('bad_root', ['missing', 'empty', 'file', 'no_nifti'])
def test_empty_or_wrong_root(tmp_path, bad_root, capsys):
  path = tmp_path / 'r'
  if bad_root == 'empty':
    path.mkdir()
  elif bad_root == 'file':
    path.write_text('x')
  elif bad_root == 'no_nifti':
    (path / 'case1').mkdir(parents=True)
    (path / 'case1' / 'notes.txt').write_text('x')
  with pytest.raises(layouts.DataError, match=str(path)):
    layouts.discover_cases(str(path))
  assert check.main(['--root', str(path), '--quiet']) == 1
  assert 'ERROR' in capsys.readouterr().out
  cfg = brats.get_config('tiny')
  cfg.data.root = str(path)
  with pytest.raises(layouts.DataError):
    pipeline.make_split(cfg, str(tmp_path / 'wd'))


def test_unknown_layout_name(clean):
  with pytest.raises(ValueError, match='unknown data layout'):
    layouts.discover_cases(clean, 'brats2025')


def _config(root, **data):
  cfg = brats.get_config('tiny')
  cfg.data.root = root
  cfg.data.update(data)
  return cfg


def test_on_bad_case_error_and_skip(root, tmp_path):
  # CID is the first training case or not: put it in training explicitly.
  split = {'train': [CID, 'BraTS2021_00001'], 'val': [], 'test': ['BraTS2021_00002']}
  split_path = tmp_path / 'split.json'
  split_path.write_text(json.dumps(split))
  os.remove(_file(root, 't2'))
  cfg = _config(root, split_file=str(split_path), on_bad_case='error')
  with pytest.raises(layouts.BadCaseError, match=f'{CID}: {CID}_t2.nii.gz: missing'):
    pipeline.make_train_loader(pipeline.prepare(cfg, str(tmp_path / 'wd1'), progress=False),
                               1, seed=0, worker_count=0)
  cfg = _config(root, split_file=str(split_path), on_bad_case='skip')
  wd = tmp_path / 'wd2'
  loader = pipeline.make_train_loader(pipeline.prepare(cfg, str(wd), progress=False), 1,
                                      seed=0, worker_count=0)
  assert loader.case_ids == ['BraTS2021_00001']
  assert loader.skipped_cases == [CID]
  report = json.loads((wd / 'bad_cases.json').read_text())
  assert report['count'] == 1 and CID in report['skipped'][0][0]
  assert next(loader)['image'].shape == (1,) + tuple(cfg.data.input_shape) + (4,)
  loader.close()
  # A case fixed later is used again (no failure is cached).
  shutil.copy(_file(root, 'flair'), _file(root, 't2'))
  loader = pipeline.make_train_loader(pipeline.prepare(cfg, str(wd), progress=False), 1,
                                      seed=0, worker_count=0)
  assert loader.case_ids == [CID, 'BraTS2021_00001'] and not loader.skipped_cases
  with pytest.raises(ValueError, match="'error' or 'skip'"):
    pipeline.prepare(_config(root, on_bad_case='ignore'), str(wd))


def test_interrupted_cache_build_leaves_no_entry(root, tmp_path, monkeypatch):
  cases = layouts.discover_cases(root)
  settings = preprocess.Settings(input_shape=(32, 32, 32))
  real_save = np.save
  calls = []

  def dying_save(path, arr, *a, **k):
    calls.append(path)
    real_save(path, arr, *a, **k)
    if len(calls) == 1:           # image.npy written, then the process "dies"
      raise KeyboardInterrupt

  monkeypatch.setattr(np, 'save', dying_save)
  with pytest.raises(KeyboardInterrupt):
    cache.build_cache(cases[:1], settings, root, str(tmp_path / 'cache'), progress=False)
  monkeypatch.setattr(np, 'save', real_save)
  folder = cache.cache_folder(str(tmp_path / 'cache'), settings, root)
  assert not os.path.exists(os.path.join(folder, CID))
  assert not cache.entry_is_valid(os.path.join(folder, CID), cases[0])
  # A half-written entry put in place by hand (e.g. a copy cut short) is not taken either.
  half = os.path.join(folder, CID)
  os.makedirs(half)
  real_save(os.path.join(half, 'image.npy'), np.zeros((2, 2, 2, 4), np.float32))
  assert not cache.entry_is_valid(half, cases[0])
  _, entries, skipped = cache.build_cache(cases[:1], settings, root, str(tmp_path / 'cache'),
                                          progress=False)
  assert not skipped and cache.entry_is_valid(entries[CID], cases[0])
  image, codes = cache.load_arrays(entries[CID])
  assert image.shape[:3] == codes.shape and image.shape[3] == 4
  # A changed source file invalidates its entry, which is then rebuilt.
  os.utime(cases[0].seg, ns=(1, 1))
  assert not cache.entry_is_valid(entries[CID], cases[0])
  _, entries, _ = cache.build_cache(cases[:1], settings, root, str(tmp_path / 'cache'),
                                    progress=False)
  assert cache.entry_is_valid(entries[CID], cases[0])
  assert [n for n in os.listdir(folder) if n.startswith('.tmp')] == []
