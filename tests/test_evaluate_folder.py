"""evaluate_folder (scores any tool's segmentations) and the BraTS 2023+ lesion-wise metrics,
against cases small enough to compute by hand."""

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from mstkd_jax import evaluate_folder, lesionwise, lesionwise_brats2025, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cube(mask, corner, size):
  x, y, z = corner
  mask[x:x + size, y:y + size, z:z + size] = True


# ---- lesion-wise, by hand ----

def test_lesion_wise_hit_miss_false_positive_and_small_lesion():
  """Reference: A (4^3 = 64 voxels), C (64, missed), S (2^3 = 8 <= 50 mm^3: left out).
  Prediction: exactly A, a component touching S (neither scored nor a false positive), and
  one far from everything (a false positive). By the definition:
  Dice = (1 + 0) / (2 kept lesions + 1 FP) = 1/3, HD95 = (0 + 374 + 374) / 3."""
  true = np.zeros((40, 40, 40), bool)
  pred = np.zeros_like(true)
  _cube(true, (2, 2, 2), 4)
  _cube(true, (20, 20, 20), 4)
  _cube(true, (2, 30, 2), 2)
  _cube(pred, (2, 2, 2), 4)
  _cube(pred, (2, 31, 2), 2)        # overlaps S
  _cube(pred, (34, 2, 34), 3)       # far away
  s = lesionwise.lesion_wise(pred, true, spacing=(1, 1, 1), dilation=3, min_volume=50)
  assert (s.num_tp, s.num_fn, s.num_fp) == (1, 1, 1)
  assert s.dice == pytest.approx(1 / 3)
  assert s.hd95 == pytest.approx(2 * 374 / 3)
  assert [lesion[0] for lesion in s.lesions] == [64.0, 64.0]


def test_lesion_wise_partial_overlap_and_merged_predictions():
  """One reference lesion (x = 2..5, 4^3 voxels) met by two predicted pieces (x = 2..3 and
  x = 5..6): their union is scored. Union 64 voxels, of which x = 2, 3, 5 meet the reference
  (48): Dice = 2 * 48 / (64 + 64) = 0.75; no false positive."""
  true = np.zeros((20, 20, 20), bool)
  pred = np.zeros_like(true)
  _cube(true, (2, 2, 2), 4)                     # x in 2..5
  pred[2:4, 2:6, 2:6] = True                    # x = 2, 3
  pred[5:7, 2:6, 2:6] = True                    # x = 5, 6 (a separate component)
  s = lesionwise.lesion_wise(pred, true, spacing=1.0, dilation=3, min_volume=50)
  assert (s.num_tp, s.num_fn, s.num_fp) == (1, 0, 0)
  assert s.dice == pytest.approx(0.75)


def test_nearby_reference_components_are_one_lesion():
  """Two 4^3 components 2 voxels apart merge under the dilation (3), not without it."""
  true = np.zeros((30, 30, 30), bool)
  _cube(true, (2, 2, 2), 4)
  _cube(true, (8, 2, 2), 4)
  pred = true.copy()
  merged = lesionwise.lesion_wise(pred, true, dilation=3, min_volume=50)
  apart = lesionwise.lesion_wise(pred, true, dilation=0, min_volume=50)
  assert len(merged.lesions) == 1 and len(apart.lesions) == 2
  assert merged.dice == pytest.approx(1.0) and apart.dice == pytest.approx(1.0)


def test_lesion_wise_empty_cases_and_spacing():
  empty = np.zeros((10, 10, 10), bool)
  s = lesionwise.lesion_wise(empty, empty)
  assert (s.dice, s.hd95) == (1.0, 0.0)
  one = empty.copy()
  _cube(one, (2, 2, 2), 4)       # 64 voxels: kept at 1 mm, left out at 0.5 mm (8 mm^3)
  assert lesionwise.lesion_wise(empty, one, spacing=1.0).num_fn == 1
  small = lesionwise.lesion_wise(empty, one, spacing=0.5)
  assert (small.num_fn, small.dice, small.hd95) == (0, 1.0, 0.0)
  with pytest.raises(ValueError, match='unknown challenge'):
    lesionwise.challenge_parameters('BraTS-XYZ')


def test_lesion_hd95_is_the_surface_element_percentile_of_the_official_script():
  """Reference: two voxels in a row; prediction: the first. The official HD95
  (surface-distance) works on the corner points of the voxels: the reference's 12 corners are
  at distance 0 from the prediction's surface except the 4 of its far end, at 1 voxel, which
  hold more than 5 % of the surface area, so its HD95 is 1 voxel, a distance that occurs (no
  interpolation). MedPy's voxel HD95 interpolates between the voxels' distances 0, 0, 1: 0.9.
  At 4 mm voxels the lesion (128 mm^3) counts: Dice 2/3, HD95 4 mm."""
  true = np.zeros((8, 8, 8), bool)
  true[2:4, 3, 3] = True
  pred = np.zeros_like(true)
  pred[2, 3, 3] = True
  assert lesionwise.surfel_hd95(pred, true) == 1.0
  assert metrics.hd95(pred, true) == pytest.approx(0.9)
  s = lesionwise.lesion_wise(pred, true, spacing=4.0)
  assert (s.num_tp, s.num_fn, s.num_fp) == (1, 0, 0)
  assert (s.dice, s.hd95) == (pytest.approx(2 / 3), 4.0)
  # The spacing goes with its axis: the same pair along the third axis, 8 mm there.
  along_z = lesionwise.lesion_wise(np.moveaxis(pred, 0, 2), np.moveaxis(true, 0, 2),
                                   spacing=(4.0, 4.0, 8.0))
  assert along_z.hd95 == 8.0
  with pytest.raises(ValueError, match='non-empty'):
    lesionwise.surfel_hd95(pred & False, true)


def test_lesion_wise_csv_and_per_case_csv_say_which_hd95(tmp_path):
  """per_case.csv's hd95 is MedPy's (0.9 voxel for the pair above), lesion_wise.csv's
  lesion_hd95 the official 2023 one (1 voxel), at 4 mm voxels."""
  seg = np.zeros((8, 8, 8), np.uint8)
  seg[2:4, 3, 3] = 3
  pred = np.zeros_like(seg)
  pred[2, 3, 3] = 3
  _write(str(tmp_path / 'ref' / 'A.nii.gz'), seg, zooms=(4, 4, 4))
  _write(str(tmp_path / 'pred' / 'A.nii.gz'), pred, zooms=(4, 4, 4))
  summary = evaluate_folder.evaluate_folder(str(tmp_path / 'pred'), str(tmp_path / 'ref'),
                                            str(tmp_path / 'out'), labels='brats2024',
                                            lesion_wise='brats2023', log=lambda *_: None)
  with open(tmp_path / 'out' / 'per_case.csv') as f:
    assert [float(r['hd95']) for r in csv.DictReader(f)] == pytest.approx([3.6] * 3)
  with open(tmp_path / 'out' / 'lesion_wise.csv') as f:
    assert {float(r['lesion_hd95']) for r in csv.DictReader(f)} == {4.0}
  assert summary['lesion_wise_definition'] == 'brats2023'
  assert 'BraTS 2023' in (tmp_path / 'out' / 'table.md').read_text()


def test_lesion_wise_values_and_the_bare_flag():
  assert evaluate_folder.lesion_definition(True) == 'brats2023'
  assert evaluate_folder.lesion_definition(False) is None
  assert evaluate_folder.lesion_definition('none') is None
  assert evaluate_folder.lesion_definition('brats2025') == 'brats2025'
  with pytest.raises(evaluate_folder.EvaluationInputError, match='--lesion_wise must be one'):
    evaluate_folder.lesion_definition('brats2024')
  argv = evaluate_folder.lesion_wise_argv
  assert argv(['--lesion-wise', '--pred', 'p']) == ['--lesion_wise=brats2023', '--pred', 'p']
  assert argv(['--lesion_wise']) == ['--lesion_wise=brats2023']
  assert argv(['--lesion_wise', 'brats2025', '--ref', 'r']) == ['--lesion_wise=brats2025',
                                                                '--ref', 'r']
  assert argv(['--lesion_wise=brats2025']) == ['--lesion_wise=brats2025']
  assert argv(['--nolesion_wise']) == ['--lesion_wise=none']


def test_brats2025_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
  """Without brats-evaluation (an import that fails), one line naming the extra; BraTS-PED has
  no config of the glioma labels, whether or not the package is installed."""
  seg = _reference_case()
  _write(str(tmp_path / 'ref' / 'A.nii.gz'), seg)
  _write(str(tmp_path / 'pred' / 'A.nii.gz'), seg)
  monkeypatch.setitem(sys.modules, 'brats_evaluation', None)
  with pytest.raises(lesionwise_brats2025.MissingExtraError,
                     match=r'pip install "brats-evaluation>=0.0.10" "panoptica>=2.1.7"'):
    evaluate_folder.evaluate_folder(str(tmp_path / 'pred'), str(tmp_path / 'ref'),
                                    str(tmp_path / 'out'), lesion_wise='brats2025',
                                    log=lambda *_: None)
  assert not (tmp_path / 'out').exists()
  with pytest.raises(ValueError, match='no official config for .BraTS-PED'):
    evaluate_folder.evaluate_folder(str(tmp_path / 'pred'), str(tmp_path / 'ref'),
                                    str(tmp_path / 'out'), lesion_wise='brats2025',
                                    challenge='BraTS-PED', log=lambda *_: None)


# ---- the command ----

def _write(path, labels, zooms=(1.0, 1.0, 1.0)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  affine = np.diag(list(zooms) + [1.0])
  nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), path)


def _reference_case(with_et=True):
  seg = np.zeros((24, 24, 24), np.uint8)
  seg[4:12, 4:12, 4:12] = 2                 # oedema
  seg[6:10, 6:10, 6:10] = 1                 # core
  if with_et:
    seg[7:9, 7:9, 7:9] = 4                  # enhancing (BraTS 2021 code)
  return seg


def test_evaluate_folder_scores_case_folders_and_writes_the_report(tmp_path):
  ref, pred, out = tmp_path / 'ref', tmp_path / 'pred', tmp_path / 'out'
  seg = _reference_case()
  _write(str(ref / 'Case_001' / 'Case_001_seg.nii.gz'), seg)
  _write(str(ref / 'Case_001' / 'Case_001_flair.nii.gz'), seg * 0 + 1)
  _write(str(ref / 'Case_002' / 'Case_002_seg.nii.gz'), seg)
  _write(str(pred / 'Case_001.nii.gz'), seg)                     # perfect
  worse = seg.copy()
  worse[worse == 4] = 1                                           # ET missed
  _write(str(pred / 'Case_002.nii.gz'), worse)
  _write(str(pred / 'Other.nii.gz'), seg)                         # no reference: skipped
  summary = evaluate_folder.evaluate_folder(str(pred), str(ref), str(out), lesion_wise=True,
                                            log=lambda *_: None)
  assert summary['num_cases'] == 2
  assert summary['regions']['WT']['dice']['mean'] == pytest.approx(1.0)
  assert summary['regions']['ET']['dice']['mean'] == pytest.approx(0.5)
  with open(out / 'per_case.csv') as f:
    rows = list(csv.DictReader(f))
  et = {r['case']: float(r['dice']) for r in rows if r['region'] == 'ET'}
  assert et == {'Case_001': 1.0, 'Case_002': 0.0}
  with open(out / 'lesion_wise.csv') as f:
    lesions = list(csv.DictReader(f))
  # ET of 8 voxels is below the 50 mm^3 threshold: no lesion counted for either case.
  assert {r['case']: float(r['lesion_dice']) for r in lesions if r['region'] == 'WT'} == {
      'Case_001': 1.0, 'Case_002': 1.0}
  assert json.load(open(out / 'summary.json'))['lesion_wise']['WT']['num_tp'] == 2
  assert 'Lesion-wise Dice' in (out / 'table.md').read_text()


def test_evaluate_folder_flat_reference_and_brats2024_labels(tmp_path):
  seg = _reference_case()
  seg[seg == 4] = 3
  _write(str(tmp_path / 'labelsTr' / 'BraTS-GLI-00001-000.nii.gz'), seg, zooms=(2, 2, 2))
  _write(str(tmp_path / 'pred' / 'BraTS-GLI-00001-000.nii.gz'), seg, zooms=(2, 2, 2))
  summary = evaluate_folder.evaluate_folder(str(tmp_path / 'pred'), str(tmp_path / 'labelsTr'),
                                            str(tmp_path / 'out'), log=lambda *_: None)
  assert summary['regions']['ET']['dice']['mean'] == pytest.approx(1.0)
  assert summary['regions']['ET']['hd95']['mean'] == 0.0


def test_evaluate_folder_errors_name_the_files(tmp_path):
  seg = _reference_case()
  _write(str(tmp_path / 'ref' / 'A.nii.gz'), seg)
  _write(str(tmp_path / 'ref' / 'B.nii.gz'), seg)
  _write(str(tmp_path / 'pred' / 'A.nii.gz'), seg)
  kwargs = dict(log=lambda *_: None)
  with pytest.raises(evaluate_folder.EvaluationInputError, match='no prediction for 1 of 2.*B'):
    evaluate_folder.evaluate_folder(str(tmp_path / 'pred'), str(tmp_path / 'ref'),
                                    str(tmp_path / 'o'), **kwargs)
  skipped = evaluate_folder.evaluate_folder(str(tmp_path / 'pred'), str(tmp_path / 'ref'),
                                            str(tmp_path / 'o'), missing='skip', **kwargs)
  assert skipped['num_cases'] == 1
  empty = evaluate_folder.evaluate_folder(str(tmp_path / 'pred'), str(tmp_path / 'ref'),
                                          str(tmp_path / 'o'), missing='empty', **kwargs)
  assert empty['num_cases'] == 2
  assert empty['regions']['WT']['dice']['mean'] == pytest.approx(0.5)      # A 1, B 0
  assert empty['regions']['WT']['hd95']['mean'] == pytest.approx(373.13 / 2)
  _write(str(tmp_path / 'pred' / 'B.nii.gz'), seg[:20])
  with pytest.raises(evaluate_folder.EvaluationInputError, match='B.nii.gz: shape'):
    evaluate_folder.evaluate_folder(str(tmp_path / 'pred'), str(tmp_path / 'ref'),
                                    str(tmp_path / 'o'), **kwargs)
  bad = seg.copy()
  bad[0, 0, 0] = 7
  _write(str(tmp_path / 'pred' / 'B.nii.gz'), bad)
  with pytest.raises(evaluate_folder.EvaluationInputError, match='B.nii.gz: label values 7'):
    evaluate_folder.evaluate_folder(str(tmp_path / 'pred'), str(tmp_path / 'ref'),
                                    str(tmp_path / 'o'), **kwargs)


def _run(args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop('MSTKD_TRACEBACK', None)
  return subprocess.run([sys.executable, '-m', 'mstkd_jax.evaluate_folder'] + args,
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_evaluate_folder_command(tmp_path):
  seg = _reference_case()
  _write(str(tmp_path / 'ref' / 'A.nii.gz'), seg)
  _write(str(tmp_path / 'pred' / 'A.nii.gz'), seg)
  proc = _run(['--pred', str(tmp_path / 'pred'), '--ref', str(tmp_path / 'ref'),
               '--lesion-wise'])
  assert proc.returncode == 0, proc.stderr
  assert '| WT | 100.00' in proc.stdout
  assert (tmp_path / 'pred' / 'evaluation' / 'lesion_wise.csv').exists()
  proc = _run(['--pred', str(tmp_path / 'nothing'), '--ref', str(tmp_path / 'ref')])
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --pred')
  assert 'Traceback' not in proc.stderr
  proc = _run(['--help'])
  assert proc.returncode == 0 and '--lesion_wise' in proc.stdout and '``' not in proc.stdout
  proc = _run(['--pred', str(tmp_path / 'pred'), '--ref', str(tmp_path / 'ref'),
               '--lesion_wise=brats2024'])
  assert proc.returncode == 2 and 'brats2023' in proc.stderr and 'Traceback' not in proc.stderr


def test_evaluate_folder_command_brats2025_without_the_package(tmp_path):
  try:
    import brats_evaluation  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    pytest.skip('brats-evaluation is installed')
  except ImportError:
    pass
  seg = _reference_case()
  _write(str(tmp_path / 'ref' / 'A.nii.gz'), seg)
  _write(str(tmp_path / 'pred' / 'A.nii.gz'), seg)
  proc = _run(['--pred', str(tmp_path / 'pred'), '--ref', str(tmp_path / 'ref'),
               '--lesion_wise', 'brats2025'])
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: --lesion_wise=brats2025 needs')
  # mstkd-jax is on no package index: the hint installs the packages themselves (or the
  # extra from this checkout).
  assert '"mstkd-jax[brats]"' not in last
  assert 'pip install "brats-evaluation>=0.0.10" "panoptica>=2.1.7"' in last
  assert f'in the checkout {ROOT}: pip install ".[brats]"' in last


def test_the_install_hint_names_the_brats_extra_of_pyproject():
  import tomllib  # pylint: disable=import-outside-toplevel
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    extra = tomllib.load(f)['project']['optional-dependencies']['brats']
  assert tuple(extra) == lesionwise_brats2025.EXTRA_REQUIREMENTS


def test_labels_auto_reports_a_folder_that_mixes_conventions(tmp_path):
  """'auto' reads each file by its values; a folder whose files were read both ways is
  reported (a line and summary.json), not hidden."""
  seg21 = _reference_case()                 # ET = 4
  seg24 = seg21.copy()
  seg24[seg24 == 4] = 3                     # ET = 3
  for case, seg in (('A', seg21), ('B', seg21), ('C', seg24)):
    _write(str(tmp_path / 'ref' / f'{case}.nii.gz'), seg21)
    _write(str(tmp_path / 'pred' / f'{case}.nii.gz'), seg)
  lines = []
  summary = evaluate_folder.evaluate_folder(str(tmp_path / 'pred'), str(tmp_path / 'ref'),
                                            str(tmp_path / 'out'), log=lines.append)
  assert summary['label_conventions_read'] == {'pred': {'brats2021': 2, 'brats2024': 1},
                                               'ref': {'brats2021': 3}}
  warning = [line for line in lines if 'mixes label conventions' in line]
  assert len(warning) == 1 and '--pred' in warning[0] and '1 file(s) read as brats2024 (e.g. C)'\
      in warning[0]
  assert summary['label_convention_warnings'] == warning
  # One folder in each convention: a note, no warning.
  for case in ('A', 'B'):
    _write(str(tmp_path / 'pred' / f'{case}.nii.gz'), seg24)
  lines = []
  summary = evaluate_folder.evaluate_folder(str(tmp_path / 'pred'), str(tmp_path / 'ref'),
                                            str(tmp_path / 'out'), log=lines.append)
  assert lines == ['note: --labels auto: the predictions use brats2024 labels and the '
                   'references brats2021; each was read with its own']
