"""The benchmark scripts under experiments/ run (smoke sizes), so they cannot rot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers_scale import ROOT, xla_cache_dir


def _run(args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=xla_cache_dir(),
             PYTHONPATH=ROOT)
  return subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
  """experiments/gpu_check.py --smoke: the GPU check's every code path at :tiny size on the
  CPU, one JSON line per case, nothing failing."""
  out = tmp_path / 'gpu_check.jsonl'
  proc = _run(['experiments/gpu_check.py', '--smoke', '--steps', '2', '--warmup', '1',
               '--out', str(out), '--artifacts-dir', str(tmp_path / 'artifacts')])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  by_case = {line['case']: line for line in lines}
  assert set(by_case) == {'env', 'compile_init', 'compile_step_f32', 'compile_eval_f32', 'step_f32',
                          'eval_f32'}
  assert not any('error' in line for line in lines), lines
  assert by_case['env']['backend'] == 'cpu'
  # The cold-compile phase filled the cache that the measurements then read.
  assert by_case['compile_step_f32']['compile_s'] > 0
  assert by_case['step_f32']['cache_entries_at_start'] > 0
  step = by_case['step_f32']
  assert step['shape'] == [32, 32, 32] and step['finite']
  assert step['sec_per_step_median'] > 0 and step['compile_s'] > 0
  # The profile of one step: time by kind of operation, the slowest ten, the HLO kept.
  profile = step['profile']
  assert profile['kernel_total_ms'] > 0 and 'conv' in profile['by_kind_ms']
  assert len(profile['top10_kernels']) == 10
  assert (tmp_path / 'artifacts' / 'step_f32.hlo.txt.gz').exists()
  evaluation = by_case['eval_f32']
  # 15 subsets + the teacher, 3 regions, for each copy of the case
  assert evaluation['rows'] == evaluation['cases'] * 16 * 3
  assert evaluation['forwards_15_subsets_s'] > 0 and evaluation['scoring_host_16_outputs_s'] > 0
  assert evaluation['cases_per_minute'] > 0 and evaluation['ratio_to_forwards'] > 0


def test_gpu_check_reports_a_failing_case_and_goes_on(tmp_path):
  """A case that fails is one JSON line with its error; the next case still runs."""
  proc = _run(['experiments/gpu_check.py', '--smoke', '--cases', 'no_such_case,env'],
              timeout=300)
  assert proc.returncode == 1
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
  assert [line['case'] for line in lines] == ['no_such_case', 'env']
  assert 'error' in lines[0] and 'error' not in lines[1]


@pytest.mark.slow
def test_gpu_train_smoke(tmp_path):
  """experiments/gpu_train.py --smoke: the epoch end to end (validation included) and the
  short training run stopped by SIGTERM, exported, evaluated and copied back, on the CPU."""
  out = tmp_path / 'out'
  proc = _run(['experiments/gpu_train.py', '--smoke', '--out-dir', str(out), '--work',
               str(tmp_path / 'work')], timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  lines = [json.loads(line) for line in (out / 'gpu_train.jsonl').read_text().splitlines()]
  epoch, trained = lines
  assert epoch['case'] == 'epoch' and epoch['status'] == 0 and epoch['validation_included']
  assert epoch['steps'] >= 2 and epoch['volumes_per_s_end_to_end'] > 0
  assert epoch['volumes_per_s_end_to_end'] <= epoch['volumes_per_s_median'] * 1.5
  assert trained['case'] == 'cpu_real' and trained['train_status'] == 143   # SIGTERM: saved
  assert trained['export_status'] == 0 and trained['eval_status'] == 0 and trained['steps'] > 0
  kept = sorted(os.listdir(out / 'cpu_real'))
  assert kept == ['cpu_real.log', 'export.tar.gz', 'metrics.jsonl', 'per_case.csv',
                  'summary.json', 'table.md']
  assert 'FLAIR+T1+T1Gd+T2' in (out / 'cpu_real' / 'table.md').read_text()


def test_compact_cases_keep_the_brain_at_the_coarse_spacing(tmp_path):
  """experiments/compact_cases.py: 2 mm, cropped, int16 / uint8, the brain and labels where
  they were (world coordinates), and the data path reads the copy."""
  import nibabel as nib
  from mstkd_jax.data import layouts, preprocess, synthetic
  root = tmp_path / 'cases'
  synthetic.generate_dataset(str(root), 1, (60, 64, 50), 'brats2021', seed=3, spacing=1.0)
  proc = _run(['experiments/compact_cases.py', '--root', str(root), '--out',
               str(tmp_path / 'small')], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  case = sorted(os.listdir(root))[0]
  for name in sorted(os.listdir(root / case)):
    big, small = nib.load(str(root / case / name)), nib.load(str(tmp_path / 'small' / case / name))
    assert np.allclose(np.sqrt((small.affine[:3, :3] ** 2).sum(0)), 2.0)
    assert small.get_data_dtype() == (np.uint8 if '_seg' in name else np.int16)
    assert all(s <= (b + 1) // 2 for s, b in zip(small.shape, big.shape))
    if '_seg' in name:   # the tumour's centre of mass stays in place, in mm
      centre = [np.argwhere(np.asarray(img.dataobj) > 0).mean(0) for img in (big, small)]
      world = [img.affine[:3, :3] @ c + img.affine[:3, 3] for img, c in zip((big, small), centre)]
      assert np.abs(world[0] - world[1]).max() < 1.5
  (found,) = layouts.discover_cases(str(tmp_path / 'small'))
  raw = preprocess.read_case(found)
  assert all(raw.present) and raw.codes is not None and raw.codes.any()


@pytest.mark.slow
def test_compare_variants_smoke(tmp_path):
  """experiments/compare_variants.py end to end on 8 tiny synthetic cases: 2 folds x 2
  variants x 2 steps, the report (per-variant table, per-subset table, paired comparison with
  its interval) and the figure; a second call finds every run finished and only reports."""
  out = tmp_path / 'compare'
  args = ['experiments/compare_variants.py', '--smoke', '--out', str(out), '--folds', '2',
          '--steps', '2', '--variants', 'mstkd,plain']
  proc = _run(args, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((out / 'report.json').read_text())
  assert report['runs'] == 4
  assert set(report['variants']) == {'mstkd', 'plain'}
  for stats in report['variants'].values():
    assert stats['runs'] == 2 and 0.0 <= stats['dice_WT']['mean'] <= 1.0
    assert stats['dice_WT']['std'] is not None
    assert [(r['fold'], r['seed']) for r in stats['per_run']] == [(0, 0), (1, 0)]
  paired = report['paired']['mstkd']['mean_15']['WT']
  assert paired['cases'] == 8                    # every case is tested once over the folds
  assert paired['ci95'][0] <= paired['mean'] <= paired['ci95'][1]
  text = (out / 'report.md').read_text()
  assert 'Paired: mstkd minus plain' in text and 'FLAIR+T1+T1Gd+T2' in text
  assert '15-subset mean Dice per run' in text and 'run-level interval' in text
  assert paired['runs'] == 2 and paired['run_ci95'][0] <= paired['run_mean']
  assert (out / 'paired.png').stat().st_size > 0
  assert report['dominance']['mstkd']['regions']['ET']['steps'] == 28
  assert 'Dominance: steps that add one modality' in text
  # Resumable: nothing is retrained.
  again = _run(args, timeout=300)
  assert again.returncode == 0 and '[compare] fold' not in again.stdout

  # The per-region choice of scans, cross-fitted over the two folds of these runs.
  proc = _run(['experiments/subset_selection_eval.py', '--out', str(out), '--folds', '2',
               '--variants', 'mstkd'], timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((out / 'selection_report.json').read_text())['mstkd']
  assert set(result) == {'default', 'crossfit-single', 'crossfit-ens', 'crossfit-ens-sig',
                         'train-single', 'train-ens', 'train-ens-sig'}
  assert result['crossfit-ens']['paired']['mean_15']['WT']['cases'] == 8
  fold0 = out / 'fold0' / 'mstkd' / 'eval'
  for split in ('train', 'val', 'test'):
    assert (fold0 / f'candidates_{split}.csv').stat().st_size > 0
  from mstkd_jax import subset_selection
  rule = subset_selection.load(str(fold0 / 'selection_crossfit-ens.json'))
  assert rule['source']['from'] == 'other folds' and rule['source']['num_cases'] == 4
  assert (out / 'selection_report.md').read_text().startswith('# Per-region choice')

  # The prediction policy, cross-fitted over the two folds: the student alone recomputed
  # equals the runs' evaluations (the script checks it), every input scored, the report.
  for flags in ([], ['--scan-choice', '--min-cases', '1']):
    proc = _run(['experiments/prediction_policy_eval.py', '--out', str(out), '--folds', '2',
                 '--variants', 'mstkd'] + flags, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / 'policy_report.json').read_text())['mstkd']
    assert result['runs'] == 2 and result['cases'] == 8
    assert result['teacher_vs_student_all_four']['ET']['cases'] == 8
    assert len(result['policy_vs_student']['per_subset']) == 15
    assert (out / 'fold0' / 'mstkd' / 'eval' / 'policy_crossfit.csv').stat().st_size > 0
  assert 'teacher minus student' in (out / 'policy_report.md').read_text()
  assert (out / 'fold0' / 'mstkd' / 'eval' / 'policy_crossfit_scans.csv').stat().st_size > 0


def _compare_variants_module():
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  try:
    import compare_variants
  finally:
    sys.path.pop(0)
  return compare_variants


def test_compare_variants_pairs_seed_by_seed_and_averages_per_case():
  """With several seeds the paired interval is over test cases (a case's difference is the mean
  of its per-seed differences), not over case x seed rows; the seed spread is the pooled
  within-fold standard deviation."""
  cv = _compare_variants_module()
  from mstkd_jax.report import SUBSET_NAMES

  def rows(dice):                               # dice[(case, seed)] on every subset, WT only
    return [{'case': c, 'seed': s, 'region': 'WT', 'subset': sub, 'dice': d}
            for (c, s), d in dice.items() for sub in SUBSET_NAMES]

  variant = rows({('a', 0): 0.6, ('a', 1): 0.8, ('b', 0): 0.5, ('b', 1): 0.5,
                  ('c', 0): 0.7, ('c', 1): 0.9})
  base = rows({('a', 0): 0.5, ('a', 1): 0.5, ('b', 0): 0.6, ('b', 1): 0.4,
               ('c', 0): 0.6, ('c', 2): 0.1})   # seed 2 has no partner: left out
  wt = cv.paired(variant, base)['mean_15']['WT']
  per_case = [0.2, 0.0, 0.1]                   # a: (0.1 + 0.3) / 2, b: (-0.1 + 0.1) / 2, c: 0.1
  assert wt['cases'] == 3 and wt['improved'] == 2 and wt['worse'] == 0
  assert wt['mean'] == pytest.approx(np.mean(per_case))
  half = cv.t975(2) * np.std(per_case, ddof=1) / np.sqrt(3)
  assert wt['ci95'] == pytest.approx([np.mean(per_case) - half, np.mean(per_case) + half])
  per_run = [np.mean([0.1, -0.1, 0.1]), np.mean([0.3, 0.1])]   # (fold 0, seed 0), (fold 0, seed 1)
  assert wt['runs'] == 2 and wt['run_mean'] == pytest.approx(np.mean(per_run))
  half = cv.t975(1) * np.std(per_run, ddof=1) / np.sqrt(2)
  assert wt['run_ci95'] == pytest.approx([np.mean(per_run) - half, np.mean(per_run) + half])
  assert cv.seed_std([[0.5, 0.7], [0.2, 0.2, 0.2], [0.9]]) == pytest.approx(
      np.sqrt((np.var([0.5, 0.7], ddof=1) + 0.0) / 2))
  assert cv.seed_std([[0.5], [0.9]]) is None
  assert cv.run_dir('o', 3, 0, 'plain') == os.path.join('o', 'fold3', 'plain')
  assert cv.run_dir('o', 3, 2, 'a+b=1') == os.path.join('o', 'fold3_seed2', 'a__b-1')


@pytest.mark.slow
def test_term_gradients_on_a_tiny_run(tmp_path):
  """experiments/term_gradients.py on a fresh state and on the checkpoint of a tiny training
  run: every student term measured, the Dice gradient's cosine with itself 1."""
  workdir = tmp_path / 'work'
  proc = _run(['-m', 'mstkd_jax.main', '--config=configs/brats.py:tiny', f'--workdir={workdir}',
               '--config.train.epochs=1', '--config.eval.val_subsets=full'], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = max(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  lines_file = tmp_path / 'terms.jsonl'
  proc = _run(['experiments/term_gradients.py', '--workdir', str(workdir), '--steps',
               f'init,{last}', '--batches', '1', '--subsets', 'T2,FLAIR+T1', '--out',
               str(lines_file)], timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = [json.loads(l) for l in lines_file.read_text().splitlines()]
  assert {l['step'] for l in lines} == {'init', str(last)}
  parts = {l['part'] for l in lines}
  assert parts == {'dice_student', 'evd', 'mst', 'agreement', 'kl', 'adv', 'style', 'content'}
  for l in lines:
    assert l['samples'] == 2 and np.isfinite(l['grad_norm']) and l['grad_norm'] >= 0.0
    if l['part'] == 'dice_student':
      assert l['cos_with_dice'] == pytest.approx(1.0, abs=1e-4)
      assert l['grad_norm'] > 0.0


@pytest.mark.slow
def test_predict_options_smoke(tmp_path):
  """experiments/predict_options.py on a 1-step synthetic run: every option's line and the
  report, with paired differences against the plain pass."""
  out = tmp_path / 'popt'
  proc = _run(['experiments/predict_options.py', '--smoke', '--out', str(out),
               '--subsets', '1111,1000'], timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = [json.loads(line) for line in (out / 'cases.jsonl').read_text().splitlines()]
  assert {(r['option'], r['subset']) for r in lines} == {
      ('plain', 'FLAIR+T1+T1Gd+T2'), ('tta', 'FLAIR+T1+T1Gd+T2'), ('regrid', 'FLAIR+T1+T1Gd+T2'),
      ('plain', 'FLAIR'), ('tta', 'FLAIR')}
  report = json.loads((out / 'report.json').read_text())['options']
  assert len(report['tta FLAIR']['diff_WT']) == 5
  assert 0.0 <= report['regrid FLAIR+T1+T1Gd+T2']['agreement_ET'] <= 1.0
  assert 'Agreement (Dice) of the re-gridded prediction' in (out / 'report.md').read_text()


def test_dominance_report_over_runs(tmp_path):
  """experiments/dominance_report.py: per step the mean change over runs, its interval over
  runs, and the heat map; a step that lowers Dice in every run by about the same amount is
  outside the noise."""
  from mstkd_jax import report
  from mstkd_jax.metrics import REGIONS
  from mstkd_jax.modalities import ALL_SUBSETS, subset_name
  for run in range(3):
    rows = []
    rng = np.random.default_rng(run)
    for case in ('a', 'b'):
      for subset in ALL_SUBSETS:
        for region in REGIONS:
          dice = 0.4 + 0.1 * sum(subset) + 0.01 * rng.standard_normal()
          if region == 'ET' and subset[0]:              # FLAIR costs ET 0.2 (net -0.1 a step)
            dice -= 0.2
          rows.append({'case': case, 'subset': subset_name(subset), 'region': region,
                       'dice': dice, 'hd95': 1.0})
    report.write_per_case_csv(rows, str(tmp_path / f'run{run}.csv'))
  proc = _run(['experiments/dominance_report.py', '--out', str(tmp_path / 'out'),
               f'recipe={tmp_path}/run*.csv'], timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((tmp_path / 'out' / 'dominance.json').read_text())['recipe']
  assert result['runs'] == 3
  assert result['summary']['ET']['lower'] == 7 and result['summary']['ET']['lower_outside_noise'] == 7
  assert result['summary']['WT']['lower'] == 0
  step = result['steps']['ET']['T1Gd +FLAIR']
  assert step['mean'] == pytest.approx(-0.1, abs=0.03) and step['lower_runs'] == 3
  assert (tmp_path / 'out' / 'dominance_recipe.png').stat().st_size > 0
  assert '| recipe | 3 | ET | 7 | 7 |' in (tmp_path / 'out' / 'dominance.md').read_text()

