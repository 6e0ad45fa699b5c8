"""Does choosing, per region, which available scans to use pay off on cases that never informed
the choice? Cross-fitted over the folds of ``compare_variants.py``.

  python experiments/subset_selection_eval.py --out runs/cv5 --folds 5 --variants mstkd \
      [--only-folds 0,1,2] [--seeds 0]

For every finished run ``<out>/fold<k>[_seed<s>]/<variant>`` (its final checkpoint and split):

1. Tables (``<workdir>/eval/candidates_<split>.csv``, kept for later calls): the student's
   Dice of WT / TC / ET per case for every candidate of ``mstkd_jax.subset_selection`` (the 15
   subsets, and the 11 means of the probabilities over all sub-subsets of a set of two or
   more scans), on the run's training, validation and test cases (centre window, as the
   standard evaluation).
2. Rules (``mstkd_jax.subset_selection.choose``), each from cases the run's test cases are
   not among:
   * ``crossfit``: the test cases of the *other* folds (same variant and seed; other networks
     of the same recipe): every case's result comes from a rule that never saw it;
   * ``train``: the run's own 15 training cases (the same network; what a user who has no
     held-out cases could do);
   each with single subsets only (``-single``), with the ensembles too (``-ens``), and with
   the ensembles but only where the table's per-case gain is outside its noise (95 % interval
   above 0: ``-ens-sig``).
3. Scores: each rule applied to the run's test cases for the 15 available sets (regions nested
   as prediction writes them), Dice and HD95 (``<workdir>/eval/selection_<rule>.csv``, the
   per_case.csv layout with 'subset' = the available scans); the rule 'default' (every region
   from all available scans) must reproduce the run's ``eval/per_case.csv``.

Report (``<out>/selection_report.md`` / ``.json``): per rule, the 15-subset mean Dice and the
paired difference to 'default' (per-case 95 % interval over the test cases and run-level
interval over the runs, as compare_variants), the all-four row, and the dominance left.
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_variants import (REGIONS, check_same_as_evaluation, paired,  # noqa: E402
                              paired_table_rows, parse_variant, save_report,
                              run_dir)
from mstkd_jax import report  # noqa: E402
from mstkd_jax import subset_selection as sel  # noqa: E402
from mstkd_jax.modalities import ALL_SUBSETS, subset_name  # noqa: E402

RULES = ('crossfit-single', 'crossfit-ens', 'crossfit-ens-sig', 'train-single', 'train-ens',
         'train-ens-sig')


class LoadedRun:
  """A finished run's config, student (placed for inference), inference and data, read on
  first use (``get``). The split and the preprocessing cache are those of ``<out>``
  (compare_variants' layout), whatever paths the run's config.json recorded (so that a run
  copied from another folder reads nothing outside ``<out>``)."""

  def __init__(self, workdir, out, fold):
    self.workdir = workdir
    self.split_file = os.path.join(out, f'split_fold{fold}.json')
    self.cache_dir = os.path.join(out, 'cache')
    self._parts = None

  def get(self):
    if self._parts is None:
      from mstkd_jax import checkpoint as ckpt
      from mstkd_jax import inference as inference_lib
      from mstkd_jax.data import pipeline
      config = ckpt.load_config(self.workdir)
      config.data.split_file = self.split_file
      config.data.cache_dir = self.cache_dir
      loaded = ckpt.load_networks(config, self.workdir, 'latest', names=('student',))
      inference = inference_lib.get_inference(config)
      dataset = pipeline.prepare(config, self.workdir, splits=('train', 'val', 'test'),
                                 progress=False)
      self._parts = (config, inference.place(loaded.primary()), inference, dataset)
    return self._parts


def _subset_probs(inference, variables, case):
  """{subset name: probs [H, W, D, C]} of one case, the 15 subsets."""
  from mstkd_jax.modalities import masked_copies
  probs = inference.run(variables, masked_copies(case.image, ALL_SUBSETS))
  return {subset_name(s): p for s, p in zip(ALL_SUBSETS, probs)}


def _dice_rows(case, probs_by_candidate):
  from mstkd_jax import metrics
  truth = metrics.region_masks(case.label)
  rows = []
  for name, probs in probs_by_candidate.items():
    pred = metrics.region_masks(probs)
    for region in REGIONS:
      rows.append({'case': case.case_id, 'subset': name, 'region': region,
                   'dice': metrics.dice(pred[region], truth[region]), 'hd95': float('nan')})
  return rows


def candidate_tables(run):
  """Writes (once) and reads ``eval/candidates_<split>.csv`` for train, val and test."""
  from mstkd_jax.data import pipeline
  tables = {}
  for split in ('train', 'val', 'test'):
    path = os.path.join(run.workdir, 'eval', f'candidates_{split}.csv')
    if not os.path.exists(path):
      _, variables, inference, dataset = run.get()
      rows = []
      for case in pipeline.load_eval_cases(dataset, split):
        probs = _subset_probs(inference, variables, case)
        candidates = {sel.candidate_name(c): np.mean([probs[n] for n in c], axis=0)
                      if len(c) > 1 else probs[c[0]] for c in sel.all_candidates(True)}
        rows += _dice_rows(case, candidates)
      report.write_per_case_csv(rows, path + '.tmp')
      os.replace(path + '.tmp', path)
    tables[split] = report.read_per_case_csv(path)
  return tables


def make_rules(run, runs, tables):
  """{rule name: rule} for one run (``run`` = (fold, seed, variant, workdir))."""
  fold, seed, variant, _ = run
  others = [r for r in runs if r[2] == variant and r[1] == seed and r[0] != fold]
  cross = sel.table_from_rows([row for r in others for row in tables[r[3]]['test']])
  own = sel.table_from_rows(tables[run[3]]['train'])
  rules = {'default': sel.default_rule()}
  sources = [('train', own, 'own training cases')]
  if cross:
    sources.insert(0, ('crossfit', cross, 'other folds'))
  for prefix, table, where in sources:
    rules[f'{prefix}-single'] = sel.choose(table, 0.0, False, {'from': where})
    rules[f'{prefix}-ens'] = sel.choose(table, 0.0, True, {'from': where})
    rules[f'{prefix}-ens-sig'] = sel.choose(table, 0.0, True, {'from': where}, confidence=0.95)
  return rules


def score_rules(run, rules):
  """Writes ``eval/selection_<rule>.csv`` for every rule on the run's test cases."""
  from mstkd_jax import metrics
  from mstkd_jax.data import pipeline
  workdir = run.workdir
  config, variables, inference, dataset = run.get()
  convention = config.eval.get('hd95_convention', 'brats')
  out = {name: [] for name in rules}
  for case in pipeline.load_eval_cases(dataset, 'test'):
    probs = _subset_probs(inference, variables, case)
    truth = metrics.region_masks(case.label)
    for name, rule in rules.items():
      for available in ALL_SUBSETS:
        composed = sel.combine(sel.rule_for(rule, available), probs)
        scores = metrics.case_metrics(metrics.region_masks(composed), truth, case.spacing,
                                      convention)
        out[name] += report.metric_rows(case.case_id, available, scores)
  for name, rows in out.items():
    report.write_per_case_csv(rows, os.path.join(workdir, 'eval', f'selection_{name}.csv'))
    with open(os.path.join(workdir, 'eval', f'selection_{name}.json'), 'w') as f:
      json.dump(rules[name], f, indent=1)
  return out


def summarise(runs, scored):
  """{rule: {'runs', 'mean', 'full', 'hd95': {region: ...}, 'dominance', 'paired'}} over the
  test cases of ``runs``; 'paired' is compare_variants' paired comparison with 'default'."""
  full = subset_name((True,) * 4)
  tagged = {name: [dict(r, fold=run[0], seed=run[1]) for run in runs
                   for r in scored[run].get(name, [])] for name in ('default',) + RULES}
  out = {}
  for name, rows in tagged.items():
    if not rows:
      continue
    mean = lambda key, subset=None: {
        reg: float(np.mean([r[key] for r in rows if r['region'] == reg
                            and (subset is None or r['subset'] == subset)])) for reg in REGIONS}
    entry = {'runs': len({(r['fold'], r['seed']) for r in rows}), 'mean': mean('dice'),
             'full': mean('dice', full), 'hd95': mean('hd95'),
             'dominance': report.dominance(rows)}
    if name != 'default':
      entry['paired'] = paired(rows, tagged['default'])
    out[name] = entry
  return out


def markdown(result, argv):
  lines = ['# Per-region choice of the scans at inference, cross-fitted', '',
           f'Command: `python experiments/subset_selection_eval.py {" ".join(argv)}`', '']
  for variant, rules in result.items():
    lines += [f'## {variant}', '',
              '| rule | runs | 15-subset mean Dice WT / TC / ET | all four WT / TC / ET | '
              'HD95 WT / TC / ET | dominance: steps lower (outside noise) WT / TC / ET |',
              '|---|---:|---|---|---|---|']
    for name, e in rules.items():
      dom = e['dominance']['regions']
      lines.append(
          f'| {name} | {e["runs"]} | '
          + ' / '.join(f'{100 * e["mean"][r]:.1f}' for r in REGIONS) + ' | '
          + ' / '.join(f'{100 * e["full"][r]:.1f}' for r in REGIONS) + ' | '
          + ' / '.join(f'{e["hd95"][r]:.1f}' for r in REGIONS) + ' | '
          + ' / '.join(f'{dom[r]["lower"]} ({dom[r]["lower_outside_noise"]})' if r in dom
                       else '-' for r in REGIONS) + ' |')
    lines += ['', 'Paired against default (Dice points; 95 % interval over test cases, '
              'improved / worse; then over runs):', '',
              '| rule | subsets | WT | TC | ET |', '|---|---|---|---|---|']
    full = subset_name((True,) * 4)
    for name, e in rules.items():
      if 'paired' not in e:
        continue
      for label, entry in (('15-subset mean', e['paired']['mean_15']),
                           ('all four', e['paired']['per_subset'].get(full, {}))):
        lines += paired_table_rows(f'{name} | {label}', entry,
                                   run_level=label == '15-subset mean')
    lines.append('')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='the folder of compare_variants.py runs')
  parser.add_argument('--variants', default='mstkd')
  parser.add_argument('--folds', type=int, default=5)
  parser.add_argument('--only-folds', default='')
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--tables-only', action='store_true',
                      help='only write the candidate tables of the finished runs (step 1)')
  parser.add_argument('--report', default='selection_report',
                      help='file name (without extension) of the report in --out')
  args = parser.parse_args(argv)
  folds = [int(k) for k in args.only_folds.split(',') if k.strip()] or list(range(args.folds))
  seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  result = {}
  for text in [v for v in args.variants.split(',') if v]:
    variant = parse_variant(text)[0]
    runs = [(k, s, variant, run_dir(args.out, k, s, variant)) for s in seeds for k in folds]
    runs = [r for r in runs if os.path.exists(os.path.join(r[3], 'eval', 'per_case.csv'))]
    if not runs:
      print(f'{variant}: no finished runs')
      continue
    tables = {r[3]: candidate_tables(LoadedRun(r[3], args.out, r[0])) for r in runs}
    if args.tables_only:
      print(f'{variant}: candidate tables of {len(runs)} runs written')
      continue
    scored = {}
    for run in runs:
      rules = make_rules(run, runs, tables)
      scored[run] = score_rules(LoadedRun(run[3], args.out, run[0]), rules)
      check_same_as_evaluation(run[3], scored[run]['default'], 'the default rule')
      print(f'[selection] {run[3]}: {len(rules)} rules scored', flush=True)
    result[variant] = summarise(runs, scored)
  if args.tables_only:
    return 0
  save_report(os.path.join(args.out, args.report), result, markdown(result, argv))
  return 0


if __name__ == '__main__':
  sys.exit(main())
