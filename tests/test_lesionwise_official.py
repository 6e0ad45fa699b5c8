"""The lesion-wise metrics of evaluate_folder against the official BraTS code.

* --lesion_wise=brats2023 against the official BraTS 2023 script
  (https://github.com/rachitsaluja/BraTS-2023-Metrics, ``metrics.py`` with its own copy of
  surface-distance), run from a clone named by $BRATS2023_METRICS in the Python named by
  $BRATS2023_PYTHON (default: this one). That Python needs the script's requirements.txt
  (NumPy 1.24, pandas 1.3, SciPy, nibabel, cc3d; e.g. a Python 3.9 virtual environment with
  ``pip install -r requirements.txt``): it does not run under pandas 2. Skipped without them.
* --lesion_wise=brats2025 against the official package's own pipeline on the same files
  (``brats-evaluate`` then ``brats-parse-metrics seg``, called as functions); needs
  ``pip install ".[brats]"`` in a checkout (or ``pip install brats-evaluation panoptica``),
  skipped without it.

Each also has one case small enough to state its answer by hand. The cases are 16^3 to 32^3.
"""

import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from mstkd_jax import evaluate_folder, lesionwise

OFFICIAL_2023 = os.environ.get('BRATS2023_METRICS', '')


def _write(path, labels, zooms=(1.0, 1.0, 1.0)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.diag(list(zooms) + [1.0])), path)


def _ellipsoid(shape, center, radii):
  grid = np.indices(shape, dtype=np.float64)
  return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def _tumour(shape, rs, count):
  """BraTS 2024 labels: ``count`` lesions, each SNFH (2) around a core of NETC (1) and ET (3)."""
  labels = np.zeros(shape, np.uint8)
  for _ in range(count):
    center = rs.uniform(4, np.array(shape) - 4)
    radii = rs.uniform(1.2, 6.0, 3)
    labels[_ellipsoid(shape, center, radii)] = 2
    labels[_ellipsoid(shape, center, radii * 0.7)] = 3
    labels[_ellipsoid(shape, center, radii * 0.35)] = 1
  return labels


def _perturbed(labels, rs):
  """A prediction: shifted by up to a voxel, boundary voxels flipped, one false positive."""
  pred = np.roll(labels, tuple(rs.randint(-1, 2, 3)), axis=(0, 1, 2))
  edge = (pred > 0) & (rs.rand(*pred.shape) < 0.15)
  pred[edge] = rs.choice([0, 1, 2, 3], size=int(edge.sum()))
  blob = _ellipsoid(labels.shape, rs.uniform(3, np.array(labels.shape) - 3), rs.uniform(1, 3, 3))
  pred[blob & (pred == 0)] = rs.choice([2, 3])
  return pred


def _cases():
  """(name, reference, prediction, voxel size) of the comparisons."""
  out = []
  for seed in range(6):
    rs = np.random.RandomState(seed)
    shape = (32, 32, 24) if seed % 2 else (28, 28, 28)
    ref = _tumour(shape, rs, count=1 + seed % 4)
    out.append((f'BraTS-GLI-{seed:05d}-000', ref, _perturbed(ref, rs),
                (1.0, 1.0, 1.5) if seed == 3 else (1.0, 1.0, 1.0)))
  # A missed lesion, a predicted component that matches nothing, an empty region (no ET).
  ref = np.zeros((24, 24, 24), np.uint8)
  ref[2:8, 2:8, 2:8], ref[3:6, 3:6, 3:6], ref[14:20, 14:20, 14:20] = 2, 1, 2
  pred = np.zeros_like(ref)
  pred[2:8, 2:8, 3:9], pred[4:7, 3:6, 3:6], pred[14:17, 2:5, 14:17] = 2, 1, 2
  out.append(('BraTS-GLI-00100-000', ref, pred, (1.0, 1.0, 1.0)))
  return out


def _folders(tmp_path, cases):
  for name, ref, pred, zooms in cases:
    _write(str(tmp_path / 'ref' / f'{name}.nii.gz'), ref, zooms)
    _write(str(tmp_path / 'pred' / f'{name}.nii.gz'), pred, zooms)
  return tmp_path / 'pred', tmp_path / 'ref'


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _evaluate(tmp_path, cases, definition, challenge='BraTS-GLI'):
  """(evaluate_folder's lesion-wise rows {(case, region): row}, its output folder)."""
  pred, ref = _folders(tmp_path, cases)
  out = tmp_path / f'out-{definition}-{challenge}'
  evaluate_folder.evaluate_folder(str(pred), str(ref), str(out), labels='brats2024',
                                  lesion_wise=definition, challenge=challenge,
                                  log=lambda *_: None)
  name = evaluate_folder.LESION_FILES[definition]
  return {(r['case'], r['region']): r for r in _read_csv(out / name)}, out


# ---- BraTS 2023 ----

def test_brats2023_by_hand(tmp_path):
  """Two 4^3 ET lesions A and B; the prediction is A moved one voxel along z, and a 2^3
  component far from both. A is found (Dice 2 * 48 / 128 = 0.75; the corner-point surfaces of
  A and its copy are at distance 0 or 1, about a third of them at 1, so surface-distance's HD95 is
  1 mm), B is missed, the 2^3 component is a false positive: lesion-wise Dice
  (0.75 + 0) / 3 = 0.25, HD95 (1 + 374 + 374) / 3."""
  ref = np.zeros((20, 20, 20), np.uint8)
  pred = np.zeros_like(ref)
  ref[2:6, 2:6, 2:6] = ref[12:16, 12:16, 12:16] = 3
  pred[2:6, 2:6, 3:7] = pred[10:12, 2:4, 2:4] = 3
  rows, _ = _evaluate(tmp_path, [('BraTS-GLI-00001-000', ref, pred, (1.0, 1.0, 1.0))],
                      'brats2023')
  for region in ('WT', 'TC', 'ET'):
    row = rows['BraTS-GLI-00001-000', region]
    assert float(row['lesion_dice']) == pytest.approx(0.25)
    assert float(row['lesion_hd95']) == pytest.approx((1 + 374 + 374) / 3)
    assert (row['num_tp'], row['num_fn'], row['num_fp']) == ('1', '1', '1')


# Runs the official script on (prediction, reference, challenge) triples read as JSON from
# stdin; prints its results as JSON: [{region: {column: value}}].
_RUN_OFFICIAL_2023 = """
import json, sys
sys.path.insert(0, sys.argv[1])
import metrics
out = []
for pred, ref, challenge in json.load(sys.stdin):
  table = metrics.get_LesionWiseResults(pred, ref, challenge)
  out.append({row['Labels']: {k: float(row[k]) for k in ('LesionWise_Score_Dice',
              'LesionWise_Score_HD95', 'Num_TP', 'Num_FN', 'Num_FP')}
              for _, row in table.iterrows()})
print(json.dumps(out))
"""


@pytest.fixture(scope='module')
def official_2023():
  """A function running the official script on a list of (prediction file, reference file,
  challenge), in $BRATS2023_PYTHON (default: this interpreter), which needs the script's
  requirements (its requirements.txt: NumPy 1, pandas 1, cc3d, nibabel, SciPy)."""
  if not os.path.isfile(os.path.join(OFFICIAL_2023, 'metrics.py')):
    pytest.skip('set BRATS2023_METRICS to a clone of '
                'https://github.com/rachitsaluja/BraTS-2023-Metrics')
  python = os.environ.get('BRATS2023_PYTHON', sys.executable)
  probe = subprocess.run([python, '-c', 'import cc3d, nibabel, scipy, pandas; '
                          'print(pandas.__version__)'], capture_output=True, text=True)
  if probe.returncode or int(probe.stdout.split('.')[0]) >= 2:
    pytest.skip(f'{python} lacks the requirements of the official script (cc3d, nibabel, '
                'SciPy, pandas < 2): set BRATS2023_PYTHON')

  def run(triples):
    proc = subprocess.run([python, '-c', _RUN_OFFICIAL_2023, OFFICIAL_2023],
                          input=json.dumps(triples), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
  return run


def _assert_same_2023(rows, official, case):
  for region in ('WT', 'TC', 'ET'):
    mine, theirs = rows[case, region], official[region]
    assert float(mine['lesion_dice']) == pytest.approx(theirs['LesionWise_Score_Dice'],
                                                       abs=1e-12), (case, region)
    assert float(mine['lesion_hd95']) == pytest.approx(theirs['LesionWise_Score_HD95'],
                                                       abs=1e-9), (case, region)
    assert (int(mine['num_tp']), int(mine['num_fn']), int(mine['num_fp'])) == (
        int(theirs['Num_TP']), int(theirs['Num_FN']), int(theirs['Num_FP'])), (case, region)


@pytest.mark.parametrize('challenge', ['BraTS-GLI', 'BraTS-MEN', 'BraTS-MET'])
def test_brats2023_equals_the_official_script(tmp_path, official_2023, challenge):
  """Lesion-wise Dice, HD95 and TP / FN / FP of every case and region equal the official
  script's (dilation 3 or 1, minimum volume 50 or 2 mm^3; one case of 1 x 1 x 1.5 mm voxels)."""
  cases = _cases()
  rows, _ = _evaluate(tmp_path, cases, 'brats2023', challenge)
  official = official_2023([(str(tmp_path / 'pred' / f'{name}.nii.gz'),
                             str(tmp_path / 'ref' / f'{name}.nii.gz'), challenge)
                            for name, *_ in cases])
  for (name, *_), theirs in zip(cases, official):
    _assert_same_2023(rows, theirs, name)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRATS2018 = os.environ.get('MSTKD_BRATS2018',
                           os.path.join(os.path.dirname(REPO), 'shared', 'data', 'brats2018'))


def _real_cases(count):
  """(case id, BraTS 2021 labels, voxel size) of the first ``count`` real cases."""
  if not os.path.isdir(BRATS2018):
    pytest.skip(f'no BraTS 2018 cases at {BRATS2018}')
  out = []
  for case in sorted(os.listdir(BRATS2018))[:count]:
    image = nib.load(os.path.join(BRATS2018, case, f'{case}_seg.nii.gz'))
    out.append((case, np.asarray(image.dataobj).astype(np.uint8),
                tuple(float(z) for z in image.header.get_zooms())))
  return out


@pytest.mark.slow
def test_brats2023_equals_the_official_script_on_real_labels(tmp_path, official_2023):
  """Real BraTS 2018 labels (converted to the 2023 codes, 4 -> 3, for the official script)
  against perturbed copies of themselves (moved by a voxel, boundary voxels flipped, a false
  positive): every lesion-wise number of every region equals the official script's."""
  cases = []
  for seed, (case, labels, zooms) in enumerate(_real_cases(4)):
    labels = np.where(labels == 4, 3, labels).astype(np.uint8)
    cases.append((case, labels, _perturbed(labels, np.random.RandomState(seed)), zooms))
  rows, _ = _evaluate(tmp_path, cases, 'brats2023')
  official = official_2023([(str(tmp_path / 'pred' / f'{name}.nii.gz'),
                             str(tmp_path / 'ref' / f'{name}.nii.gz'), 'BraTS-GLI')
                            for name, *_ in cases])
  for (name, *_), theirs in zip(cases, official):
    _assert_same_2023(rows, theirs, name)


# ---- BraTS 2025 ----

@pytest.fixture(scope='module')
def official_2025():
  """The brats_evaluation module."""
  return pytest.importorskip('brats_evaluation',
                             reason='pip install brats-evaluation panoptica for the BraTS '
                             '2025 metrics')


@pytest.mark.usefixtures('official_2025')
def test_brats2025_by_hand(tmp_path):
  """The case of test_brats2023_by_hand under the 2025 definition: A matched with its moved
  copy (Dice 0.75; their surface voxels are 0 or 1 voxel apart, so HD95 1 mm and NSD 1 at the
  1 mm tolerance), B unmatched, the 2^3 component a false positive. Lesion-wise Dice 0.75 (the
  matched pair only), F1 = 1 / (1 + (1 + 1) / 2) = 0.5, PQ 0.375; whole-region Dice
  2 * 48 / (72 + 128) = 0.48."""
  ref = np.zeros((20, 20, 20), np.uint8)
  pred = np.zeros_like(ref)
  ref[2:6, 2:6, 2:6] = ref[12:16, 12:16, 12:16] = 3
  pred[2:6, 2:6, 3:7] = pred[10:12, 2:4, 2:4] = 3
  rows, out = _evaluate(tmp_path, [('BraTS-GLI-00001-000', ref, pred, (1.0, 1.0, 1.0))],
                        'brats2025')
  for region in ('WT', 'TC', 'ET'):
    row = rows['BraTS-GLI-00001-000', region]
    expected = {'lesion_dice': 0.75, 'lesion_hd95': 1.0, 'lesion_nsd': 1.0, 'pq': 0.375,
                'global_dice': 0.48}
    assert {k: float(row[k]) for k in expected} == pytest.approx(expected)
    assert (row['num_tp'], row['num_fn'], row['num_fp']) == ('1', '1', '1')
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['lesion_wise_definition'] == 'brats2025'
  assert summary['lesion_wise']['ET']['pq']['mean'] == pytest.approx(0.375)
  assert 'PQ (%)' in (out / 'table.md').read_text()


def _official_2025_csv(brats_evaluation, pred_dir, ref_dir, config, tmp_path):
  """What brats-evaluate --config CONFIG then brats-parse-metrics (seg; mets for the mets
  config, with its default thresholds) write, by their own functions, on the files:
  {subject: row}."""
  from panoptica import Panoptica_Evaluator  # pylint: disable=import-outside-toplevel
  with contextlib.redirect_stdout(io.StringIO()):
    evaluator = Panoptica_Evaluator.load_from_config(str(brats_evaluation.config_path(config)))
    results = [brats_evaluation.evaluate_single_exam(str(pred_dir / name), str(ref_dir / name),
                                                     name.split('.')[0], evaluator)
               for name in sorted(os.listdir(ref_dir))]
    json_path, csv_path = tmp_path / 'official.json', tmp_path / 'official.csv'
    json_path.write_text(json.dumps({'metrics': results, 'missings': []}))
    if config == 'mets':
      brats_evaluation.parse_mets_results(str(json_path), 20.0, 0.1, str(csv_path))
    else:
      brats_evaluation.parse_seg_results(str(json_path), str(csv_path))
  return {row['subject_id']: row for row in _read_csv(csv_path)}


@pytest.mark.parametrize('challenge,config', [('BraTS-GLI', 'gli'), ('BraTS-MEN', 'MenPre'),
                                              ('BraTS-MET', 'mets')])
def test_brats2025_equals_the_official_package(tmp_path, official_2025, challenge, config):
  """Every number of the official CSV, per case and group (WT, TC, ET and the labels' own
  groups), equals ours; BraTS 2021 label files (4 = ET) give the same numbers."""
  cases = [c for c in _cases() if c[3] == (1.0, 1.0, 1.0)]   # isotropic, as BraTS images
  rows, out = _evaluate(tmp_path, cases, 'brats2025', challenge)
  official = _official_2025_csv(official_2025, tmp_path / 'pred', tmp_path / 'ref', config,
                                tmp_path)
  ours = {row['subject_id']: row for row in _read_csv(out / 'brats2025_metrics.csv')}
  for name, *_ in cases:
    theirs = official[name]
    for column, value in theirs.items():
      if column != 'subject_id':
        assert ours[name][column] == value or float(ours[name][column]) == pytest.approx(
            float(value), abs=1e-12), (name, column)
    for region, group in (('WT', 'wt'), ('TC', 'tc'), ('ET', 'et')):
      row = rows[name, region]
      assert float(row['lesion_dice']) == pytest.approx(
          float(theirs[f'lesionwise_dsc_mean_{group}'] or 'nan'), nan_ok=True)
      assert int(row['num_fp']) == int(float(theirs[f'all_instance_fp_{group}']))
  old = tmp_path / 'brats2021'
  for name, ref, pred, zooms in cases:
    to_2021 = np.array([0, 1, 2, 4], np.uint8)
    _write(str(old / 'ref' / f'{name}.nii.gz'), to_2021[ref], zooms)
    _write(str(old / 'pred' / f'{name}.nii.gz'), to_2021[pred], zooms)
  evaluate_folder.evaluate_folder(str(old / 'pred'), str(old / 'ref'), str(old / 'out'),
                                  labels='brats2021', lesion_wise='brats2025',
                                  challenge=challenge, log=lambda *_: None)
  again = _read_csv(old / 'out' / 'lesion_wise_brats2025.csv')
  assert again == _read_csv(out / 'lesion_wise_brats2025.csv')
