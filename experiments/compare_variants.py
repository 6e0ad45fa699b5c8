"""Does the distillation pay off? k-fold cross-validation of training variants, with paired tests.

  python experiments/compare_variants.py --root data/brats2018 --out runs/compare \\
      --config configs/cpu_real.py --variants mstkd,plain --folds 5 --steps 1500
  python experiments/compare_variants.py --out runs/compare --report-only   # tables again
  python experiments/compare_variants.py --smoke --out /tmp/cmp             # seconds, synthetic

Protocol. The cases under ``--root`` (sorted by id) are cut into ``--folds`` folds; fold k
tests on its cases, validates on ``--val-cases`` cases taken from the next fold, and trains on
the rest. Every variant trains for the same number of steps (``--steps``, rounded up to whole
epochs of the fold's training cases) with the same seed, data order and initial weights, in
its own workdir ``<out>/fold<k>[_seed<s>]/<variant>`` (``--seeds 0,1,2`` repeats every run
under each seed: initial weights, data order and subset draws change together; ``--only-folds``
restricts the runs and the report to some folds); then the standard 15-subset evaluation
of the test cases runs (``<workdir>/eval/per_case.csv``). A finished run is never repeated:
re-running the command after an interruption continues where it stopped (an unfinished run
resumes from its last checkpoint). The preprocessing cache is shared by all runs.

Variants are the config's variants: ``mstkd`` (the config itself), ``plain`` (no distillation),
``no_mstkd``, ``no_gsme``, ``no_slkd`` (the paper's ablations); ``VARIANT+field=value`` adds an
override for that variant only (``mstkd+loss.mst_beta=0.1``).

Report (``<out>/report.md``, ``<out>/report.json``, ``<out>/paired.png``):
  * per variant: the 15-subset mean Dice and HD95 of WT / TC / ET, mean +- standard deviation
    over folds (and seeds), and the teacher's Dice on the full input; with several seeds, the
    seed-to-seed standard deviation within a fold (pooled over folds);
  * per run (fold and seed) and variant: the 15-subset mean Dice of the fold's test cases;
  * per variant and subset: mean Dice over all test cases;
  * per variant, dominance (``mstkd_jax.report.dominance``): how many of the 28 steps "subset
    -> subset plus one modality" lower the mean Dice of a region over the test cases (a case
    tested under several seeds counts once, its Dice averaged), how many outside the noise,
    the worst step, and all four modalities against the best subset;
  * paired comparison of each variant against ``--baseline`` (default ``plain``): per test case
    the difference of the 15-subset mean (and per subset the difference), its mean over the
    cases and a 95 % confidence interval (Student t over cases; every case is tested in one
    fold only, so cases are independent units; with several seeds a case's difference is the
    mean of its per-seed differences), and how many cases improve; for the 15-subset mean also
    a run-level interval (Student t over training runs, fold x seed: the cases of a fold share
    one run's seed noise, so the case-level interval is too narrow with few seeds).
"""

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mstkd_jax.report import (SUBSET_NAMES, TEACHER_SUBSET, dominance,  # noqa: E402
                              dominance_flags)

REGIONS = ('WT', 'TC', 'ET')
# Two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom (then 1.96).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(dof):
  return _T975[dof - 1] if 1 <= dof <= len(_T975) else 1.96


def list_cases(root):
  """Case ids: the sub-folders of ``root`` holding NIfTI files, sorted."""
  if not os.path.isdir(root):
    raise SystemExit(f'--root {root}: no such folder')
  ids = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and any(
      f.endswith(('.nii', '.nii.gz')) for f in os.listdir(os.path.join(root, d))))
  if not ids:
    raise SystemExit(f'--root {root}: no case folders with NIfTI files')
  return ids


def make_folds(ids, folds, val_cases):
  """[(train, val, test)] per fold: contiguous test blocks of the sorted ids; validation from
  the start of the next fold's block."""
  if folds < 2 or folds > len(ids):
    raise SystemExit(f'--folds {folds}: need 2..{len(ids)} for {len(ids)} cases')
  blocks = [list(b) for b in np.array_split(np.asarray(ids, dtype=object), folds)]
  out = []
  for k in range(folds):
    test = blocks[k]
    val = blocks[(k + 1) % folds][:val_cases]
    train = [i for i in ids if i not in test and i not in val]
    if not train:
      raise SystemExit('no training cases left: use fewer folds or validation cases')
    out.append((train, val, test))
  return out


def parse_variant(text):
  """'plain+train.learning_rate=3e-4' -> ('plain+...', 'plain', ['--config.train....'])."""
  name, *overrides = text.split('+')
  flags = []
  for item in overrides:
    if '=' not in item:
      raise SystemExit(f'variant {text!r}: override {item!r} is not field=value')
    flags.append(f'--config.{item}')
  return text, ('' if name == 'mstkd' else name), flags


def run_dir(out, fold, seed, variant):
  """``<out>/fold<k>/<variant>`` for seed 0 (the default), ``<out>/fold<k>_seed<s>/...`` else."""
  tag = f'fold{fold}' + (f'_seed{seed}' if seed else '')
  return os.path.join(out, tag, variant.replace('=', '-').replace('+', '__'))


def finished(workdir):
  return os.path.exists(os.path.join(workdir, 'eval', 'per_case.csv'))


def train_command(args, workdir, config_arg, flags, split_file, epochs, seed):
  cmd = [sys.executable, '-m', 'mstkd_jax.main', f'--config={config_arg}',
         f'--workdir={workdir}', f'--config.data.split_file={split_file}',
         f'--config.data.cache_dir={os.path.join(args.out, "cache")}',
         f'--config.train.epochs={epochs}', f'--config.seed={seed}',
         '--config.eval.figure=False']
  if args.root:
    cmd.append(f'--config.data.root={args.root}')
  return cmd + list(args.override) + flags


def run_all(args, folds):
  runs = []
  for seed in args.seeds:
    for k, (train, val, test) in enumerate(folds):
      if k not in args.fold_ids:
        continue
      split_file = os.path.join(args.out, f'split_fold{k}.json')
      with open(split_file + '.tmp', 'w') as f:
        json.dump({'train': train, 'val': val, 'test': test}, f, indent=1)
      os.replace(split_file + '.tmp', split_file)
      epochs = max(1, math.ceil(args.steps / len(train)))
      for text in args.variants:
        variant, config_variant, flags = parse_variant(text)
        workdir = run_dir(args.out, k, seed, variant)
        runs.append((k, seed, variant, workdir))
        if finished(workdir):
          continue
        names = [n for n in (args.base_variant, config_variant) if n]
        config_arg = args.config + (':' + ','.join(names) if names else '')
        cmd = train_command(args, workdir, config_arg, flags, split_file, epochs, seed)
        os.makedirs(workdir, exist_ok=True)
        print(f'[compare] fold {k} seed {seed} {variant}: {epochs} epochs x {len(train)} '
              f'steps -> {workdir}', flush=True)
        t0 = time.time()
        with open(os.path.join(workdir, 'compare_log.txt'), 'a') as log:
          proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode:
          raise SystemExit(f'run failed ({proc.returncode}); its log: '
                           f'{os.path.join(workdir, "compare_log.txt")}\n{" ".join(cmd)}')
        with open(os.path.join(workdir, 'compare_run.json'), 'w') as f:
          json.dump({'command': cmd, 'wall_s': round(time.time() - t0, 1)}, f, indent=1)
        print(f'[compare]   done in {time.time() - t0:.0f} s', flush=True)
  return runs


def read_rows(workdir):
  with open(os.path.join(workdir, 'eval', 'per_case.csv')) as f:
    return [dict(r, dice=float(r['dice']), hd95=float(r['hd95'])) for r in csv.DictReader(f)]


def case_means(rows, metric, subsets=SUBSET_NAMES):
  """{case: {region: mean over ``subsets`` of metric}}."""
  out = {}
  for case in sorted({r['case'] for r in rows}):
    out[case] = {}
    for region in REGIONS:
      vals = [r[metric] for r in rows if r['case'] == case and r['region'] == region
              and r['subset'] in subsets]
      out[case][region] = float(np.mean(vals)) if vals else float('nan')
  return out


def mean_ci(values):
  values = np.asarray(values, float)
  n = len(values)
  mean = float(np.mean(values))
  if n < 2:
    return mean, float('nan'), float('nan')
  half = t975(n - 1) * float(np.std(values, ddof=1)) / math.sqrt(n)
  return mean, mean - half, mean + half


def check_same_as_evaluation(workdir, rows, what):
  """``rows`` recomputed by an analysis must give the run's own eval/per_case.csv for the
  student (same Dice to 1e-9): the analysis scores what the run evaluated. Returns the worst
  difference; stops the analysis naming ``what`` otherwise."""
  own = {(r['case'], r['subset'], r['region']): r['dice'] for r in read_rows(workdir)
         if r['subset'] != TEACHER_SUBSET}
  mine = {(r['case'], r['subset'], r['region']): r['dice'] for r in rows}
  worst = max(abs(own[k] - mine[k]) for k in own)
  if worst > 1e-9:
    raise SystemExit(f'{workdir}: {what} differs from eval/per_case.csv by {worst}')
  return worst


def save_report(path, result, text):
  """Writes ``path``.json (``result``) and ``path``.md (``text``) and prints the text."""
  with open(path + '.json', 'w') as f:
    json.dump(result, f, indent=1)
  with open(path + '.md', 'w') as f:
    f.write(text)
  print(text)


def summarise(runs, variants, baseline):
  """The report's numbers (see the module doc) from the finished runs."""
  by_variant = {v: [r for r in runs if r[2] == v and finished(r[3])] for v in variants}
  report = {'variants': {}, 'paired': {}, 'runs': len([r for r in runs if finished(r[3])])}
  rows_by = {}
  for v, vruns in by_variant.items():
    fold_scores = {m: {reg: [] for reg in REGIONS} for m in ('dice', 'hd95', 'teacher_dice')}
    per_subset = {s: {reg: [] for reg in REGIONS} for s in SUBSET_NAMES}
    rows_all = []
    per_run = []                        # [{'fold', 'seed', 'dice_WT', ...}] in run order
    for k, seed, _, workdir in vruns:
      rows = read_rows(workdir)
      per_run.append({'fold': k, 'seed': seed})
      for r in rows:
        r['seed'], r['fold'] = seed, k
      rows_all += rows
      for metric in ('dice', 'hd95'):
        means = case_means(rows, metric)
        for reg in REGIONS:
          score = float(np.mean([m[reg] for m in means.values()]))
          fold_scores[metric][reg].append(score)
          per_run[-1][f'{metric}_{reg}'] = score
      teacher = case_means(rows, 'dice', (TEACHER_SUBSET,))
      for reg in REGIONS:
        fold_scores['teacher_dice'][reg].append(
            float(np.nanmean([m[reg] for m in teacher.values()])) if teacher else float('nan'))
    for r in rows_all:
      if r['subset'] in per_subset:
        per_subset[r['subset']][r['region']].append(r['dice'])
    rows_by[v] = rows_all
    report.setdefault('dominance', {})[v] = dominance(rows_all)
    report['variants'][v] = {
        'runs': len(vruns),
        'per_run': per_run,
        **{f'seed_std_dice_{reg}': seed_std(
            [[r[f'dice_{reg}'] for r in per_run if r['fold'] == k]
             for k in sorted({r['fold'] for r in per_run})]) for reg in REGIONS},
        **{f'{m}_{reg}': {'mean': float(np.mean(vals)) if vals else None,
                          'std': float(np.std(vals, ddof=1)) if len(vals) > 1 else None}
           for m, regs in fold_scores.items() for reg, vals in regs.items()},
        'per_subset_dice': {s: {reg: float(np.mean(v_)) if v_ else None
                                for reg, v_ in regs.items()} for s, regs in per_subset.items()}}
  if baseline in rows_by:
    base = rows_by[baseline]
    for v in variants:
      if v == baseline or v not in rows_by:
        continue
      report['paired'][v] = paired(rows_by[v], base)
  return report


def seed_std(per_fold):
  """The seed-to-seed standard deviation of a score, pooled over folds: per_fold holds, per
  fold, the score of each seed; sqrt of the mean within-fold variance (None below 2 seeds)."""
  variances = [np.var(v, ddof=1) for v in per_fold if len(v) > 1]
  return float(math.sqrt(np.mean(variances))) if variances else None


def _by_key(rows, subsets):
  """{(case, seed, region, fold): mean Dice over ``subsets``}."""
  out = {}
  for r in rows:
    if r['subset'] in subsets:
      key = (r['case'], r.get('seed', 0), r['region'], r.get('fold', 0))
      out.setdefault(key, []).append(r['dice'])
  return {k: float(np.mean(v)) for k, v in out.items()}


def paired(rows, base_rows):
  """Per region: the mean over test cases of (variant - baseline) of the 15-subset mean Dice,
  its 95 % CI and the count of cases that improve; the same per subset. With several seeds the
  variant and the baseline are paired seed by seed and a case's difference is the mean over its
  seeds: the test cases stay the independent units of the interval."""
  out = {'mean_15': {}, 'per_subset': {}}
  groups = [('mean_15', SUBSET_NAMES)] + [(s, (s,)) for s in SUBSET_NAMES]
  for label, subsets in groups:
    a, b = _by_key(rows, subsets), _by_key(base_rows, subsets)
    entry = {}
    for reg in REGIONS:
      per_case, per_run = {}, {}
      for key in sorted(k for k in a if k in b and k[2] == reg):
        per_case.setdefault(key[0], []).append(a[key] - b[key])
        per_run.setdefault((key[3], key[1]), []).append(a[key] - b[key])
      diffs = [float(np.mean(d)) for d in per_case.values()]
      if not diffs:
        continue
      mean, lo, hi = mean_ci(diffs)
      entry[reg] = {'mean': mean, 'ci95': [lo, hi], 'cases': len(diffs),
                    'improved': int(sum(d > 0 for d in diffs)),
                    'worse': int(sum(d < 0 for d in diffs))}
      # The run (fold x seed) as the unit: a fold's cases share one training run's noise.
      run_diffs = [float(np.mean(d)) for d in per_run.values()]
      run_mean, run_lo, run_hi = mean_ci(run_diffs)
      entry[reg].update(runs=len(run_diffs), run_mean=run_mean, run_ci95=[run_lo, run_hi])
    if label == 'mean_15':
      out['mean_15'] = entry
    else:
      out['per_subset'][label] = entry
  return out


def _pct(x):
  return '-' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{100 * x:.1f}'


def paired_table_rows(label, entry, run_level=False):
  """Markdown rows of one entry of ``paired`` ({region: ...}): the case-level cells, and with
  ``run_level`` a second row with the run-level interval."""
  cells = [_diff_cell(e['mean'], *e['ci95'], f'{e["improved"]}/{e["worse"]}') if e else '-'
           for e in (entry.get(reg) for reg in REGIONS)]
  rows = [f'| {label} | ' + ' | '.join(cells) + ' |']
  if run_level:
    cells = ['-' if not e or math.isnan(e['run_ci95'][0]) else
             _diff_cell(e['run_mean'], *e['run_ci95'], f'over {e["runs"]} runs')
             for e in (entry.get(reg) for reg in REGIONS)]
    rows.append(f'| {label}, run-level interval | ' + ' | '.join(cells) + ' |')
  return rows


def _diff_cell(mean, lo, hi, tail):
  """'+1.2 [-0.3, +2.7] <tail>', with ' *' when the interval excludes 0."""
  flag = ' *' if (lo > 0 or hi < 0) else ''
  return f'{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] {tail}{flag}'


def markdown(report, args):
  lines = [f'# Variant comparison ({report["runs"]} finished runs)', '',
           f'Command: `python experiments/compare_variants.py {" ".join(args.argv)}`', '',
           '## 15-subset mean per variant (mean +- std over folds/seeds)', '',
           '| variant | runs | Dice WT | Dice TC | Dice ET | HD95 WT | HD95 TC | HD95 ET | '
           'teacher Dice WT / TC / ET |', '|---|---:|---|---|---|---|---|---|---|']
  for v, s in report['variants'].items():
    def cell(key, pct=True):
      m, sd = s[key]['mean'], s[key]['std']
      if m is None:
        return '-'
      f = (lambda x: f'{100 * x:.1f}') if pct else (lambda x: f'{x:.1f}')
      return f(m) + (f' +- {f(sd)}' if sd is not None else '')
    teacher = ' / '.join(_pct(s[f'teacher_dice_{r}']['mean']) for r in REGIONS)
    lines.append(f'| {v} | {s["runs"]} | ' + ' | '.join(cell(f'dice_{r}') for r in REGIONS)
                 + ' | ' + ' | '.join(cell(f'hd95_{r}', False) for r in REGIONS)
                 + f' | {teacher} |')
  if any(s[f'seed_std_dice_{r}'] is not None for s in report['variants'].values()
         for r in REGIONS):
    lines += ['', '## Seed-to-seed spread (std of the 15-subset mean Dice between seeds of one '
              'fold, pooled over folds)', '', '| variant | WT | TC | ET |', '|---|---|---|---|']
    for v, s in report['variants'].items():
      lines.append(f'| {v} | ' + ' | '.join(_pct(s[f'seed_std_dice_{r}']) for r in REGIONS)
                   + ' |')
  runs = sorted({(r['fold'], r['seed']) for s in report['variants'].values()
                 for r in s['per_run']})
  lines += ['', '## 15-subset mean Dice per run (%, the fold\'s test cases), WT / TC / ET', '',
            '| fold | seed | ' + ' | '.join(report['variants']) + ' |',
            '|---:|---:|' + '---|' * len(report['variants'])]
  for fold, seed in runs:
    cells = []
    for s in report['variants'].values():
      match = [r for r in s['per_run'] if (r['fold'], r['seed']) == (fold, seed)]
      cells.append(' / '.join(_pct(match[0][f'dice_{r}']) for r in REGIONS) if match else '-')
    lines.append(f'| {fold} | {seed} | ' + ' | '.join(cells) + ' |')
  lines += ['', '## Mean Dice per subset (%, all test cases), WT / TC / ET', '',
            '| subset | ' + ' | '.join(report['variants']) + ' |',
            '|---|' + '---|' * len(report['variants'])]
  for subset in SUBSET_NAMES:
    cells = [' / '.join(_pct(s['per_subset_dice'][subset][r]) for r in REGIONS)
             for s in report['variants'].values()]
    lines.append(f'| {subset} | ' + ' | '.join(cells) + ' |')
  if report.get('dominance'):
    lines += ['', '## Dominance: steps that add one modality and lower the mean Dice (of 28; '
              'outside the noise: the 95 % interval over test cases below 0)', '',
              '| variant | region | lower | outside the noise | mean of the lower | worst step | '
              'all four minus best subset |', '|---|---|---:|---:|---:|---|---|']
    for v, found in report['dominance'].items():
      for region, e in found['regions'].items():
        w = e['worst']
        gap = ('-' if 'all_four_minus_best' not in e else
               f"{100 * e['all_four_minus_best']:+.1f} ({e['best_subset']})")
        lines.append(f"| {v} | {region} | {e['lower']} | {e['lower_outside_noise']} | "
                     f"{100 * e['mean_of_lower']:+.1f} | {w['from']} +{w['added']}: "
                     f"{100 * w['mean']:+.1f} | {gap} |")
    flagged = [f'{v}: {line}' for v, found in report['dominance'].items()
               for line in dominance_flags(found)]
    lines += [''] + [f'Flag: {line}.' for line in flagged]
  for v, p in report['paired'].items():
    lines += ['', f'## Paired: {v} minus {args.baseline} (Dice points, 95 % CI over test cases; '
              'improved / worse cases)', '', '| subsets | WT | TC | ET |', '|---|---|---|---|']
    for label, entry in [('15-subset mean', p['mean_15'])] + list(p['per_subset'].items()):
      lines += paired_table_rows(label, entry, run_level=label == '15-subset mean')
    lines.append('')
    lines.append('`*`: the 95 % interval excludes 0. The run-level interval takes each training '
                 'run (fold x seed: its test cases share its noise) as one unit; it is the one '
                 'to trust when there are few seeds per fold.')
  return '\n'.join(lines) + '\n'


def figure(report, path, baseline):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  variants = list(report['paired'])
  if not variants:
    return None
  fig, axes = plt.subplots(len(REGIONS), 1, figsize=(12, 3 * len(REGIONS)), sharex=True)
  labels = ['mean'] + list(SUBSET_NAMES)
  x = np.arange(len(labels))
  width = 0.8 / len(variants)
  for ax, reg in zip(axes, REGIONS):
    for i, v in enumerate(variants):
      p = report['paired'][v]
      entries = [p['mean_15'].get(reg)] + [p['per_subset'][s].get(reg) for s in SUBSET_NAMES]
      means = [100 * e['mean'] if e else np.nan for e in entries]
      lo = [100 * (e['mean'] - e['ci95'][0]) if e else np.nan for e in entries]
      hi = [100 * (e['ci95'][1] - e['mean']) if e else np.nan for e in entries]
      ax.bar(x + (i - (len(variants) - 1) / 2) * width, means, width, yerr=[lo, hi],
             capsize=2, label=v)
    ax.axhline(0, color='k', lw=0.8)
    ax.set_ylabel(f'{reg}: Dice diff (points)')
  axes[0].set_title(f'Paired difference to {baseline} per test case (mean, 95 % CI)')
  axes[0].legend(fontsize=8)
  axes[-1].set_xticks(x)
  axes[-1].set_xticklabels(labels, rotation=45, ha='right', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_report(args, runs):
  variants = [parse_variant(v)[0] for v in args.variants]
  report = summarise(runs, variants, args.baseline)
  report['command'] = 'python experiments/compare_variants.py ' + ' '.join(args.argv)
  with open(os.path.join(args.out, 'report.json'), 'w') as f:
    json.dump(report, f, indent=1)
  text = markdown(report, args)
  with open(os.path.join(args.out, 'report.md'), 'w') as f:
    f.write(text)
  figure(report, os.path.join(args.out, 'paired.png'), args.baseline)
  print(text)
  return report


def smoke_root(out):
  """Eight tiny synthetic cases (the smoke test's data)."""
  from mstkd_jax.data import synthetic
  root = os.path.join(out, 'synthetic')
  if not os.path.isdir(root):
    synthetic.generate_dataset(root, 8, shape=(40, 40, 36), layout='brats2021', seed=0,
                               workers=0)
  return root


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--root', help='folder of case folders (BraTS layouts)')
  parser.add_argument('--out', required=True, help='folder of the runs and the report')
  parser.add_argument('--config', default='configs/cpu_real.py', help='config file')
  parser.add_argument('--variants', default='mstkd,plain',
                      help='comma-separated: mstkd, plain, no_mstkd, no_gsme, no_slkd, '
                      'optionally +field=value overrides')
  parser.add_argument('--base-variant', default='',
                      help="a config variant applied to every run (e.g. 'tiny')")
  parser.add_argument('--baseline', default='plain', help='the variant others are paired with')
  parser.add_argument('--folds', type=int, default=5)
  parser.add_argument('--val-cases', type=int, default=1)
  parser.add_argument('--steps', type=int, default=1500, help='training steps of every run')
  parser.add_argument('--seeds', default='0',
                      help='comma-separated seeds; each fold x variant is trained once per seed '
                      '(seed 0 in fold<k>/, seed s in fold<k>_seed<s>/)')
  parser.add_argument('--only-folds', default='',
                      help='comma-separated fold indices to train and report (default: all)')
  parser.add_argument('--override', action='append', default=[],
                      help='a --config.field=value given to every run (repeatable)')
  parser.add_argument('--report-only', action='store_true',
                      help='only (re)write the report from the finished runs')
  parser.add_argument('--smoke', action='store_true',
                      help='tiny synthetic cases and model, 2 folds, a few steps (the test)')
  args = parser.parse_args(argv)
  args.argv = argv
  args.variants = [v for v in args.variants.split(',') if v]
  args.seeds = [int(s) for s in args.seeds.split(',') if s.strip()] or [0]
  args.fold_ids = ([int(k) for k in args.only_folds.split(',') if k.strip()]
                   or list(range(args.folds)))
  bad = [k for k in args.fold_ids if not 0 <= k < args.folds]
  if bad:
    parser.error(f'--only-folds {bad}: fold indices run from 0 to {args.folds - 1}')
  os.makedirs(args.out, exist_ok=True)
  if args.smoke:
    args.config, args.base_variant = 'configs/brats.py', 'tiny'
    args.override = ['--config.train.eval_every_epochs=1'] + list(args.override)
  if args.smoke and not args.root:
    args.root = smoke_root(args.out)
  if not args.root and not args.report_only:
    parser.error('--root is required (or --smoke)')
  folds = None
  if args.root:
    folds = make_folds(list_cases(args.root), args.folds, args.val_cases)
  if not args.report_only:
    runs = run_all(args, folds)
  else:
    runs = [(k, s, parse_variant(v)[0], run_dir(args.out, k, s, parse_variant(v)[0]))
            for s in args.seeds for k in args.fold_ids for v in args.variants]
  write_report(args, runs)
  return 0


if __name__ == '__main__':
  sys.exit(main())
