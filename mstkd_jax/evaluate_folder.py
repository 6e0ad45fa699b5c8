"""Score a folder of segmentations (any tool's) against reference labels.

  python -m mstkd_jax.evaluate_folder --pred runs/segs --ref /data/brats/val --out runs/segs/eval
      [--labels auto|brats2024|brats2021] [--lesion_wise] [--challenge BraTS-GLI]
      [--subset NAME] [--convention brats|authors]

--pred: a folder of NIfTI label files, one per case, named <case id>.nii.gz (what predict
writes, and what BraTS submissions use; <case id>_seg / -seg are accepted too).
--ref: the reference labels, either BraTS case folders (<ref>/<case id>/<case id>_seg.nii.gz
or -seg.nii.gz) or a flat folder of <case id>.nii.gz (nnU-Net's labelsTr).
Every reference case needs a prediction: a missing one is an error naming them, unless
--missing=skip (score only the cases predicted) or --missing=empty (score them as an empty
segmentation, as the challenges do). Predictions without a reference are listed and skipped.

Labels: brats2024 (1 NETC, 2 SNFH, 3 ET, 4 resection cavity) or brats2021 (BraTS 2018-2021,
FeTS: 1 NCR, 2 ED, 4 ET); regions WT = tumour labels, TC = core + ET, ET. 'auto' decides per
file: a 3 means brats2024, else a 4 means brats2021 (without either both read the same).
Give it explicitly for BraTS 2024 post-treatment data, where 4 is the cavity.

Writes into --out: per_case.csv (case, subset, region, dice, hd95; the columns of the
15-subset evaluation, subset = --subset), summary.json, table.md; with --lesion_wise also
lesion_wise.csv (per case and region: lesion-wise Dice and HD95, lesions found, missed, false
positives; mstkd_jax/lesionwise.py gives the definition). Dice and HD95 follow
mstkd_jax/metrics.py (HD95 in mm from the reference's voxel size; --convention for empty
regions, default brats).
"""

import csv
import dataclasses
import os
import sys
import time

from absl import flags
import nibabel as nib
import numpy as np

from mstkd_jax import cli, fileio, lesionwise, metrics, report
from mstkd_jax.data import layouts
from mstkd_jax.logging_utils import Progress

LABEL_CHOICES = ('auto', 'brats2024', 'brats2021')
_SEG_SUFFIXES = ('_seg', '-seg')


class EvaluationInputError(cli.InputError, ValueError):
  """A problem with the folders or files given, with a message naming the file."""


@dataclasses.dataclass
class LabelFile:
  path: str
  labels: np.ndarray
  affine: np.ndarray
  spacing: tuple


def _case_id(file_name):
  stem = layouts.strip_nifti_suffix(file_name)
  if stem is None:
    return None
  for suffix in _SEG_SUFFIXES:
    if stem.endswith(suffix):
      return stem[:-len(suffix)]
  return stem


def _flat_files(folder):
  """{case id: path} of the NIfTI files directly in ``folder``."""
  out = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    case_id = _case_id(name)
    if case_id is None or not os.path.isfile(path) or name.startswith('.'):
      continue
    if case_id in out:
      raise EvaluationInputError(f'{folder}: two files for case {case_id!r}: '
                                 f'{os.path.basename(out[case_id])} and {name}')
    out[case_id] = path
  return out


def find_references(ref_dir):
  """{case id: label path}: a flat folder of label files, else BraTS case folders."""
  if not os.path.isdir(ref_dir):
    raise EvaluationInputError(f'--ref {ref_dir}: no such folder')
  flat = _flat_files(ref_dir)
  if flat:
    return flat
  try:
    cases = layouts.discover_cases(ref_dir, 'auto')
  except layouts.DataError as e:
    raise EvaluationInputError(f'--ref {ref_dir}: no label files (<case id>.nii.gz) and no '
                               f'case folders: {e}') from e
  missing = [c.case_id for c in cases if c.seg is None]
  if missing:
    raise EvaluationInputError(f'--ref {ref_dir}: case folder(s) without a label file '
                               f'(*_seg / *-seg): {", ".join(missing[:5])}'
                               + (' ...' if len(missing) > 5 else ''))
  return {c.case_id: c.seg for c in cases}


def find_predictions(pred_dir):
  if not os.path.isdir(pred_dir):
    raise EvaluationInputError(f'--pred {pred_dir}: no such folder')
  found = _flat_files(pred_dir)
  if not found:
    raise EvaluationInputError(f'--pred {pred_dir}: no .nii / .nii.gz files')
  return found


MISSING_CHOICES = ('error', 'skip', 'empty')


def pair_cases(predictions, references, missing_policy='error'):
  """[(case id, prediction path or None, reference path)] for every reference (without a
  prediction: an error, left out, or None for 'empty'); the ids of predictions without a
  reference."""
  missing = sorted(set(references) - set(predictions))
  if missing and missing_policy == 'skip':
    references = {c: p for c, p in references.items() if c in predictions}
  elif missing and missing_policy == 'empty':
    predictions = dict(predictions, **{c: None for c in missing})
  elif missing:
    shown = ', '.join(missing[:5]) + (f' and {len(missing) - 5} more' if len(missing) > 5 else '')
    raise EvaluationInputError(f'no prediction for {len(missing)} of {len(references)} '
                               f'reference case(s): {shown} (expected <case id>.nii.gz in '
                               '--pred); --missing=skip scores only the predicted cases, '
                               '--missing=empty scores the others as empty')
  if not references:
    raise EvaluationInputError('no prediction matches a reference case (expected '
                               '<case id>.nii.gz in --pred)')
  pairs = [(c, predictions[c], references[c]) for c in sorted(references)]
  return pairs, sorted(set(predictions) - set(references))


def read_labels(path):
  try:
    image = nib.load(path)
    data = np.asanyarray(image.dataobj)
  except Exception as e:  # pylint: disable=broad-except
    raise EvaluationInputError(f'{path}: cannot read as NIfTI: {cli.one_line(e)}') from e
  if data.ndim == 4 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise EvaluationInputError(f'{path}: a label file must be 3D, got shape {data.shape}')
  values = np.asarray(data)
  rounded = np.rint(values)
  if not np.array_equal(rounded, values):
    raise EvaluationInputError(f'{path}: label values must be integers (a probability map?)')
  return LabelFile(path, rounded.astype(np.int64), image.affine,
                   tuple(float(z) for z in image.header.get_zooms()[:3]))


def resolve_layout(labels, file):
  """The label convention of one file (``labels`` or, for 'auto', its values)."""
  values = np.unique(file.labels)
  if labels == 'auto':
    labels = 'brats2024' if 3 in values else 'brats2021'
  problems = layouts.check_labels([int(v) for v in values], labels, '-',
                                  os.path.basename(file.path))
  if problems:
    raise EvaluationInputError(f'{file.path}: {problems[0].message}')
  return labels


def region_masks(file, labels):
  return layouts.region_masks(layouts.labels_to_codes(file.labels,
                                                      resolve_layout(labels, file)))


def _check_geometry(pred, ref):
  if pred.labels.shape != ref.labels.shape:
    raise EvaluationInputError(f'{pred.path}: shape {pred.labels.shape} differs from the '
                               f'reference {ref.path} {ref.labels.shape}')
  if not np.allclose(pred.affine, ref.affine, atol=1e-3):
    raise EvaluationInputError(f'{pred.path}: its affine differs from the reference '
                               f'{ref.path} (another space or orientation?)')


def score_case(pred_path, ref_path, labels='auto', convention='brats', lesion_wise=False,
               challenge='BraTS-GLI'):
  """({region: {dice, hd95}}, {region: LesionScores} or None) of one case; ``pred_path``
  None: an empty segmentation."""
  ref = read_labels(ref_path)
  if pred_path is None:
    pred = LabelFile('(missing)', np.zeros_like(ref.labels), ref.affine, ref.spacing)
  else:
    pred = read_labels(pred_path)
  _check_geometry(pred, ref)
  pred_regions, ref_regions = region_masks(pred, labels), region_masks(ref, labels)
  scores = metrics.case_metrics(pred_regions, ref_regions, spacing=ref.spacing,
                                convention=convention)
  lesions = None
  if lesion_wise:
    dilation, min_volume = lesionwise.challenge_parameters(challenge)
    lesions = {r: lesionwise.lesion_wise(pred_regions[r], ref_regions[r], ref.spacing,
                                         dilation, min_volume) for r in metrics.REGIONS}
  return scores, lesions


LESION_COLUMNS = ('case', 'region', 'lesion_dice', 'lesion_hd95', 'num_tp', 'num_fn', 'num_fp')


def _mean_sd(values):
  values = np.asarray(values, np.float64)
  return {'mean': float(values.mean()), 'sd': float(values.std(ddof=1)) if len(values) > 1
          else 0.0, 'median': float(np.median(values))}


def summarize(rows, lesion_rows, convention, subset):
  summary = report.summarize(rows, convention)
  summary['subset'] = subset
  summary['regions'] = {
      r: {m: _mean_sd([row[m] for row in rows if row['region'] == r]) for m in ('dice', 'hd95')}
      for r in metrics.REGIONS}
  if lesion_rows:
    summary['lesion_wise'] = {
        r: {'dice': _mean_sd([x['lesion_dice'] for x in lesion_rows if x['region'] == r]),
            'hd95': _mean_sd([x['lesion_hd95'] for x in lesion_rows if x['region'] == r]),
            **{k: int(sum(x[k] for x in lesion_rows if x['region'] == r))
               for k in ('num_tp', 'num_fn', 'num_fp')}}
        for r in metrics.REGIONS}
  return summary


def markdown(summary, title):
  left_out = summary.get('references_left_out', ())
  lines = [f'### {title}', '',
           f"{summary['num_cases']} cases"
           + (f" ({len(left_out)} reference case(s) without a prediction left out)"
              if left_out else '')
           + "; mean +- standard deviation (median) over cases. "
           f"HD95 convention: {summary['hd95_convention_note']}.", '']
  lesion = summary.get('lesion_wise')
  head = '| Region | Dice (%) | HD95 (mm) |'
  rule = '|---|---:|---:|'
  if lesion:
    head += ' Lesion-wise Dice (%) | Lesion-wise HD95 (mm) | Lesions found / missed / false |'
    rule += '---:|---:|---:|'
  lines += [head, rule]

  def cell(stats, scale):
    return (f"{stats['mean'] * scale:.2f} +- {stats['sd'] * scale:.2f} "
            f"({stats['median'] * scale:.2f})")

  for r in metrics.REGIONS:
    stats = summary['regions'][r]
    line = f"| {r} | {cell(stats['dice'], 100)} | {cell(stats['hd95'], 1)} |"
    if lesion:
      lw = lesion[r]
      line += (f" {cell(lw['dice'], 100)} | {cell(lw['hd95'], 1)} | "
               f"{lw['num_tp']} / {lw['num_fn']} / {lw['num_fp']} |")
    lines.append(line)
  return '\n'.join(lines) + '\n'


def evaluate_folder(pred_dir, ref_dir, out_dir, labels='auto', convention='brats',
                    lesion_wise=False, challenge='BraTS-GLI', subset='prediction', log=print,
                    missing='error'):
  """Scores every reference case; writes per_case.csv, summary.json, table.md (and
  lesion_wise.csv) into ``out_dir``; returns the summary."""
  if labels not in LABEL_CHOICES:
    raise EvaluationInputError(f'--labels must be one of {LABEL_CHOICES}, got {labels!r}')
  if lesion_wise:
    lesionwise.challenge_parameters(challenge)
  if missing not in MISSING_CHOICES:
    raise EvaluationInputError(f'--missing must be one of {MISSING_CHOICES}, got {missing!r}')
  predictions, references = find_predictions(pred_dir), find_references(ref_dir)
  pairs, extra = pair_cases(predictions, references, missing)
  left_out = sorted(set(references) - set(predictions)) if missing == 'skip' else []
  if left_out:
    log(f'{len(left_out)} of {len(references)} reference case(s) without a prediction left '
        f'out (--missing=skip): {", ".join(left_out[:5])}' + (' ...' if len(left_out) > 5 else ''))
  absent = [c for c, p, _ in pairs if p is None]
  if absent:
    log(f'{len(absent)} case(s) without a prediction scored as empty: {", ".join(absent[:5])}'
        + (' ...' if len(absent) > 5 else ''))
  if extra:
    log(f'{len(extra)} prediction(s) without a reference, not scored: {", ".join(extra[:5])}'
        + (' ...' if len(extra) > 5 else ''))
  rows, lesion_rows = [], []
  bar = Progress(len(pairs), 'evaluate', log_lines=False)
  lines = not sys.stderr.isatty()
  for case_id, pred_path, ref_path in pairs:
    started = time.time()
    scores, lesions = score_case(pred_path, ref_path, labels, convention, lesion_wise,
                                 challenge)
    rows += report.metric_rows(case_id, subset, scores)
    for region, s in (lesions or {}).items():
      lesion_rows.append({'case': case_id, 'region': region, 'lesion_dice': s.dice,
                          'lesion_hd95': s.hd95, 'num_tp': s.num_tp, 'num_fn': s.num_fn,
                          'num_fp': s.num_fp})
    if lines:
      dice = '/'.join(f"{scores[r]['dice'] * 100:.1f}" for r in metrics.REGIONS)
      print(f'{case_id}: Dice WT/TC/ET {dice} % ({time.time() - started:.1f} s)',
            file=sys.stderr, flush=True)
    bar.update()
  bar.close()
  summary = summarize(rows, lesion_rows, convention, subset)
  if left_out:
    summary['references_left_out'] = left_out
  os.makedirs(out_dir, exist_ok=True)
  report.write_per_case_csv(rows, os.path.join(out_dir, 'per_case.csv'))
  if lesion_rows:
    with open(os.path.join(out_dir, 'lesion_wise.csv'), 'w', newline='') as f:
      writer = csv.DictWriter(f, LESION_COLUMNS)
      writer.writeheader()
      writer.writerows(lesion_rows)
  fileio.write_json_atomic(os.path.join(out_dir, 'summary.json'), summary, indent=2)
  fileio.write_text_atomic(os.path.join(out_dir, 'table.md'),
                           markdown(summary, f'{pred_dir} against {ref_dir}'))
  return summary


# ---- command line ----

COMMAND = cli.Command('python -m mstkd_jax.evaluate_folder', __doc__)
_FV = COMMAND.flags
flags.DEFINE_string('pred', None, 'Folder of predicted label files <case id>.nii.gz.',
                    required=True, flag_values=_FV)
flags.DEFINE_string('ref', None, 'Reference labels: BraTS case folders or a flat folder of '
                    '<case id>.nii.gz.', required=True, flag_values=_FV)
flags.DEFINE_string('out', None, 'Folder for the results (default <pred>/evaluation).',
                    flag_values=_FV)
flags.DEFINE_enum('labels', 'auto', LABEL_CHOICES, 'Label convention of both folders: '
                  'brats2024 (1 NETC, 2 SNFH, 3 ET) or brats2021 (1 NCR, 2 ED, 4 ET).',
                  flag_values=_FV)
flags.DEFINE_enum('convention', 'brats', metrics.CONVENTIONS,
                  'Dice / HD95 of a region empty in one of the two masks.', flag_values=_FV)
flags.DEFINE_bool('lesion_wise', False, 'Also the BraTS 2023+ lesion-wise Dice and HD95.',
                  flag_values=_FV)
flags.DEFINE_enum('challenge', 'BraTS-GLI', sorted(lesionwise.CHALLENGES),
                  'Lesion-wise parameters (dilation, minimum lesion volume) of this challenge.',
                  flag_values=_FV)
flags.DEFINE_enum('missing', 'error', MISSING_CHOICES, 'A reference case without a '
                  'prediction: an error, left out (skip), or scored as an empty segmentation.',
                  flag_values=_FV)
flags.DEFINE_string('subset', 'prediction', 'Name of the modality subset the predictions '
                    "were made from, for the CSV's subset column (e.g. FLAIR+T1Gd).",
                    flag_values=_FV)


def main(argv=None):
  """Runs the command on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  f = COMMAND.parse_flags_only(argv)
  out = f.out or os.path.join(f.pred, 'evaluation')
  try:
    summary = evaluate_folder(f.pred, f.ref, out, labels=f.labels, convention=f.convention,
                              lesion_wise=f.lesion_wise, challenge=f.challenge, subset=f.subset,
                              missing=f.missing)
  except (cli.InputError, ValueError, OSError) as e:
    if cli.show_tracebacks():
      raise
    cli.fail(cli.one_line(e))
  sys.stdout.write(markdown(summary, f'{f.pred} against {f.ref}'))
  print(f'written: {out}/per_case.csv, summary.json, table.md'
        + (', lesion_wise.csv' if f.lesion_wise else ''))
  return 0


def console_main():
  """The ``mstkd-evaluate`` command (``pip install .``)."""
  sys.exit(main())


if __name__ == '__main__':
  console_main()
