"""The 15-subset report: CSV, summary, tables, and regenerating them from the CSV."""

import csv
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest

from mstkd_jax import report
from mstkd_jax.metrics import REGIONS
from mstkd_jax.modalities import ALL_SUBSETS, subset_name

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_rows(num_cases=4, seed=0, subsets=ALL_SUBSETS, teacher=True):
  rng = np.random.default_rng(seed)
  rows = []
  for c in range(num_cases):
    case = f'BraTS-GLI-{c:05d}-000'
    for subset in subsets:
      metrics = {r: {'dice': rng.uniform(0, 1), 'hd95': rng.choice([rng.uniform(0, 30), 373.13])}
                 for r in REGIONS}
      rows += report.metric_rows(case, subset, metrics)
    if teacher:
      metrics = {r: {'dice': rng.uniform(0.5, 1), 'hd95': rng.uniform(0, 10)} for r in REGIONS}
      rows += report.metric_rows(case, report.TEACHER_SUBSET, metrics)
  return rows


def _csv_means(path):
  """Means per (subset, region) straight from the CSV file, independently of report.py."""
  values = {}
  with open(path, newline='') as f:
    for r in csv.DictReader(f):
      values.setdefault((r['subset'], r['region']), []).append(
          (float(r['dice']), float(r['hd95'])))
  return {k: np.mean(v, axis=0) for k, v in values.items()}


def _parse_markdown(text):
  """Header cells and {(metric, region): [floats or None]} of the (first) Markdown table."""
  lines = text.splitlines()
  first = next(i for i, line in enumerate(lines) if line.startswith('|'))
  table = []
  for line in lines[first:]:
    if not line.startswith('|'):
      break
    table.append(line)
  split = lambda line: [c.strip() for c in line.strip().strip('|').split('|')]
  header = split(table[0])
  assert set(table[1]) <= set('|-:')
  body, metric = {}, None
  for line in table[2:]:
    cells = split(line)
    metric = cells[0] or metric
    body[(metric, cells[1])] = [None if c == '-' else float(c) for c in cells[2:]]
  return header, body


def test_metric_rows_layout_and_subset_names():
  rows = report.metric_rows('c1', (True, False, True, False),
                            {r: {'dice': 0.5, 'hd95': 2.0} for r in REGIONS})
  assert [r['region'] for r in rows] == ['WT', 'TC', 'ET']
  assert {r['subset'] for r in rows} == {'FLAIR+T1Gd'}
  assert set(rows[0]) == set(report.CSV_COLUMNS)
  zeros = {r: {'dice': 0, 'hd95': 0} for r in REGIONS}
  assert report.metric_rows('c1', '1010', zeros)[0]['subset'] == 'FLAIR+T1Gd'
  assert report.metric_rows('c1', report.TEACHER_SUBSET, zeros)[0]['subset'] == 'teacher(all)'


def test_write_report_files_and_csv_round_trip(tmp_path):
  rows = _random_rows()
  summary = report.write_report(rows, tmp_path, convention='brats')
  assert sorted(os.listdir(tmp_path)) == ['per_case.csv', 'summary.json', 'table.md']
  back = report.read_per_case_csv(tmp_path / 'per_case.csv')
  assert back == rows                                    # exact floats
  with open(tmp_path / 'per_case.csv', newline='') as f:
    assert next(csv.reader(f)) == ['case', 'subset', 'region', 'dice', 'hd95']
  assert len(back) == 4 * 16 * 3
  with open(tmp_path / 'summary.json') as f:
    assert json.load(f) == summary


def test_summary_means_match_csv(tmp_path):
  rows = _random_rows(num_cases=5, seed=1)
  report.write_report(rows, tmp_path, convention='brats')
  means = _csv_means(tmp_path / 'per_case.csv')
  with open(tmp_path / 'summary.json') as f:
    summary = json.load(f)
  assert summary['hd95_convention'] == 'brats'
  assert summary['num_cases'] == 5
  assert summary['num_subsets_averaged'] == 15
  assert list(summary['subsets']) == [subset_name(s) for s in ALL_SUBSETS]
  for name in summary['subsets']:
    for region in REGIONS:
      entry = summary['subsets'][name][region]
      assert entry['num_cases'] == 5
      assert entry['dice'] == pytest.approx(means[(name, region)][0], rel=1e-12)
      assert entry['hd95'] == pytest.approx(means[(name, region)][1], rel=1e-12)
  for region in REGIONS:
    per_subset = np.array([means[(subset_name(s), region)] for s in ALL_SUBSETS])
    assert summary['average_over_subsets'][region]['dice'] == pytest.approx(per_subset[:, 0].mean())
    assert summary['average_over_subsets'][region]['hd95'] == pytest.approx(per_subset[:, 1].mean())
    assert summary['teacher'][region]['dice'] == pytest.approx(means[('teacher(all)', region)][0])


def test_markdown_table_has_15_subsets_plus_avg_and_matches_csv(tmp_path):
  report.write_report(_random_rows(num_cases=3, seed=2), tmp_path, convention='brats')
  text = (tmp_path / 'table.md').read_text()
  header, body = _parse_markdown(text)
  assert header == ['Metric', 'Region'] + [subset_name(s) for s in ALL_SUBSETS] + ['Avg']
  assert list(body) == [('Dice (%)', 'WT'), ('Dice (%)', 'TC'), ('Dice (%)', 'ET'),
                        ('HD95 (mm)', 'WT'), ('HD95 (mm)', 'TC'), ('HD95 (mm)', 'ET')]
  means = _csv_means(tmp_path / 'per_case.csv')
  for (metric, region), cells in body.items():
    assert len(cells) == 16
    k, scale = (0, 100.0) if metric.startswith('Dice') else (1, 1.0)
    expected = [means[(subset_name(s), region)][k] * scale for s in ALL_SUBSETS]
    expected.append(np.mean(expected))
    np.testing.assert_allclose(cells, expected, atol=0.005 + 1e-9)
  assert 'HD95 convention: brats' in text and '373.13' in text
  assert 'Teacher, all four modalities' in text


def test_convention_is_stated(tmp_path):
  rows = _random_rows(num_cases=1, teacher=False)
  text = report.markdown_table(report.summarize(rows, 'authors'))
  assert 'HD95 convention: authors' in text and 'HD95 0 mm' in text
  assert 'not stated' in report.markdown_table(report.summarize(rows))
  with pytest.raises(ValueError, match='convention'):
    report.summarize(rows, 'nnunet')


def test_cli_regenerates_table_from_csv(tmp_path):
  report.write_report(_random_rows(seed=3), tmp_path, convention='authors')
  table_md = (tmp_path / 'table.md').read_text()
  summary = json.loads((tmp_path / 'summary.json').read_text())
  csv_path = str(tmp_path / 'per_case.csv')

  out = io.StringIO()
  with redirect_stdout(out):
    assert report.main([csv_path, '--markdown']) == 0
  assert out.getvalue() == table_md                      # convention read from summary.json

  out_dir = tmp_path / 'again'
  with redirect_stdout(io.StringIO()):
    report.main([csv_path, '--out', str(out_dir)])
  assert (out_dir / 'table.md').read_text() == table_md
  assert json.loads((out_dir / 'summary.json').read_text()) == summary

  # A CSV on its own: the convention comes from the flag, or is marked as unstated.
  lone = tmp_path / 'lone'
  lone.mkdir()
  (lone / 'per_case.csv').write_text((tmp_path / 'per_case.csv').read_text())
  out = io.StringIO()
  with redirect_stdout(out):
    report.main([str(lone / 'per_case.csv'), '--markdown', '--convention', 'authors'])
  assert out.getvalue() == table_md
  out = io.StringIO()
  with redirect_stdout(out):
    report.main([str(lone / 'per_case.csv')])
  assert 'not stated' in out.getvalue()


def test_python_dash_m_prints_the_table(tmp_path):
  report.write_report(_random_rows(num_cases=2, seed=4), tmp_path, convention='brats')
  result = subprocess.run([sys.executable, '-m', 'mstkd_jax.report',
                           str(tmp_path / 'per_case.csv')],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  summary = report.summarize(report.read_per_case_csv(tmp_path / 'per_case.csv'), 'brats')
  assert result.stdout == report.text_table(summary)


def test_text_tables(tmp_path):
  summary = report.summarize(_random_rows(num_cases=2, seed=5), 'brats')
  lines = report.text_table(summary).splitlines()
  names = [subset_name(s) for s in ALL_SUBSETS] + ['Avg']
  body = [line for line in lines if line.split() and line.split()[0] in names]
  assert [line.split()[0] for line in body] == names
  for line in body:
    assert len(line.split()) == 7                        # name + Dice WT/TC/ET + HD95 WT/TC/ET
  assert max(len(line) for line in lines[2:] if not line.startswith('Teacher')) <= 80
  avg = body[-1].split()[1:]
  expected = [summary['average_over_subsets'][r]['dice'] * 100 for r in REGIONS]
  expected += [summary['average_over_subsets'][r]['hd95'] for r in REGIONS]
  np.testing.assert_allclose([float(v) for v in avg], expected, atol=0.005 + 1e-9)

  wide = report.text_table(summary, wide=True).splitlines()
  header = next(line for line in wide if line.startswith('Metric'))
  assert header.split() == ['Metric', 'Region'] + names
  assert 'HD95 convention: brats' in wide[1]


def test_missing_subsets_and_odd_input():
  some = ALL_SUBSETS[:3]
  summary = report.summarize(_random_rows(num_cases=2, subsets=some, teacher=False), 'brats')
  assert summary['num_subsets_averaged'] == 3
  assert 'teacher' not in summary
  _, body = _parse_markdown(report.markdown_table(summary))
  assert all(cells[3:15] == [None] * 12 and None not in cells[:3] and cells[15] is not None
             for cells in body.values())
  assert "Subsets without results ('-')" in report.markdown_table(summary)

  rows = _random_rows(num_cases=1, subsets=some[:1], teacher=False)
  with pytest.raises(ValueError, match='duplicate'):
    report.summarize(rows + rows[:1])
  with pytest.raises(ValueError, match='region'):
    report.summarize([dict(rows[0], region='NCR')])
  # Mask strings in a CSV are mapped to the canonical names.
  renamed = [dict(r, subset='1000') for r in rows]
  assert list(report.summarize(renamed)['subsets']) == ['FLAIR']


def test_read_csv_rejects_missing_columns(tmp_path):
  path = tmp_path / 'bad.csv'
  path.write_text('case,subset,region,dice\nc,FLAIR,WT,0.5\n')
  with pytest.raises(ValueError, match='hd95'):
    report.read_per_case_csv(path)


def _dominated_rows(num_cases=5, fall=0.10, noise=0.01, seed=0):
  """Rows in which every subset scores 0.5 + 0.05 per modality, except that adding FLAIR to
  a subset with T1Gd lowers ET by ``fall`` (plus small per-case noise)."""
  rng = np.random.default_rng(seed)
  rows = []
  for c in range(num_cases):
    for subset in ALL_SUBSETS:
      for region in REGIONS:
        dice = 0.5 + 0.05 * sum(subset) + noise * rng.standard_normal()
        if region == 'ET' and subset[0] and subset[2]:
          dice -= fall + 0.05
        rows.append({'case': f'c{c}', 'subset': subset_name(subset), 'region': region,
                     'dice': dice, 'hd95': 1.0})
  return rows


def test_dominance_finds_the_steps_that_lower_dice():
  found = report.dominance(_dominated_rows())
  assert found['num_cases'] == 5 and len(found['steps']) == 3 * 28
  et = found['regions']['ET']
  # FLAIR added to the 4 subsets holding T1Gd but not FLAIR, and T1Gd to the 4 holding FLAIR
  # but not T1Gd: -0.10 each, outside the noise.
  assert et['lower'] == 8 and et['lower_outside_noise'] == 8
  assert et['mean_of_lower'] == pytest.approx(-0.10, abs=0.02)
  assert et['worst']['added'] == 'FLAIR' and 'T1Gd' in et['worst']['from']
  assert found['added']['ET']['FLAIR'] == pytest.approx(
      {'steps': 7, 'mean_change': (4 * -0.10 + 3 * 0.05) / 7, 'lower': 4,
       'lower_outside_noise': 4}, abs=0.01)
  assert found['regions']['WT']['lower'] == 0
  assert found['regions']['WT']['all_four_minus_best'] > 0
  assert et['best_subset'] in ('T1+T1Gd+T2', 'FLAIR+T1+T2')     # both 0.65 up to noise
  assert et['all_four_minus_best'] == pytest.approx(0.55 - 0.65, abs=0.02)
  flags = report.dominance_flags(found)
  assert len(flags) == 1 and flags[0].startswith('ET: all four') and '8/28 steps' in flags[0]
  json.dumps(found)


def test_dominance_noise_and_repeated_runs():
  noisy = report.dominance(_dominated_rows(num_cases=3, fall=0.02, noise=0.05, seed=1))
  assert noisy['regions']['ET']['lower_outside_noise'] < 8
  one = report.dominance(_dominated_rows(num_cases=1))
  assert one['regions']['ET']['lower_outside_noise'] == 0      # no interval from one case
  # Two runs of the same cases: rows of a (case, subset, region) are averaged, not doubled.
  twice = _dominated_rows() + _dominated_rows(seed=2)
  assert report.dominance(twice)['num_cases'] == 5
  assert report.dominance([])['steps'] == []


def test_every_report_carries_the_dominance_section(tmp_path):
  summary = report.write_report(_dominated_rows(), tmp_path, convention='brats')
  assert summary['dominance']['regions']['ET']['lower_outside_noise'] == 8
  assert json.loads((tmp_path / 'summary.json').read_text())['dominance']['num_cases'] == 5
  table = (tmp_path / 'table.md').read_text()
  assert 'Dominance' in table and '**Flag**: ET' in table
  text = report.text_table(summary)
  assert 'FLAG ET: all four' in text
  assert max(len(line) for line in text.splitlines()[2:]) <= 80
  # A report of one subset (e.g. a folder evaluation) has no steps and no section.
  single = [r for r in _dominated_rows() if r['subset'] == 'FLAIR']
  assert 'dominance' not in report.summarize(single)
  assert 'Dominance' not in report.text_table(report.summarize(single))
