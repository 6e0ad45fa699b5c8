"""Does the prediction policy give every input at least what the student alone gives, and
all four scans at least what any subset gives? Cross-fitted over compare_variants.py's folds.

  python experiments/prediction_policy_eval.py --out runs/cv30 --folds 5 \
      --variants mstkd,plain [--scan-choice] [--min-cases 10] [--report policy_report]

For every finished run ``<out>/fold<k>/<variant>`` the policy of ``mstkd_jax.prediction_policy``
is decided from the test cases of the *other* folds (``decide`` on their ``eval/per_case.csv``:
other networks of the same recipe, cases this run's test cases are not among), as an export
whose held-out evaluation had those cases would decide it (``--scan-choice``: with the
per-region choice of scans, ``--export_scan_choice``), and applied to this run's test cases
as prediction applies it: per region the network and scans of ``prediction_policy.plan``,
composed nested; the student alone recomputed must equal the run's evaluation. Per case and
input: Dice and HD95 (``<workdir>/eval/policy_crossfit[_scans].csv``, the per_case.csv
layout).

Report (``<out>/<report>.md`` / ``.json``), per variant:
  * all four scans, teacher minus student per region: mean, interval over test cases and over
    runs, cases better / worse;
  * the policy against the student alone, per input and the 15-subset mean (paired, as
    compare_variants: interval over cases and over runs);
  * all four scans against the best other input, and the add-a-scan steps that lower Dice
    (``report.dominance``), before and after;
  * what each fold's policy decided.
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_variants import (REGIONS, _diff_cell, check_same_as_evaluation,  # noqa: E402
                              mean_ci, paired, paired_table_rows, run_dir, save_report)
from mstkd_jax import prediction_policy as policy_lib  # noqa: E402
from mstkd_jax import report  # noqa: E402
from mstkd_jax import subset_selection as sel  # noqa: E402
from mstkd_jax.modalities import ALL_SUBSETS, FULL, masked_copies, subset_name  # noqa: E402

FULL_NAME = subset_name(FULL)


def per_case(workdir):
  return report.read_per_case_csv(os.path.join(workdir, 'eval', 'per_case.csv'))


def crossfit_policies(runs, min_cases, choose_scans):
  """{workdir: the policy decided from the other runs' test evaluations}."""
  out = {}
  for fold, workdir in runs:
    rows = [r for other_fold, other in runs if other_fold != fold for r in per_case(other)]
    out[workdir] = policy_lib.decide(rows, has_teacher=True, choose_scans=choose_scans,
                                     min_cases=min_cases,
                                     held_out={'from': 'the other folds\' test cases'})
  return out


def apply_policy(workdir, out, fold, policy, tag):
  """The policy's per-case rows on the run's test cases (module doc); the student alone on
  every input must reproduce the run's own evaluation."""
  from mstkd_jax import checkpoint as ckpt
  from mstkd_jax import inference as inference_lib
  from mstkd_jax import metrics
  from mstkd_jax.data import pipeline
  config = ckpt.load_config(workdir)
  config.data.split_file = os.path.join(out, f'split_fold{fold}.json')
  config.data.cache_dir = os.path.join(out, 'cache')
  loaded = ckpt.load_networks(config, workdir, 'latest', names=('student', 'teacher'))
  inference = inference_lib.get_inference(config)
  student = inference.place(loaded.networks['student'])
  teacher = inference.place(loaded.networks['teacher'])
  dataset = pipeline.prepare(config, workdir, splits=('test',), progress=False)
  convention = config.eval.get('hd95_convention', 'brats')
  plans = {subset_name(s): policy_lib.plan(policy, s, has_teacher=True) for s in ALL_SUBSETS}
  rows, alone = [], []
  for case in pipeline.load_eval_cases(dataset, 'test'):
    probs = {('student', subset_name(s)): p for s, p in zip(
        ALL_SUBSETS, inference.run(student, masked_copies(case.image, ALL_SUBSETS)))}
    probs[('teacher', FULL_NAME)] = inference.run(teacher, case.image[None])[0]
    truth = metrics.region_masks(case.label)
    for name, plan in plans.items():
      per_region = {r: np.mean([probs[(net, n)] for n in sel.parse_candidate(scans)], axis=0)
                    for r, (net, scans) in plan.sources.items()}
      output = per_region['WT'] if plan.single else sel.compose(per_region)
      scores = metrics.case_metrics(metrics.region_masks(output), truth, case.spacing,
                                    convention)
      rows += report.metric_rows(case.case_id, name, scores)
      scores = metrics.case_metrics(metrics.region_masks(probs[('student', name)]), truth,
                                    case.spacing, convention)
      alone += report.metric_rows(case.case_id, name, scores)
  check_same_as_evaluation(workdir, alone, 'the student alone')
  report.write_per_case_csv(rows, os.path.join(workdir, 'eval', f'policy_{tag}.csv'))
  with open(os.path.join(workdir, 'eval', f'policy_{tag}.json'), 'w') as f:
    json.dump(policy, f, indent=1)
  return rows


def teacher_vs_student(runs):
  """Per region: teacher minus student on all four scans, over cases and over runs."""
  out = {}
  for region in REGIONS:
    diffs, by_run = [], []
    for fold, workdir in runs:
      rows = per_case(workdir)
      teacher = {r['case']: r['dice'] for r in rows
                 if r['subset'] == report.TEACHER_SUBSET and r['region'] == region}
      student = {r['case']: r['dice'] for r in rows
                 if r['subset'] == FULL_NAME and r['region'] == region}
      run = [teacher[c] - student[c] for c in teacher if c in student]
      diffs += run
      by_run.append(np.mean(run))
    mean, low, high = mean_ci(diffs)
    _, run_low, run_high = mean_ci(by_run)
    out[region] = {'mean': mean, 'ci95': [low, high], 'run_ci95': [run_low, run_high],
                   'better': int(np.sum(np.asarray(diffs) > 0)),
                   'worse': int(np.sum(np.asarray(diffs) < 0)), 'cases': len(diffs),
                   'runs': len(by_run)}
  return out


def full_minus_best(rows):
  """Per region: the mean Dice with all four scans minus the best other input's (over cases)."""
  out = {}
  for region in REGIONS:
    means = {}
    for r in rows:
      if r['region'] == region:
        means.setdefault(r['subset'], []).append(r['dice'])
    means = {k: float(np.mean(v)) for k, v in means.items()}
    best = max((k for k in means if k != FULL_NAME), key=means.get)
    out[region] = {'all_four': means[FULL_NAME], 'best_other': means[best], 'which': best,
                   'difference': means[FULL_NAME] - means[best]}
  return out


def summarise(runs, policy_rows, policies):
  tagged = lambda table: [dict(r, fold=fold, seed=0) for fold, workdir in runs
                          for r in table[workdir]]
  student = tagged({w: [r for r in per_case(w) if r['subset'] != report.TEACHER_SUBSET]
                    for _, w in runs})
  policy = tagged(policy_rows)
  return {
      'runs': len(runs), 'cases': len({r['case'] for r in student}),
      'teacher_vs_student_all_four': teacher_vs_student(runs),
      'policy_vs_student': paired(policy, student),
      'mean_15': {name: {reg: float(np.mean([r['dice'] for r in rows if r['region'] == reg]))
                         for reg in REGIONS}
                  for name, rows in (('student', student), ('policy', policy))},
      'all_four_minus_best': {'student': full_minus_best(student),
                              'policy': full_minus_best(policy)},
      'dominance': {'student': report.dominance(student)['regions'],
                    'policy': report.dominance(policy)['regions']},
      'decisions': {f'fold{fold}': {
          'all_four': policies[w]['full_input']['regions'],
          'teacher_minus_student': policies[w]['full_input'].get('teacher_minus_student'),
          'selection': policies[w]['subset_selection']['applied'],
          'selection_changes': sel.describe(policies[w]['subset_selection']['rule'])
          if policies[w]['subset_selection']['rule'] else ''} for fold, w in runs},
  }


def markdown(result, argv):
  lines = ['# The prediction policy, cross-fitted', '',
           f'Command: `python experiments/prediction_policy_eval.py {" ".join(argv)}`', '']
  for variant, e in result.items():
    lines += [f'## {variant} ({e["runs"]} runs, {e["cases"]} test cases)', '',
              'All four scans, teacher minus student (Dice points; interval over cases, '
              'cases better / worse; interval over runs):', '',
              '| region | teacher - student | over runs |', '|---|---|---|']
    for region, x in e['teacher_vs_student_all_four'].items():
      cases = _diff_cell(x['mean'], *x['ci95'], f'{x["better"]}/{x["worse"]}')
      over_runs = _diff_cell(x['mean'], *x['run_ci95'], f'{x["runs"]} runs')
      lines.append(f'| {region} | {cases} | {over_runs} |')
    lines += ['', '15-subset mean Dice WT / TC / ET: student alone '
              + ' / '.join(f'{100 * e["mean_15"]["student"][r]:.1f}' for r in REGIONS)
              + ', policy ' + ' / '.join(f'{100 * e["mean_15"]["policy"][r]:.1f}'
                                         for r in REGIONS), '',
              'Policy minus student alone, per input (Dice points; interval over cases, '
              'better / worse):', '', '| input | WT | TC | ET |', '|---|---|---|---|']
    pairs = e['policy_vs_student']
    rows = [('15-subset mean', pairs['mean_15'])]
    rows += [(name, pairs['per_subset'].get(name, {})) for name in report.SUBSET_NAMES]
    for label, entry in rows:
      lines += paired_table_rows(label, entry, run_level=label == '15-subset mean')
    lines += ['', '| | all four minus the best other input WT / TC / ET | add-a-scan steps '
              'lowering Dice (outside the noise) WT / TC / ET |', '|---|---|---|']
    for who in ('student', 'policy'):
      best = e['all_four_minus_best'][who]
      dom = e['dominance'][who]
      lines.append(f'| {who} | ' + ' / '.join(
          f'{100 * best[r]["difference"]:+.1f} ({best[r]["which"]})' for r in REGIONS)
          + ' | ' + ' / '.join(f'{dom[r]["lower"]} ({dom[r]["lower_outside_noise"]})'
                               for r in REGIONS) + ' |')
    lines += ['', 'Decisions (each from the other folds\' test cases):', '']
    for fold, d in e['decisions'].items():
      diff = d['teacher_minus_student'] or {}
      lines.append(f'* {fold}: all four -> ' + ', '.join(
          f'{r} {net}' + (f' ({100 * diff[r]["mean"]:+.1f})' if r in diff else '')
          for r, net in d['all_four'].items())
                   + f'; per-region choice of scans: {"on" if d["selection"] else "off"}'
                   + (': ' + '; '.join(x.strip() for x in d['selection_changes'].splitlines())
                      if d['selection_changes'] else ''))
    lines.append('')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='the folder of compare_variants.py runs')
  parser.add_argument('--variants', default='mstkd,plain')
  parser.add_argument('--folds', type=int, default=5)
  parser.add_argument('--min-cases', type=int, default=policy_lib.MIN_SELECTION_CASES)
  parser.add_argument('--scan-choice', action='store_true',
                      help='policies with the per-region choice of scans (export_scan_choice)')
  parser.add_argument('--report', default='policy_report')
  args = parser.parse_args(argv)
  result = {}
  for variant in [v for v in args.variants.split(',') if v]:
    runs = [(k, run_dir(args.out, k, 0, variant)) for k in range(args.folds)]
    runs = [(k, w) for k, w in runs if os.path.exists(os.path.join(w, 'eval', 'per_case.csv'))]
    if len(runs) < 2:
      print(f'{variant}: fewer than 2 finished runs')
      continue
    policies = crossfit_policies(runs, args.min_cases, args.scan_choice)
    tag = 'crossfit_scans' if args.scan_choice else 'crossfit'
    policy_rows = {w: apply_policy(w, args.out, k, policies[w], tag) for k, w in runs}
    result[variant] = summarise(runs, policy_rows, policies)
    print(f'[policy] {variant}: {len(runs)} runs', flush=True)
  save_report(os.path.join(args.out, args.report), result, markdown(result, argv))
  return 0


if __name__ == '__main__':
  sys.exit(main())
