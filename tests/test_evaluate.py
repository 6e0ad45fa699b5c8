"""The 15-subset evaluation: files, table layout, agreement of table / summary / CSV, the best
checkpoint, validation, and the sliding-window inference."""

import csv
import json
import os

import numpy as np
import pytest

from mstkd_jax import evaluate
from mstkd_jax import inference as inference_lib
from mstkd_jax import metrics
from mstkd_jax import report
from mstkd_jax.data import pipeline
from mstkd_jax.models import build
from mstkd_jax.modalities import ALL_SUBSETS, masked_copies, parse_subsets, subset_name
from tests import helpers_eval


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  return helpers_eval.trained_run(tmp_path_factory)


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_table_title_names_the_variant():
  from configs import brats
  assert evaluate._student_kind(brats.get_config('tiny')) == 'MST-KDNet student'
  assert evaluate._student_kind(brats.get_config('tiny,plain')) == \
      'Student trained without distillation'
  # One distillation term left on is still MST-KDNet (an ablation, not the plain student).
  assert evaluate._student_kind(brats.get_config('tiny,no_mstkd')) == 'MST-KDNet student'


def test_window_starts_cover_the_box():
  assert inference_lib.window_starts((32, 32, 32), (32, 32, 32)) == [(0, 0, 0)]
  starts = inference_lib.window_starts((70, 85, 32), (32, 32, 32), overlap=0.5)
  xs, ys = sorted({s[0] for s in starts}), sorted({s[1] for s in starts})
  assert xs[0] == 0 and xs[-1] == 70 - 32 and ys[-1] == 85 - 32
  assert max(np.diff(xs)) <= 16 and max(np.diff(ys)) <= 16   # at least 50 % overlap
  covered = np.zeros((70, 85, 32), bool)
  for s in starts:
    covered[s[0]:s[0] + 32, s[1]:s[1] + 32, s[2]:s[2] + 32] = True
  assert covered.all()
  with pytest.raises(ValueError, match='smaller than the window'):
    inference_lib.window_starts((20, 32, 32), (32, 32, 32))
  w = inference_lib.blend_weights((32, 32, 32))
  assert w.min() > 0 and w.max() == 1.0 and w[16, 16, 16] == 1.0


def test_training_run_writes_the_report(run):
  out = os.path.join(run.workdir, 'eval')
  rows = read_csv(os.path.join(out, 'per_case.csv'))
  with open(os.path.join(run.workdir, 'split.json')) as f:
    test_ids = json.load(f)['test']
  # every test case x (15 subsets + the teacher) x 3 regions
  assert len(rows) == len(test_ids) * 16 * 3
  assert {r['subset'] for r in rows} == set(report.SUBSET_NAMES) | {report.TEACHER_SUBSET}
  assert {r['case'] for r in rows} == set(test_ids)

  with open(os.path.join(out, 'table.md')) as f:
    table = f.read()
  header = next(line for line in table.splitlines() if line.startswith('| Metric'))
  columns = [c.strip() for c in header.strip('|').split('|')][2:]
  assert columns == [subset_name(s) for s in ALL_SUBSETS] + ['Avg']
  assert len(columns) == 16

  # summary.json and the table are the means of the CSV rows.
  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['hd95_convention'] == 'brats' and summary['split'] == 'test'
  body = [line for line in table.splitlines() if line.startswith('| ') and '---' not in line][1:]
  for name_index, name in enumerate(report.SUBSET_NAMES):
    for k, region in enumerate(('WT', 'TC', 'ET')):
      values = [(float(r['dice']), float(r['hd95'])) for r in rows
                if r['subset'] == name and r['region'] == region]
      dice, hd95 = np.mean(values, axis=0)
      assert summary['subsets'][name][region]['dice'] == pytest.approx(dice)
      assert summary['subsets'][name][region]['hd95'] == pytest.approx(hd95)
      dice_cell = body[k].strip('|').split('|')[2 + name_index].strip()
      hd_cell = body[3 + k].strip('|').split('|')[2 + name_index].strip()
      assert float(dice_cell) == pytest.approx(100 * dice, abs=0.006)
      assert float(hd_cell) == pytest.approx(hd95, abs=0.006)
  for region in ('WT', 'TC', 'ET'):
    avg = np.mean([summary['subsets'][n][region]['dice'] for n in report.SUBSET_NAMES])
    assert summary['average_over_subsets'][region]['dice'] == pytest.approx(avg)
  assert 'teacher' in summary


def test_best_checkpoint_and_validation_agree(run):
  # The run validated at its last step and saved it with that Dice: 'best' resolves to it.
  with open(os.path.join(run.workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  val = [r for r in records if 'val_dice' in r]
  assert val, 'the training loop did not validate'
  summary = evaluate.evaluate_checkpoint(run.config, run.workdir, 'best', split='val')
  out = os.path.join(run.workdir, 'eval_val')
  rows = [r for r in read_csv(os.path.join(out, 'per_case.csv'))
          if r['subset'] != report.TEACHER_SUBSET]
  # The validator's mean Dice (centre window, 15 subsets) equals the mean of the eval's rows.
  per_region = {g: np.mean([float(r['dice']) for r in rows if r['region'] == g])
                for g in ('WT', 'TC', 'ET')}
  assert val[-1]['val_dice'] == pytest.approx(np.mean(list(per_region.values())), abs=1e-6)
  assert summary['source'].startswith('step 2')


def test_validator_full_subset_only(run):
  config = helpers_eval.tiny_eval_config()
  config.eval.val_subsets = 'full'
  dataset = pipeline.prepare(config, run.workdir, splits=('val',), progress=False)
  result = evaluate.make_validator(config, dataset)(run.state, 1)
  assert set(result) == {'dice', 'dice_WT', 'dice_TC', 'dice_ET', 'teacher_dice',
                         'teacher_dice_WT', 'teacher_dice_TC', 'teacher_dice_ET'}
  assert 0.0 <= result['dice'] <= 1.0


def test_sliding_windows_blend_window_outputs(run):
  inference = inference_lib.get_inference(run.config)
  variables = inference.place(build.network_variables(run.state, 'student'))
  rs = np.random.RandomState(0)
  box = rs.rand(1, 40, 32, 32, 4).astype(np.float32)
  blended = inference.predict(variables, box, overlap=0.5, blend='uniform')
  assert blended.shape == (1, 40, 32, 32, 4)
  first = inference.run(variables, box[:, :32])
  last = inference.run(variables, box[:, 8:])
  # Voxels seen by one window only carry that window's output; shared ones the mean.
  np.testing.assert_allclose(blended[0, :8], first[0, :8], atol=1e-6)
  np.testing.assert_allclose(blended[0, 32:], last[0, 24:], atol=1e-6)
  np.testing.assert_allclose(blended[0, 8:32], (first[0, 8:] + last[0, :24]) / 2, atol=1e-6)
  # A box of the input size is one window.
  np.testing.assert_allclose(inference.predict(variables, box[:, :32]), first, atol=1e-6)


def _reference_rows(config, cases, student, teacher, sliding_window):
  """The rows as the evaluation computed them before its device-side scoring: probabilities
  on the host, ``metrics.case_metrics`` per output."""
  inference = inference_lib.get_inference(config)
  student, teacher = inference.place(student), inference.place(teacher)
  run = inference.predict if sliding_window else inference.run
  rows = []
  for case in cases:
    outputs = dict(zip(ALL_SUBSETS, run(student, masked_copies(case.image, ALL_SUBSETS))))
    outputs[report.TEACHER_SUBSET] = run(teacher, case.image[None])[0]
    truth = metrics.region_masks(case.label)
    for subset, probs in outputs.items():
      rows += report.metric_rows(case.case_id, subset, metrics.case_metrics(
          metrics.region_masks(probs), truth, case.spacing))
  return rows


@pytest.mark.parametrize('sliding_window', [False, True])
def test_evaluation_numbers_equal_the_metric_functions(run, sliding_window):
  dataset = pipeline.prepare(run.config, run.workdir, splits=('test',), progress=False)
  cases = pipeline.load_eval_cases(dataset, 'test', full_box=sliding_window)
  student = build.network_variables(run.state, 'student')
  teacher = build.network_variables(run.state, 'teacher')
  rows = evaluate.evaluate_cases(run.config, cases, student, teacher,
                                 sliding_window=sliding_window, progress=False)
  assert rows == _reference_rows(run.config, cases, student, teacher, sliding_window)


def test_validation_dice_equals_the_metric_function(run):
  config = helpers_eval.tiny_eval_config()
  dataset = pipeline.prepare(config, run.workdir, splits=('val',), progress=False)
  result = evaluate.make_validator(config, dataset)(run.state, 1)
  inference = inference_lib.get_inference(config)
  subsets = parse_subsets('all')
  for network, prefix, chosen in (('student', 'dice', subsets), ('teacher', 'teacher_dice',
                                                                  subsets[-1:])):
    variables = inference.place(build.network_variables(run.state, network))
    values = {region: [] for region in metrics.REGIONS}
    for case in pipeline.load_eval_cases(dataset, 'val'):
      truth = metrics.region_masks(case.label)
      for probs in inference.run(variables, masked_copies(case.image, chosen)):
        pred = metrics.region_masks(probs)
        for region in metrics.REGIONS:
          values[region].append(metrics.dice(pred[region], truth[region]))
    for region in metrics.REGIONS:
      assert result[f'{prefix}_{region}'] == float(np.mean(values[region]))
