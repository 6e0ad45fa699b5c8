"""Case discovery, layout detection, label conventions and the train/val/test split."""

import json
import os
import shutil

import numpy as np
import pytest

from configs import brats
from mstkd_jax.data import layouts
from mstkd_jax.data import pipeline
from mstkd_jax.data import preprocess
from mstkd_jax.data import synthetic

SHAPE = (40, 40, 32)


@pytest.fixture(scope='module')
def roots(tmp_path_factory):
  base = tmp_path_factory.mktemp('layouts')
  out = {}
  for layout in ('brats2021', 'brats2024'):
    out[layout] = synthetic.generate_dataset(str(base / layout), 3, SHAPE, layout, seed=1)
  return out


def test_file_names_of_both_layouts(roots):
  cid = synthetic.case_id(0, 'brats2024')
  assert cid == 'BraTS-GLI-00000-000'
  assert sorted(os.listdir(os.path.join(roots['brats2024'], cid))) == sorted(
      f'{cid}-{k}.nii.gz' for k in ('t2f', 't1n', 't1c', 't2w', 'seg'))
  cid = synthetic.case_id(0, 'brats2021')
  assert sorted(os.listdir(os.path.join(roots['brats2021'], cid))) == sorted(
      f'{cid}_{k}.nii.gz' for k in ('flair', 't1', 't1ce', 't2', 'seg'))


@pytest.mark.parametrize('layout', ['brats2021', 'brats2024'])
def test_auto_detection_and_channel_order(roots, layout):
  cases = layouts.discover_cases(roots[layout])
  assert [c.layout for c in cases] == [layout] * 3
  assert [c.case_id for c in cases] == sorted(c.case_id for c in cases)
  lay = layouts.LAYOUTS[layout]
  for case in cases:
    assert not case.problems
    # Channel order FLAIR, T1, T1Gd, T2 whatever the file naming.
    for path, key in zip(case.images, lay.image_keys):
      assert path.endswith(f'{lay.sep}{key}.nii.gz')
    assert case.seg.endswith(f'{lay.sep}seg.nii.gz')
  # Named explicitly (also through an alias) gives the same.
  alias = 'fets' if layout == 'brats2021' else 'brats2023'
  assert [c.images for c in layouts.discover_cases(roots[layout], alias)] == \
      [c.images for c in cases]


def test_t1_does_not_match_t1ce(tmp_path):
  folder = tmp_path / 'X1'
  folder.mkdir()
  for key in ('flair', 't1ce', 't2', 'seg'):
    (folder / f'X1_{key}.nii.gz').write_bytes(b'')
  case = layouts.describe_case(str(folder))
  assert case.layout == 'brats2021'
  assert case.images[1] is None and case.images[2].endswith('_t1ce.nii.gz')
  assert [p.message for p in case.problems] == ['missing modality file (t1, brats2021 layout)']
  assert case.problems[0].file == 'X1_t1.nii.gz'


def test_nested_folders_and_plain_nii(tmp_path, roots):
  # BraTS 2018 style: <root>/HGG/<ID>/..., with uncompressed .nii files.
  src = layouts.discover_cases(roots['brats2021'])[0]
  dst = tmp_path / 'HGG' / src.case_id
  dst.mkdir(parents=True)
  for path in src.files:
    img = preprocess.nib.load(path)
    preprocess.nib.save(img, str(dst / os.path.basename(path)[:-3]))   # .nii.gz -> .nii
  cases = layouts.discover_cases(str(tmp_path))
  assert [c.case_id for c in cases] == [src.case_id]
  assert all(p.endswith('.nii') for p in cases[0].files)
  raw = preprocess.read_case(cases[0])
  ref = preprocess.read_case(src)
  np.testing.assert_array_equal(raw.image, ref.image)
  np.testing.assert_array_equal(raw.codes, ref.codes)


@pytest.mark.parametrize('layout', ['brats2021', 'brats2024'])
def test_label_mapping_to_channels_and_regions(roots, layout):
  lay = layouts.LAYOUTS[layout]
  et = 4 if layout == 'brats2021' else 3
  for case in layouts.discover_cases(roots[layout]):
    seg = np.asanyarray(preprocess.nib.load(case.seg).dataobj)
    raw = preprocess.read_case(case)
    onehot = layouts.codes_to_onehot(raw.codes)
    np.testing.assert_array_equal(onehot[..., 0], seg == 1)
    np.testing.assert_array_equal(onehot[..., 1], seg == 2)
    np.testing.assert_array_equal(onehot[..., 2], seg == et)
    np.testing.assert_array_equal(onehot.sum(-1), 1)
    masks = layouts.region_masks(raw.codes)
    np.testing.assert_array_equal(masks['WT'], np.isin(seg, [1, 2, et]))
    np.testing.assert_array_equal(masks['TC'], np.isin(seg, [1, et]))
    np.testing.assert_array_equal(masks['ET'], seg == et)
    # And back to the layout's own values.
    np.testing.assert_array_equal(layouts.codes_to_labels(raw.codes, lay.name), seg)


def test_resection_cavity_is_background():
  codes = layouts.labels_to_codes(np.array([0, 1, 2, 3, 4]), 'brats2024')
  np.testing.assert_array_equal(codes, [0, 1, 2, 3, 4])
  onehot = layouts.codes_to_onehot(codes)
  np.testing.assert_array_equal(onehot.argmax(-1), [3, 0, 1, 2, 3])
  assert not layouts.region_masks(codes)['WT'][4]
  codes21 = layouts.labels_to_codes(np.array([0, 1, 2, 4]), 'brats2021')
  np.testing.assert_array_equal(codes21, [0, 1, 2, 3])
  # A synthetic 2024 data set has resection cavities in some cases.
  found = [synthetic.generate_case((32, 32, 28), 'brats2024', 0, i)[1] for i in range(12)]
  assert any((s == 4).any() for s in found)
  assert all(set(np.unique(s)) <= {0, 1, 2, 3, 4} for s in found)


def _config(root, **data):
  c = brats.get_config('tiny')
  c.data.root = root
  c.data.update(data)
  return c


def test_split_is_seeded_written_and_reused(roots, tmp_path):
  cfg = _config(roots['brats2021'], split=(0.34, 0.33, 0.33))
  a = pipeline.make_split(cfg, str(tmp_path / 'a'))
  assert sorted(a['train'] + a['val'] + a['test']) == \
      [c.case_id for c in layouts.discover_cases(roots['brats2021'])]
  assert [len(a[k]) for k in ('train', 'val', 'test')] == [1, 1, 1]
  with open(tmp_path / 'a' / 'split.json') as f:
    saved = json.load(f)
  assert {k: saved[k] for k in a} == a and saved['seed'] == 0
  b = pipeline.make_split(cfg, str(tmp_path / 'b'))
  assert a == b
  # An existing split.json wins over changed fractions (reproducible resumption).
  cfg2 = _config(roots['brats2021'], split=(1.0, 0.0, 0.0))
  assert pipeline.make_split(cfg2, str(tmp_path / 'a')) == a
  # A named split file is read as is.
  path = tmp_path / 'mine.json'
  mine = {'train': ['BraTS2021_00002'], 'val': [], 'test': ['BraTS2021_00000']}
  path.write_text(json.dumps(mine))
  cfg3 = _config(roots['brats2021'], split_file=str(path))
  assert pipeline.make_split(cfg3, str(tmp_path / 'c')) == mine
  assert not (tmp_path / 'c' / 'split.json').exists()
  path.write_text(json.dumps({**mine, 'test': ['NoSuchCase']}))
  with pytest.raises(layouts.DataError, match='NoSuchCase'):
    pipeline.make_split(cfg3, str(tmp_path / 'c'))


def test_split_counts():
  assert pipeline.split_counts(1250, (0.7, 0.1, 0.2)) == (875, 125, 250)
  assert pipeline.split_counts(4, (0.7, 0.1, 0.2)) == (2, 1, 1)
  assert pipeline.split_counts(2, (0.7, 0.1, 0.2)) == (1, 0, 1)
  assert pipeline.split_counts(1, (0.7, 0.1, 0.2)) == (1, 0, 0)
  assert pipeline.split_counts(10, (0.8, 0.0, 0.2)) == (8, 0, 2)
  with pytest.raises(ValueError, match='sum'):
    pipeline.split_counts(10, (0.8, 0.1, 0.2))


def test_resolve_root_generates_synthetic_cases_once(tmp_path):
  cfg = brats.get_config('tiny')
  cfg.data.synthetic_cases = 2
  cfg.data.synthetic_shape = (32, 32, 28)
  root = pipeline.resolve_root(cfg, str(tmp_path))
  assert root == str(tmp_path / 'synthetic')
  cases = layouts.discover_cases(root)
  assert len(cases) == 2 and all(not c.problems for c in cases)
  stamp = os.path.getmtime(cases[0].seg)
  assert pipeline.resolve_root(cfg, str(tmp_path)) == root
  assert os.path.getmtime(cases[0].seg) == stamp
  # Asking for other synthetic cases in the same folder fails clearly.
  cfg.data.synthetic_shape = (36, 36, 28)
  with pytest.raises(ValueError, match='already holds synthetic cases'):
    pipeline.resolve_root(cfg, str(tmp_path))
  shutil.rmtree(root)


def test_the_label_convention_of_a_run_is_recorded(roots, tmp_path):
  """Training records the convention its cases actually used ('auto' resolved for the run),
  and a root that mixes both is recorded as such (each case keeps its own reading)."""
  for layout in ('brats2021', 'brats2024'):
    cases = layouts.discover_cases(roots[layout], 'auto')
    workdir = str(tmp_path / layout)
    os.makedirs(workdir)
    record = pipeline.record_label_convention(workdir, roots[layout], cases)
    assert record['convention'] == layout and record['cases'] == {layout: 3}
    assert pipeline.read_label_convention(workdir) == record
  mixed_root = tmp_path / 'mixed'
  shutil.copytree(roots['brats2021'], mixed_root / 'old')
  shutil.copytree(roots['brats2024'], mixed_root / 'new')
  cases = layouts.discover_cases(str(mixed_root), 'auto')
  assert layouts.label_convention(cases) == ('mixed', {'brats2021': 3, 'brats2024': 3})
  record = pipeline.record_label_convention(str(tmp_path), str(mixed_root), cases)
  assert record['convention'] == 'mixed'
  assert pipeline.read_label_convention(str(tmp_path / 'nowhere')) is None
