"""The 15-subset evaluation report: per-case CSV -> summary JSON -> paper-style table.

Everything is derived from the per-case rows (case, subset, region, dice, hd95), so the summary
and the tables can be regenerated from ``per_case.csv`` alone:

    python -m mstkd_jax.report per_case.csv            # terminal table
    python -m mstkd_jax.report per_case.csv --markdown # table.md text
    python -m mstkd_jax.report per_case.csv --out DIR  # rewrite summary.json and table.md

Every report also says where the network gets worse when it is given more: ``dominance``
takes each of the 28 steps "subset -> the subset plus one modality" per region, the per-case
change of Dice and its 95 % interval over cases, and flags the steps that lower Dice outside the
noise and a full input that scores below a smaller subset (``summary['dominance']``, a section
under each table).

Dice is stored as a fraction in [0, 1] (CSV, JSON) and shown in % in the tables; HD95 in mm.
Subsets are named as in ``subsets.subset_name`` ('FLAIR+T1Gd'); rows of the full-modality
teacher, when recorded, use the subset name ``TEACHER_SUBSET``.
"""

import csv
import json
import math
import os
import sys

from absl import flags
import numpy as np

from mstkd_jax import cli
from mstkd_jax.metrics import BRATS_EMPTY_HD95, REGIONS
from mstkd_jax.modalities import ALL_SUBSETS, FULL, MODALITIES, parse_subset, subset_name

CSV_COLUMNS = ('case', 'subset', 'region', 'dice', 'hd95')
TEACHER_SUBSET = 'teacher(all)'
SUBSET_NAMES = tuple(subset_name(s) for s in ALL_SUBSETS)
UNSTATED = 'unstated'
CONVENTION_NOTES = {
    'brats': ('BraTS convention: a region empty in exactly one of prediction and reference scores '
              f'Dice 0 and HD95 {BRATS_EMPTY_HD95} mm; empty in both, Dice 100 % and HD95 0 mm'),
    'authors': ("authors' convention: a region empty in exactly one of prediction and reference "
                'scores Dice 0 and HD95 0 mm (flatters missed regions); empty in both, Dice 100 % '
                'and HD95 0 mm'),
    UNSTATED: 'HD95 convention not stated (give --convention or keep summary.json beside the CSV)',
}


def _canonical_subset(name):
  """'1010', 'flair+t1ce' or a bool tuple -> 'FLAIR+T1Gd'; other names are kept as given."""
  if not isinstance(name, str):
    return subset_name(tuple(bool(x) for x in name))
  if name == TEACHER_SUBSET:
    return name
  try:
    return subset_name(parse_subset(name))
  except ValueError:
    return name


def metric_rows(case, subset, metrics):
  """Rows for one case and subset from ``metrics.case_metrics`` output.

  ``subset`` is a boolean 4-tuple, a subset name/mask string, or ``TEACHER_SUBSET``.
  """
  name = _canonical_subset(subset)
  return [{'case': str(case), 'subset': name, 'region': region,
           'dice': float(metrics[region]['dice']), 'hd95': float(metrics[region]['hd95'])}
          for region in REGIONS]


def write_per_case_csv(rows, path):
  """Writes the rows (dicts with ``CSV_COLUMNS``); floats at full precision."""
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
      writer.writerow([row['case'], row['subset'], row['region'],
                       repr(float(row['dice'])), repr(float(row['hd95']))])


def read_per_case_csv(path):
  """Reads a CSV written by ``write_per_case_csv`` into a list of row dicts."""
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    missing = set(CSV_COLUMNS) - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f'{path}: missing column(s) {sorted(missing)}; expected {CSV_COLUMNS}')
    return [{'case': r['case'], 'subset': r['subset'], 'region': r['region'],
             'dice': float(r['dice']), 'hd95': float(r['hd95'])} for r in reader]


def summarize(rows, convention=UNSTATED):
  """Means per subset x region, their average over the 15 subsets, case counts, convention.

  Returns a JSON-ready dict:
    hd95_convention, hd95_convention_note, units, num_cases (distinct cases in all rows),
    subsets: {name: {region: {dice, hd95, num_cases}}} (the 15 in table order, present ones only,
      then any other subset names found), average_over_subsets: {region: {dice, hd95}} (mean of
      the per-subset means over the paper's subsets present), num_subsets_averaged,
    and teacher: {region: {...}} when rows of ``TEACHER_SUBSET`` exist.
  """
  if convention not in CONVENTION_NOTES:
    raise ValueError(f'unknown convention {convention!r}; use one of {tuple(CONVENTION_NOTES)}')
  groups = {}
  seen = set()
  for row in rows:
    subset, region = _canonical_subset(row['subset']), row['region']
    if region not in REGIONS:
      raise ValueError(f'unknown region {region!r} in row {row}; expected one of {REGIONS}')
    key = (str(row['case']), subset, region)
    if key in seen:
      raise ValueError(f'duplicate row for case {key[0]!r}, subset {subset!r}, region {region}')
    seen.add(key)
    groups.setdefault(subset, {}).setdefault(region, []).append(
        (float(row['dice']), float(row['hd95'])))

  def region_means(by_region):
    out = {}
    for region in REGIONS:
      values = np.asarray(by_region.get(region, []), dtype=np.float64).reshape(-1, 2)
      if len(values):
        out[region] = {'dice': float(values[:, 0].mean()), 'hd95': float(values[:, 1].mean()),
                       'num_cases': int(len(values))}
    return out

  order = [n for n in SUBSET_NAMES if n in groups]
  order += sorted(n for n in groups if n not in SUBSET_NAMES and n != TEACHER_SUBSET)
  per_subset = {name: region_means(groups[name]) for name in order}
  average = {}
  paper_subsets = [n for n in SUBSET_NAMES if n in per_subset]
  for region in REGIONS:
    present = [per_subset[n][region] for n in paper_subsets if region in per_subset[n]]
    if present:
      average[region] = {'dice': float(np.mean([m['dice'] for m in present])),
                         'hd95': float(np.mean([m['hd95'] for m in present])),
                         'num_subsets': len(present)}
  summary = {
      'hd95_convention': convention,
      'hd95_convention_note': CONVENTION_NOTES[convention],
      'units': {'dice': 'fraction in [0, 1] (tables show %)', 'hd95': 'mm'},
      'num_cases': len({case for case, _, _ in seen}),
      'subsets': per_subset,
      'average_over_subsets': average,
      'num_subsets_averaged': len(paper_subsets),
  }
  if TEACHER_SUBSET in groups:
    summary['teacher'] = region_means(groups[TEACHER_SUBSET])
  found = dominance(rows)
  if found['steps']:
    summary['dominance'] = found
  return summary


# ----------------------------------------------------------------------------------------------
# Dominance: where a subset with one more modality scores lower


def _steps():
  """(subset, added channel, superset) for every subset of ALL_SUBSETS short of the full input
  and every modality it lacks: 12 + 12 + 4 = 28 steps."""
  out = []
  for subset in ALL_SUBSETS:
    for m in range(len(MODALITIES)):
      if not subset[m]:
        out.append((subset, m, tuple(present or i == m for i, present in enumerate(subset))))
  return out


def mean_interval(values, confidence=0.95):
  """(mean, low, high): the Student-t interval of the mean over ``values`` (scipy.stats.t);
  low = high = nan below two values."""
  values = np.asarray(values, np.float64)
  mean = float(values.mean())
  if len(values) < 2:
    return mean, float('nan'), float('nan')
  sem = float(values.std(ddof=1)) / math.sqrt(len(values))
  if sem == 0.0:
    return mean, mean, mean
  from scipy import stats  # pylint: disable=import-outside-toplevel  (seconds at start-up)
  low, high = stats.t.interval(confidence, len(values) - 1, loc=mean, scale=sem)
  return mean, float(low), float(high)


def dice_table(rows):
  """{(case, subset name, region): Dice} of per-case rows; rows repeated for a key (several
  runs of one case) are averaged."""
  values = {}
  for row in rows:
    subset = _canonical_subset(row['subset'])
    values.setdefault((str(row['case']), subset, row['region']), []).append(float(row['dice']))
  return {k: float(np.mean(v)) for k, v in values.items()}


def dominance(rows):
  """Where adding a modality lowers Dice, from per-case rows (case, subset, region, dice).

  For each region and each of the 28 steps S -> S + m (``_steps``), the per-case difference
  Dice(S + m) - Dice(S) over the cases that have both, its mean and 95 % Student-t interval
  over cases; a step is 'lower' when the mean is below 0 and 'lower outside the noise' when
  the whole interval is. (The cases of one evaluation share one trained network: the interval
  says whether *this network* loses, not whether its recipe does.) Per region: counts, the
  mean of the lowering steps, the worst step, the full input against the best subset; per
  region and added modality: the mean change over its 7 steps. JSON-ready; Dice as fractions.
  The best subset is the maximum of 14 noisy means: a full input a little below it is
  expected by chance; ``subset_selection`` measures whether choosing it pays on new cases.
  """
  table = dice_table(rows)
  cases = sorted({k[0] for k in table})
  steps = []
  for region in REGIONS:
    for subset, m, superset in _steps():
      small, large = subset_name(subset), subset_name(superset)
      diffs = [table[(c, large, region)] - table[(c, small, region)] for c in cases
               if (c, large, region) in table and (c, small, region) in table]
      if not diffs:
        continue
      mean, low, high = mean_interval(diffs)
      steps.append({'region': region, 'from': small, 'added': MODALITIES[m], 'to': large,
                    'mean': mean, 'ci95': [low, high], 'cases': len(diffs),
                    'worse_cases': int(sum(d < 0 for d in diffs)),
                    'outside_noise': bool(high < 0 or low > 0)})
  regions, added = {}, {}
  for region in REGIONS:
    mine = [s for s in steps if s['region'] == region]
    if not mine:
      continue
    lower = [s for s in mine if s['mean'] < 0]
    entry = {'steps': len(mine), 'lower': len(lower),
             'lower_outside_noise': sum(s['outside_noise'] for s in lower),
             'mean_of_lower': float(np.mean([s['mean'] for s in lower])) if lower else 0.0,
             'worst': min(mine, key=lambda s: s['mean'])}
    means = {name: np.mean([v for (c, n, r), v in table.items() if n == name and r == region])
             for name in SUBSET_NAMES if any(k[1] == name and k[2] == region for k in table)}
    full = subset_name(FULL)
    if full in means and len(means) > 1:
      best = max((n for n in means if n != full), key=lambda n: means[n])
      entry.update(all_four=float(means[full]), best_subset=best,
                   best_subset_dice=float(means[best]),
                   all_four_minus_best=float(means[full] - means[best]))
    regions[region] = entry
    added[region] = {}
    for name in MODALITIES:
      theirs = [s for s in mine if s['added'] == name]
      if theirs:
        added[region][name] = {
            'steps': len(theirs), 'mean_change': float(np.mean([s['mean'] for s in theirs])),
            'lower': sum(s['mean'] < 0 for s in theirs),
            'lower_outside_noise': sum(s['mean'] < 0 and s['outside_noise'] for s in theirs)}
  return {'num_cases': len(cases), 'steps': steps, 'regions': regions, 'added': added}


def dominance_flags(found):
  """One sentence per region where more modalities score lower: the full input below a
  smaller subset, or steps that lower Dice outside the noise."""
  lines = []
  for region, e in found.get('regions', {}).items():
    parts = []
    if e.get('all_four_minus_best', 0.0) < 0:
      parts.append(f"all four {100 * e['all_four']:.1f} < {e['best_subset']} "
                   f"{100 * e['best_subset_dice']:.1f}")
    if e['lower_outside_noise']:
      parts.append(f"{e['lower_outside_noise']}/{e['steps']} steps lower it (*)")
    if parts:
      lines.append(f'{region}: ' + '; '.join(parts))
  return lines


def _worst_cell(e):
  w = e['worst']
  star = ' *' if w['mean'] < 0 and w['outside_noise'] else ''
  return f"{w['from']} +{w['added']} {100 * w['mean']:+.1f}{star}"


def _dominance_rows(found):
  """[[region, lower, lower*, mean fall, worst step, all four - best]] as strings."""
  rows = []
  for region, e in found['regions'].items():
    gap = ('-' if 'all_four_minus_best' not in e else
           f"{100 * e['all_four_minus_best']:+.1f} vs {e['best_subset']}")
    rows.append([region, f"{e['lower']}/{e['steps']}", str(e['lower_outside_noise']),
                 f"{100 * e['mean_of_lower']:+.1f}", _worst_cell(e), gap])
  return rows


def _added_rows(found):
  rows = []
  for region, by_modality in found['added'].items():
    rows.append([region] + [
        f"{100 * a['mean_change']:+.1f} ({a['lower']}/{a['steps']}, {a['lower_outside_noise']}*)"
        if a else '-' for a in (by_modality.get(m) for m in MODALITIES)])
  return rows


_DOMINANCE_HEAD = ['Region', 'lower', 'lower*', 'mean fall', 'worst step', 'all four - best']
_DOMINANCE_NOTE = ("Dominance over {n} cases: a step adds one modality to a subset (28 per "
                   "region); 'lower': its mean Dice change is negative, '*': its 95 % interval "
                   "over cases lies below 0 (outside the noise); Dice points.")


def dominance_markdown(found):
  """The dominance section of table.md (empty string when there is nothing to show)."""
  if not found or not found.get('regions'):
    return ''
  lines = ['#### Dominance: does adding a modality lower Dice?', '',
           _DOMINANCE_NOTE.format(n=found['num_cases']), '']
  flagged = dominance_flags(found)
  lines += [f'**Flag**: {line}.' for line in flagged] or ['No region is flagged.']
  lines += ['', '| ' + ' | '.join(_DOMINANCE_HEAD) + ' |', '|---|---:|---:|---:|---|---|']
  lines += ['| ' + ' | '.join(r) + ' |' for r in _dominance_rows(found)]
  lines += ['', 'Mean change when each modality is added (over its 7 steps; lower / steps, '
            'lower outside the noise):', '',
            '| Region | ' + ' | '.join(f'+{m}' for m in MODALITIES) + ' |',
            '|---|' + '---|' * len(MODALITIES)]
  lines += ['| ' + ' | '.join(r) + ' |' for r in _added_rows(found)]
  return '\n'.join(lines) + '\n'


def dominance_text(found):
  """The dominance section as plain text (lines of at most 80 characters)."""
  if not found or not found.get('regions'):
    return ''
  lines = [f"Dominance over {found['num_cases']} cases (28 steps per region, each adds one "
           'modality);',
           "'lower': mean Dice change < 0; '*': its 95 % interval over cases is below 0."]
  lines += [f'FLAG {line}' for line in dominance_flags(found)] or ['No region is flagged.']
  rows = [['Region', 'lower', 'lower*', 'fall', 'worst step']] + [
      r[:5] for r in _dominance_rows(found)]
  widths = [max(len(r[j]) for r in rows) for j in range(5)]
  for r in rows:
    lines.append('  '.join(c.ljust(w) if j in (0, 4) else c.rjust(w)
                           for j, (c, w) in enumerate(zip(r, widths))).rstrip())
  lines.append('Mean change when a modality is added (lower/7, lower*):')
  rows = [['Region'] + [f'+{m}' for m in MODALITIES]] + [
      [r[0]] + [c.replace(', ', ',') for c in r[1:]] for r in _added_rows(found)]
  widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
  for r in rows:
    lines.append('  '.join(c.ljust(w) if j == 0 else c.rjust(w)
                           for j, (c, w) in enumerate(zip(r, widths))).rstrip())
  return '\n'.join(lines) + '\n'


def write_summary_json(summary, path):
  with open(path, 'w') as f:
    json.dump(summary, f, indent=2)
    f.write('\n')


def _table_cells(summary):
  """(column names, {(metric, region): [cell strings]}) with the 15 subsets then 'Avg'."""
  columns = list(SUBSET_NAMES) + ['Avg']
  cells = {}
  for metric, scale in (('dice', 100.0), ('hd95', 1.0)):
    for region in REGIONS:
      row = []
      for name in columns:
        source = (summary['average_over_subsets'] if name == 'Avg'
                  else summary['subsets'].get(name, {}))
        value = source.get(region, {}).get(metric)
        row.append('-' if value is None or not math.isfinite(value) else f'{value * scale:.2f}')
      cells[(metric, region)] = row
  return columns, cells


_METRIC_LABELS = {'dice': 'Dice (%)', 'hd95': 'HD95 (mm)'}


def _header_lines(summary):
  lines = [f"Mean over {summary['num_cases']} cases per modality subset; Avg = mean over "
           f"{summary['num_subsets_averaged']} subsets.",
           f"HD95 convention: {summary['hd95_convention']} ({summary['hd95_convention_note']})."]
  missing = [n for n in SUBSET_NAMES if n not in summary['subsets']]
  if missing:
    lines.append(f"Subsets without results ('-'): {', '.join(missing)}.")
  return lines


def _teacher_line(summary):
  teacher = summary.get('teacher')
  if not teacher:
    return None
  parts = []
  for metric, scale in (('dice', 100.0), ('hd95', 1.0)):
    values = '/'.join(f"{teacher[r][metric] * scale:.2f}" if r in teacher else '-'
                      for r in REGIONS)
    parts.append(f'{_METRIC_LABELS[metric]} WT/TC/ET {values}')
  return f'Teacher, all four modalities: {"; ".join(parts)}.'


def markdown_table(summary, title=None):
  """The paper's Tables 1-2 layout: Dice rows WT/TC/ET, then HD95 rows; 15 subsets + Avg."""
  columns, cells = _table_cells(summary)
  lines = []
  if title:
    lines += [f'### {title}', '']
  lines += _header_lines(summary) + ['']
  lines.append('| Metric | Region | ' + ' | '.join(columns) + ' |')
  lines.append('|---|---|' + '---:|' * len(columns))
  for metric in ('dice', 'hd95'):
    for i, region in enumerate(REGIONS):
      label = _METRIC_LABELS[metric] if i == 0 else ''
      lines.append(f'| {label} | {region} | ' + ' | '.join(cells[(metric, region)]) + ' |')
  teacher = _teacher_line(summary)
  if teacher:
    lines += ['', teacher]
  section = dominance_markdown(summary.get('dominance'))
  return '\n'.join(lines) + '\n' + ('\n' + section if section else '')


def text_table(summary, wide=False):
  """The table as aligned plain text for a terminal.

  By default one line per subset (columns Dice WT/TC/ET, HD95 WT/TC/ET), which fits 80 columns;
  ``wide=True`` keeps the paper's layout (subsets as columns, about 250 characters wide).
  """
  columns, cells = _table_cells(summary)
  lines = _header_lines(summary) + ['']
  if wide:
    header = ['Metric', 'Region'] + columns
    body = []
    for metric in ('dice', 'hd95'):
      for i, region in enumerate(REGIONS):
        body.append([_METRIC_LABELS[metric] if i == 0 else '', region] + cells[(metric, region)])
    widths = [max(len(r[j]) for r in [header] + body) for j in range(len(header))]
    for r in [header] + body:
      lines.append('  '.join(c.ljust(w) if j < 2 else c.rjust(w)
                             for j, (c, w) in enumerate(zip(r, widths))).rstrip())
  else:
    metric_columns = [(m, r) for m in ('dice', 'hd95') for r in REGIONS]
    header = ['Subset'] + [f"{'Dice' if m == 'dice' else 'HD95'} {r}" for m, r in metric_columns]
    body = [[name] + [cells[key][j] for key in metric_columns] for j, name in enumerate(columns)]
    widths = [max(len(r[j]) for r in [header] + body) for j in range(len(header))]
    for k, r in enumerate([header] + body):
      if k == len(body):  # a rule above the Avg line
        lines.append('-' * (sum(widths) + 2 * (len(widths) - 1)))
      lines.append('  '.join(c.ljust(w) if j == 0 else c.rjust(w)
                             for j, (c, w) in enumerate(zip(r, widths))))
    lines.append('Dice in %, HD95 in mm.')
  teacher = _teacher_line(summary)
  if teacher:
    lines += ['', teacher]
  section = dominance_text(summary.get('dominance'))
  return '\n'.join(lines) + '\n' + ('\n' + section if section else '')


def write_report(rows, out_dir, convention='brats', title=None):
  """Writes per_case.csv, summary.json and table.md into ``out_dir``; returns the summary."""
  rows = list(rows)
  summary = summarize(rows, convention)
  os.makedirs(out_dir, exist_ok=True)
  write_per_case_csv(rows, os.path.join(out_dir, 'per_case.csv'))
  write_summary_json(summary, os.path.join(out_dir, 'summary.json'))
  with open(os.path.join(out_dir, 'table.md'), 'w') as f:
    f.write(markdown_table(summary, title=title))
  return summary


def _convention_beside(csv_path):
  """The convention recorded in summary.json next to the CSV, if any."""
  path = os.path.join(os.path.dirname(os.path.abspath(csv_path)), 'summary.json')
  try:
    with open(path) as f:
      value = json.load(f).get('hd95_convention')
  except (OSError, ValueError, AttributeError):
    return None
  return value if value in CONVENTION_NOTES else None


COMMAND = cli.Command('python -m mstkd_jax.report', __doc__)
flags.DEFINE_enum('convention', None, ('brats', 'authors'), 'HD95 convention the CSV was '
                  'computed with (default: the one in summary.json beside the CSV).',
                  flag_values=COMMAND.flags)
flags.DEFINE_bool('markdown', False, 'Print the Markdown table.', flag_values=COMMAND.flags)
flags.DEFINE_bool('wide', False, 'Plain text in the paper layout.', flag_values=COMMAND.flags)
flags.DEFINE_string('out', None, 'Also write summary.json and table.md into this folder.',
                    flag_values=COMMAND.flags)


def main(argv=None):
  """``python -m mstkd_jax.report per_case.csv [flags]``; returns the exit status."""
  rest = COMMAND.parse(argv)
  if len(rest) != 1:
    cli.fail('give one per_case.csv (columns ' + ', '.join(CSV_COLUMNS) + ')')
  args, csv_path = COMMAND.flags, rest[0]
  convention = args.convention or _convention_beside(csv_path) or UNSTATED
  try:
    summary = summarize(read_per_case_csv(csv_path), convention)
  except (OSError, ValueError) as e:
    cli.fail(cli.one_line(e))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    write_summary_json(summary, os.path.join(args.out, 'summary.json'))
    with open(os.path.join(args.out, 'table.md'), 'w') as f:
      f.write(markdown_table(summary))
  text = markdown_table(summary) if args.markdown else text_table(summary, wide=args.wide)
  sys.stdout.write(text)
  return 0


def console_main():
  """The ``mstkd-report`` command (``pip install .``)."""
  sys.exit(main())


if __name__ == '__main__':
  console_main()
