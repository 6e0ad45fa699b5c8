"""Where does adding a scan make the student worse? Dominance tables and heat maps over runs.

  python experiments/dominance_report.py --out <folder> \
      'plain=results/quality_seeds60_fold0/plain_seed*/per_case.csv' 'frozen=...' ...

Each argument is LABEL=GLOB[,GLOB...]: the per_case.csv files of one recipe (one file per training run;
the runs may share test cases). Per recipe and region, for each of the 28 steps "subset S ->
S plus modality m": the change of Dice in each run (mean over its test cases,
``mstkd_jax.report.dominance``), its mean over runs and a 95 % Student-t interval over runs
(the run, not the case, is the unit: a recipe's seed noise is in it). Writes
``<out>/dominance.md`` (tables), ``<out>/dominance.json`` and ``<out>/dominance_<label>.png``
(per region a subsets x added-modality heat map of the mean change; '*' marks an interval that
excludes 0).
"""

import argparse
import glob
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mstkd_jax import report  # noqa: E402
from mstkd_jax.metrics import REGIONS  # noqa: E402
from mstkd_jax.modalities import ALL_SUBSETS, FULL, MODALITIES, subset_name  # noqa: E402

FROM_SUBSETS = [subset_name(s) for s in ALL_SUBSETS if s != FULL]


def over_runs(files):
  """{region: {(from, added): {'mean', 'ci95', 'runs', 'lower_runs'}}, 'full_minus_best':
  {region: (mean, low, high) over runs of all four minus that run's best other subset}}."""
  per_run = [report.dominance(report.read_per_case_csv(f)) for f in files]
  steps = {}
  for found in per_run:
    for s in found['steps']:
      steps.setdefault(s['region'], {}).setdefault((s['from'], s['added']), []).append(s['mean'])
  out = {'runs': len(files), 'steps': {}, 'full_minus_best': {}, 'summary': {}}
  for region, by_step in steps.items():
    out['steps'][region] = {}
    for key, values in by_step.items():
      mean, low, high = report.mean_interval(values)
      out['steps'][region][key] = {'mean': mean, 'ci95': [low, high], 'runs': len(values),
                                   'lower_runs': int(sum(v < 0 for v in values))}
    gaps = [f['regions'][region]['all_four_minus_best'] for f in per_run
            if 'all_four_minus_best' in f['regions'].get(region, {})]
    out['full_minus_best'][region] = report.mean_interval(gaps) if gaps else None
    entries = list(out['steps'][region].values())
    lower = [e for e in entries if e['mean'] < 0]
    out['summary'][region] = {
        'lower': len(lower),
        'lower_outside_noise': sum(e['ci95'][1] < 0 for e in lower),
        'mean_of_lower': float(np.mean([e['mean'] for e in lower])) if lower else 0.0,
        'steps': len(entries)}
  return out


def _fmt(v):
  return f'{100 * v:+.1f}'


def markdown(results, argv):
  lines = ['# Dominance: adding one scan to a subset, per recipe', '',
           f'Command: `python experiments/dominance_report.py {" ".join(argv)}`', '',
           'Per region, of the 28 steps S -> S + m: how many lower the mean Dice (mean over '
           'runs), how many with the 95 % interval over runs below 0, the mean fall of those '
           'lower, and all four scans minus the best other subset (mean over runs [interval]).',
           '', '| recipe | runs | region | lower | outside the noise | mean fall | '
           'all four minus best subset |', '|---|---:|---|---:|---:|---:|---|']
  for label, r in results.items():
    for region in REGIONS:
      s = r['summary'][region]
      gap = r['full_minus_best'][region]
      gap = '-' if gap is None else (f'{_fmt(gap[0])} [{_fmt(gap[1])}, {_fmt(gap[2])}]'
                                     if not np.isnan(gap[1]) else _fmt(gap[0]))
      lines.append(f"| {label} | {r['runs']} | {region} | {s['lower']} | "
                   f"{s['lower_outside_noise']} | {_fmt(s['mean_of_lower'])} | {gap} |")
  for label, r in results.items():
    lines += ['', f'## {label}: mean change of Dice when a scan is added (points; runs lower / '
              'runs; `*`: interval over runs excludes 0)', '',
              '| region | subset | ' + ' | '.join(f'+{m}' for m in MODALITIES) + ' |',
              '|---|---|' + '---|' * len(MODALITIES)]
    for region in REGIONS:
      for name in FROM_SUBSETS:
        cells = []
        for m in MODALITIES:
          e = r['steps'][region].get((name, m))
          if e is None:
            cells.append('')
            continue
          star = ' *' if (e['ci95'][0] > 0 or e['ci95'][1] < 0) else ''
          cells.append(f"{_fmt(e['mean'])} ({e['lower_runs']}/{e['runs']}){star}")
        lines.append(f'| {region} | {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def figure(label, r, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(REGIONS), figsize=(13, 6), sharey=True)
  for ax, region in zip(axes, REGIONS):
    grid = np.full((len(FROM_SUBSETS), len(MODALITIES)), np.nan)
    for i, name in enumerate(FROM_SUBSETS):
      for j, m in enumerate(MODALITIES):
        e = r['steps'][region].get((name, m))
        if e is not None:
          grid[i, j] = 100 * e['mean']
          star = '*' if (e['ci95'][0] > 0 or e['ci95'][1] < 0) else ''
          ax.text(j, i, f'{grid[i, j]:+.0f}{star}', ha='center', va='center', fontsize=8)
    image = ax.imshow(grid, cmap='RdBu', vmin=-20, vmax=20, aspect='auto')
    ax.set_xticks(range(len(MODALITIES)))
    ax.set_xticklabels([f'+{m}' for m in MODALITIES])
    ax.set_title(f'{region}')
  axes[0].set_yticks(range(len(FROM_SUBSETS)))
  axes[0].set_yticklabels(FROM_SUBSETS, fontsize=8)
  fig.colorbar(image, ax=axes, shrink=0.8, label='Dice change (points)')
  fig.suptitle(f'{label}: Dice change when a scan is added to a subset (mean over '
               f'{r["runs"]} runs; red: worse; *: 95 % interval over runs excludes 0)')
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('groups', nargs='+', help='LABEL=GLOB[,GLOB...] of per_case.csv files')
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  results = {}
  for group in args.groups:
    label, _, pattern = group.partition('=')
    files = sorted(f for p in pattern.split(',') for f in glob.glob(p))
    if not label or not files:
      raise SystemExit(f'{group!r}: give LABEL=GLOB matching per_case.csv files')
    results[label] = over_runs(files)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'dominance.json'), 'w') as f:
    json.dump({label: {'runs': r['runs'], 'summary': r['summary'],
                       'full_minus_best': r['full_minus_best'],
                       'steps': {reg: {f'{a} +{m}': e for (a, m), e in by.items()}
                                 for reg, by in r['steps'].items()}}
               for label, r in results.items()}, f, indent=1)
  text = markdown(results, argv)
  with open(os.path.join(args.out, 'dominance.md'), 'w') as f:
    f.write(text)
  for label, r in results.items():
    figure(label, r, os.path.join(args.out, f'dominance_{label}.png'))
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
