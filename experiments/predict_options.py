"""What prediction's options buy and cost on held-out real cases: test-time mirroring,
resampling a re-gridded scan, and the time per case of each.

  python experiments/predict_options.py --runs runs/cv5 --variant mstkd --root $BRATS2018 \
      --out runs/predict_options
  python experiments/predict_options.py --smoke --out /tmp/popt     # synthetic, seconds

``--runs`` is the output folder of ``experiments/compare_variants.py``: for each fold k it holds
``split_fold<k>.json`` and the trained workdir ``fold<k>/<variant>``. Each fold's student
segments that fold's test cases only (cases it never trained on) with ``mstkd_jax.predict``
exactly as a user runs it (sliding windows over the brain box, the output in the input's
geometry), for each modality subset of ``--subsets``:

  plain     one pass;
  tta       test-time mirroring (``--tta``: the mean over the 8 mirrorings);
  regrid    (all four modalities only) the FLAIR re-gridded to ``--slice-mm`` thick slices, as a
            clinical 2D FLAIR series would be, then ``--resample_to T1Gd``: its Dice against the
            reference and its agreement (Dice) with the plain prediction on the original grid.

Dice of WT / TC / ET against the case's reference labels on the original grid
(``metrics.case_metrics``, BraTS convention). Writes ``<out>/cases.jsonl`` (one line per case,
subset and option, with the seconds) and ``<out>/report.md`` / ``report.json``: per option and
region the mean Dice, the paired difference against ``plain`` over cases (Student-t 95 %
interval) and the median seconds per case. Folds whose run has not finished are skipped (run
the command again later: finished cases are not repeated). Each line records the 1-minute load
average: times are only comparable on an otherwise idle machine.
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mstkd_jax import export, metrics, predict  # noqa: E402
from mstkd_jax.data import layouts  # noqa: E402
from mstkd_jax.modalities import MODALITY_KEYS, parse_subset, subset_name  # noqa: E402

REGIONS = ('WT', 'TC', 'ET')
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci(values):
  values = np.asarray(values, float)
  mean = float(values.mean())
  if len(values) < 2:
    return mean, float('nan'), float('nan')
  t = _T975[len(values) - 2] if len(values) - 1 <= len(_T975) else 1.96
  half = t * float(values.std(ddof=1)) / math.sqrt(len(values))
  return mean, mean - half, mean + half


def regrid_flair(path, out, slice_mm):
  """The scan resampled (trilinear) to ``slice_mm`` along its third axis, same field of view."""
  import nibabel as nib
  import nibabel.processing
  img = nib.load(path)
  zooms = list(img.header.get_zooms()[:3])
  zooms[2] = slice_mm
  moved = nibabel.processing.resample_to_output(
      nib.Nifti1Image(np.asarray(img.dataobj, np.float32), img.affine), voxel_sizes=zooms,
      order=1)
  nib.save(moved, out)
  return out


def reference_regions(case):
  import nibabel as nib
  seg = np.asarray(nib.load(case.seg).dataobj)
  return layouts.region_masks(layouts.labels_to_codes(seg, case.layout))


def dice_of(prediction, truth):
  codes = layouts.labels_to_codes(prediction.labels, prediction.layout)
  pred = layouts.region_masks(codes)
  scores = metrics.case_metrics(pred, truth, spacing=(1, 1, 1), convention='brats')
  return {r: float(scores[r]['dice']) for r in REGIONS}, pred


def agreement(a, b):
  return {r: float(metrics.dice(a[r], b[r])) for r in REGIONS}


def run_fold(model, cases, subsets, slice_mm, log):
  for case in cases:
    paths = {key: p for key, p in zip(MODALITY_KEYS, case.images) if p}
    truth = reference_regions(case)
    for subset in subsets:
      given = {k: p for (k, p), on in zip(paths.items(), subset) if on}
      name = subset_name(subset)
      plain = predict.predict_files(model, given, labels='brats2021', case_id=case.case_id)
      plain_dice, plain_regions = dice_of(plain, truth)
      log({'case': case.case_id, 'subset': name, 'option': 'plain', 'dice': plain_dice,
           'seconds': round(plain.seconds, 3)})
      tta = predict.predict_files(model, given, labels='brats2021', case_id=case.case_id,
                                  tta=True)
      tta_dice, _ = dice_of(tta, truth)
      log({'case': case.case_id, 'subset': name, 'option': 'tta', 'dice': tta_dice,
           'seconds': round(tta.seconds, 3),
           'uncertain_share': float(np.mean(tta.uncertainty > 0))})
      if all(subset):
        with tempfile.TemporaryDirectory() as folder:
          thick = dict(given, t2f=regrid_flair(given['t2f'], os.path.join(folder, 'f.nii.gz'),
                                               slice_mm))
          moved = predict.predict_files(model, thick, labels='brats2021',
                                        case_id=case.case_id, resample_to='T1Gd')
        moved_dice, moved_regions = dice_of(moved, truth)
        log({'case': case.case_id, 'subset': name, 'option': 'regrid', 'dice': moved_dice,
             'seconds': round(moved.seconds, 3),
             'agreement_with_plain': agreement(moved_regions, plain_regions),
             'slice_mm': slice_mm})


def summarise(records):
  report = {}
  by_option = {}
  for r in records:
    by_option.setdefault((r['option'], r['subset']), {})[r['case']] = r
  for (option, subset), rows in sorted(by_option.items()):
    plain = by_option.get(('plain', subset), {})
    entry = {'cases': len(rows),
             'seconds_median': round(statistics.median(r['seconds'] for r in rows.values()), 3)}
    for region in REGIONS:
      entry[f'dice_{region}'] = round(float(np.mean([r['dice'][region]
                                                      for r in rows.values()])), 4)
      if option != 'plain':
        diffs = [rows[c]['dice'][region] - plain[c]['dice'][region] for c in rows if c in plain]
        mean, lo, hi = mean_ci(diffs)
        entry[f'diff_{region}'] = [round(mean, 4), round(lo, 4), round(hi, 4),
                                   int(sum(d > 0 for d in diffs)), len(diffs)]
      if option == 'regrid':
        entry[f'agreement_{region}'] = round(float(np.mean(
            [r['agreement_with_plain'][region] for r in rows.values()])), 4)
    report[f'{option} {subset}'] = entry
  return report


def markdown(report, command):
  lines = ['# Prediction options on held-out cases', '', f'`{command}`', '',
           '| option | subset | cases | Dice WT | Dice TC | Dice ET | minus plain WT | TC | ET |'
           ' s / case (median) |', '|---|---|---:|---:|---:|---:|---|---|---|---:|']
  for key, e in report.items():
    option, subset = key.split(' ', 1)
    diffs = []
    for region in REGIONS:
      d = e.get(f'diff_{region}')
      diffs.append(f'{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] ({d[3]}/{d[4]})'
                   if d else '')
    lines.append(f'| {option} | {subset} | {e["cases"]} | '
                 + ' | '.join(f'{100 * e[f"dice_{r}"]:.1f}' for r in REGIONS) + ' | '
                 + ' | '.join(diffs) + f' | {e["seconds_median"]} |')
  agreement = [(k, e) for k, e in report.items() if 'agreement_WT' in e]
  if agreement:
    lines += ['', 'Agreement (Dice) of the re-gridded prediction with the original-grid one:']
    for key, e in agreement:
      lines.append(f'- {key}: ' + ', '.join(f'{r} {100 * e[f"agreement_{r}"]:.1f} %'
                                           for r in REGIONS))
  return '\n'.join(lines) + '\n'


def smoke_runs(out):
  """A tiny trained run on synthetic cases laid out like compare_variants' output."""
  from tests import helpers_eval
  from mstkd_jax import run
  config = helpers_eval.tiny_eval_config()
  workdir = os.path.join(out, 'fold0', 'mstkd')
  if not os.path.exists(os.path.join(workdir, 'checkpoints')):
    run.train_and_evaluate(config, workdir, max_steps=1)
  split = json.load(open(os.path.join(workdir, 'split.json'))) if os.path.exists(
      os.path.join(workdir, 'split.json')) else None
  root = os.path.join(workdir, 'synthetic')
  test = (split or {}).get('test') or sorted(os.listdir(root))[:1]
  with open(os.path.join(out, 'split_fold0.json'), 'w') as f:
    json.dump({'train': [], 'val': [], 'test': test}, f)
  return out, root, config


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--runs', help="compare_variants.py's output folder")
  parser.add_argument('--variant', default='mstkd')
  parser.add_argument('--root', help='the case folders the runs used')
  parser.add_argument('--out', required=True)
  parser.add_argument('--subsets', default='1111,1011,1010,1000')
  parser.add_argument('--slice-mm', type=float, default=5.0)
  parser.add_argument('--smoke', action='store_true')
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  config = None
  if args.smoke:
    args.runs, args.root, config = smoke_runs(args.out)
  subsets = [parse_subset(s) for s in args.subsets.split(',')]
  cases_by_id = {c.case_id: c for c in layouts.discover_cases(args.root, 'auto')}
  path = os.path.join(args.out, 'cases.jsonl')
  done = set()
  records = []
  if os.path.exists(path):
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    done = {r['case'] for r in records if r['option'] == 'tta' and r['subset'] == subset_name(
        subsets[-1])}

  def log(record):
    record['loadavg'] = round(os.getloadavg()[0], 2)
    records.append(record)
    with open(path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    print(json.dumps(record), flush=True)

  fold = 0
  while os.path.exists(os.path.join(args.runs, f'split_fold{fold}.json')):
    with open(os.path.join(args.runs, f'split_fold{fold}.json')) as f:
      test = json.load(f)['test']
    workdir = os.path.join(args.runs, f'fold{fold}', args.variant)
    if not os.path.exists(os.path.join(workdir, 'eval', 'per_case.csv')):
      print(f'[predict_options] fold {fold}: its run is not finished; skipped', flush=True)
      fold += 1
      continue
    todo = [cases_by_id[c] for c in test if c not in done]
    if todo:
      target = os.path.join(args.out, f'export_fold{fold}')
      if not os.path.exists(os.path.join(target, 'variables')):
        from mstkd_jax import checkpoint as ckpt
        export.export_student(config or ckpt.load_config(workdir), workdir, None, target,
                              overwrite=True)
      model = predict.load_model(target)
      t0 = time.time()
      run_fold(model, todo, subsets, args.slice_mm, log)
      print(f'[predict_options] fold {fold}: {len(todo)} case(s) in {time.time() - t0:.0f} s',
            flush=True)
    fold += 1
  report = summarise(records)
  command = ' '.join(['python', 'experiments/predict_options.py'] + (argv or sys.argv[1:]))
  with open(os.path.join(args.out, 'report.json'), 'w') as f:
    json.dump({'command': command, 'options': report}, f, indent=1)
  text = markdown(report, command)
  with open(os.path.join(args.out, 'report.md'), 'w') as f:
    f.write(text)
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
