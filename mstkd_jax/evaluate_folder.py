"""Score a folder of segmentations (any tool's) against reference labels.

  python -m mstkd_jax.evaluate_folder --pred runs/segs --ref /data/brats/val --out runs/segs/eval
      [--labels auto|brats2024|brats2021] [--lesion_wise[=brats2023|brats2025]]
      [--challenge BraTS-GLI] [--subset NAME] [--convention brats|authors]

--pred: a folder of NIfTI label files, one per case, named <case id>.nii.gz (what predict
writes, and what BraTS submissions use; <case id>_seg / -seg are accepted too).
--ref: the reference labels, either BraTS case folders (<ref>/<case id>/<case id>_seg.nii.gz
or -seg.nii.gz) or a flat folder of <case id>.nii.gz (nnU-Net's labelsTr).
Every reference case needs a prediction: a missing one is an error naming them, unless
--missing=skip (score only the cases predicted) or --missing=empty (score them as an empty
segmentation, as the challenges do). Predictions without a reference are listed and skipped.

Labels: brats2024 (1 NETC, 2 SNFH, 3 ET, 4 resection cavity) or brats2021 (BraTS 2018-2021,
FeTS: 1 NCR, 2 ED, 4 ET); regions WT = tumour labels, TC = core + ET, ET. 'auto' decides per
file: a 3 means brats2024, else a 4 means brats2021 (without either both read the same). A
folder whose files were read with both is reported (a warning line, and
``label_convention_warnings`` / ``label_conventions_read`` in summary.json). Give --labels
explicitly for BraTS 2024 post-treatment data, where 4 is the cavity.

Writes into --out: per_case.csv (case, subset, region, dice, hd95; the columns of the
15-subset evaluation, subset = --subset), summary.json, table.md. Dice and HD95 follow
mstkd_jax/metrics.py (HD95 as MedPy, in mm from the reference's voxel size; --convention for
empty regions, default brats).

Lesion-wise metrics of the BraTS challenges (--challenge picks the challenge's parameters):
--lesion_wise=brats2023 (or --lesion_wise alone): the official BraTS 2023 script's lesion-wise
Dice and HD95 (surface-distance's HD95) and lesion counts, in lesion_wise.csv
(mstkd_jax/lesionwise.py). --lesion_wise=brats2025: the official brats-evaluation package
(panoptica; pip install brats-evaluation panoptica, or ".[brats]" in a checkout): lesion-wise
Dice, NSD, HD95, PQ and counts of matched instances in lesion_wise_brats2025.csv, with the
package's own JSON and CSV (mstkd_jax/lesionwise_brats2025.py).
"""

import csv
import dataclasses
import os
import sys
import time

from absl import flags
import nibabel as nib
import numpy as np

from mstkd_jax import cli, fileio, lesionwise, lesionwise_brats2025, metrics, report
from mstkd_jax.data import layouts
from mstkd_jax.logging_utils import Progress

LABEL_CHOICES = ('auto', 'brats2024', 'brats2021')
# --lesion_wise: the BraTS 2023 script's definition or the BraTS 2025 package's.
LESION_WISE_CHOICES = ('none', 'brats2023', 'brats2025')
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


def detected_convention(file):
  """What 'auto' reads a file as: 'brats2024' (it holds a 3), 'brats2021' (a 4 and no 3), or
  None (neither: both conventions read it the same)."""
  values = set(int(v) for v in np.unique(file.labels))
  if 3 in values:
    return 'brats2024'
  return 'brats2021' if 4 in values else None


def region_masks(file, labels):
  return layouts.region_masks(layouts.labels_to_codes(file.labels,
                                                      resolve_layout(labels, file)))


def convention_report(audit):
  """Lines for the user about how 'auto' read the two folders; ``audit``: {'pred' | 'ref':
  {convention: [case ids]}}. A folder whose files were read with both conventions is named,
  with examples, since one of them may be wrong (e.g. BraTS 2024 post-treatment files, where
  4 is the resection cavity)."""
  lines = []
  for folder, option in (('pred', '--pred'), ('ref', '--ref')):
    found = {k: v for k, v in audit.get(folder, {}).items() if k}
    if len(found) > 1:
      parts = '; '.join(f'{len(ids)} file(s) read as {conv} (e.g. {", ".join(ids[:3])})'
                        for conv, ids in sorted(found.items()))
      lines.append(f'warning: --labels auto: {option} mixes label conventions: {parts}. Each '
                   'file was read with its own; if that is wrong, pass --labels brats2021 or '
                   'brats2024')
  pred = {k for k, v in audit.get('pred', {}).items() if k and v}
  ref = {k for k, v in audit.get('ref', {}).items() if k and v}
  if len(pred) == 1 and len(ref) == 1 and pred != ref:
    lines.append(f'note: --labels auto: the predictions use {pred.pop()} labels and the '
                 f'references {ref.pop()}; each was read with its own')
  return lines


def _check_geometry(pred, ref):
  if pred.labels.shape != ref.labels.shape:
    raise EvaluationInputError(f'{pred.path}: shape {pred.labels.shape} differs from the '
                               f'reference {ref.path} {ref.labels.shape}')
  if not np.allclose(pred.affine, ref.affine, atol=1e-3):
    raise EvaluationInputError(f'{pred.path}: its affine differs from the reference '
                               f'{ref.path} (another space or orientation?)')


def lesion_definition(lesion_wise):
  """None, 'brats2023' or 'brats2025' from a --lesion_wise value (True: 'brats2023')."""
  if lesion_wise is True:
    return 'brats2023'
  if lesion_wise in (False, None, 'none'):
    return None
  if lesion_wise not in LESION_WISE_CHOICES:
    raise EvaluationInputError(f'--lesion_wise must be one of {LESION_WISE_CHOICES}, got '
                               f'{lesion_wise!r}')
  return lesion_wise


def score_case(pred_path, ref_path, labels='auto', convention='brats', lesion_wise=False,
               challenge='BraTS-GLI', evaluator=None, case_id=None, audit=None):
  """({region: {dice, hd95}}, lesion-wise result or None) of one case; ``pred_path`` None: an
  empty segmentation. The lesion-wise result is {region: LesionScores} for brats2023, the
  official result dict for brats2025 (``evaluator``: lesionwise_brats2025.load_evaluator).
  ``audit`` (a dict) collects, with 'auto', which convention each file was read as:
  {'pred' | 'ref': {convention: [case ids]}}."""
  ref = read_labels(ref_path)
  if pred_path is None:
    pred = LabelFile('(missing)', np.zeros_like(ref.labels), ref.affine, ref.spacing)
  else:
    pred = read_labels(pred_path)
  if audit is not None and labels == 'auto':
    for folder, file in (('pred', pred), ('ref', ref)):
      audit.setdefault(folder, {}).setdefault(detected_convention(file), []).append(
          case_id or os.path.basename(file.path))
  _check_geometry(pred, ref)
  pred_regions, ref_regions = region_masks(pred, labels), region_masks(ref, labels)
  scores = metrics.case_metrics(pred_regions, ref_regions, spacing=ref.spacing,
                                convention=convention)
  lesions = None
  definition = lesion_definition(lesion_wise)
  if definition == 'brats2023':
    dilation, min_volume = lesionwise.challenge_parameters(challenge)
    lesions = {r: lesionwise.lesion_wise(pred_regions[r], ref_regions[r], ref.spacing,
                                         dilation, min_volume) for r in metrics.REGIONS}
  elif definition == 'brats2025':
    lesions = lesionwise_brats2025.evaluate_case(
        evaluator or lesionwise_brats2025.load_evaluator(challenge),
        case_id or os.path.basename(ref_path), pred_regions, ref_regions, ref.affine,
        ref.spacing)
  return scores, lesions


# lesion_wise.csv (brats2023); brats2025 writes lesionwise_brats2025.COLUMNS.
LESION_COLUMNS = ('case', 'region', 'lesion_dice', 'lesion_hd95', 'num_tp', 'num_fn', 'num_fp')
LESION_FILES = {'brats2023': 'lesion_wise.csv', 'brats2025': 'lesion_wise_brats2025.csv'}
# The lesion-wise metrics summarised per region (mean, sd, median; counts summed).
LESION_METRICS = {'brats2023': ('dice', 'hd95'), 'brats2025': ('dice', 'nsd', 'hd95', 'pq')}


def _mean_sd(values, skip_nan=False):
  """Mean, sample standard deviation and median; ``skip_nan``: of the values that are not NaN
  (as the official BraTS 2025 parser's mean row), with their number as 'cases'."""
  values = np.asarray(values, np.float64)
  if skip_nan:
    values = values[~np.isnan(values)]
    if not len(values):
      return {'mean': float('nan'), 'sd': float('nan'), 'median': float('nan'), 'cases': 0}
  with np.errstate(invalid='ignore'):      # inf - inf in the deviation of an inf HD95
    stats = {'mean': float(values.mean()), 'sd': float(values.std(ddof=1)) if len(values) > 1
             else 0.0, 'median': float(np.median(values))}
  if skip_nan:
    stats['cases'] = int(len(values))
  return stats


def _lesion_summary(lesion_rows, definition):
  out = {}
  for r in metrics.REGIONS:
    mine = [x for x in lesion_rows if x['region'] == r]
    out[r] = {m: _mean_sd([x[f'lesion_{m}' if m != 'pq' else m] for x in mine],
                          skip_nan=definition == 'brats2025')
              for m in LESION_METRICS[definition]}
    out[r].update({k: int(np.nansum([x[k] for x in mine])) for k in ('num_tp', 'num_fn',
                                                                      'num_fp')})
  return out


def summarize(rows, lesion_rows, convention, subset, lesion_wise='brats2023'):
  summary = report.summarize(rows, convention)
  summary['subset'] = subset
  summary['regions'] = {
      r: {m: _mean_sd([row[m] for row in rows if row['region'] == r]) for m in ('dice', 'hd95')}
      for r in metrics.REGIONS}
  definition = lesion_definition(lesion_wise)
  if lesion_rows and definition:
    summary['lesion_wise_definition'] = definition
    summary['lesion_wise'] = _lesion_summary(lesion_rows, definition)
  return summary


_LESION_HEADS = {'dice': 'Lesion-wise Dice (%)', 'hd95': 'Lesion-wise HD95 (mm)',
                 'nsd': 'Lesion-wise NSD (%)', 'pq': 'PQ (%)'}
_LESION_NOTES = {
    'brats2023': 'Lesion-wise: the official BraTS 2023 definition (HD95 of surface-distance).',
    'brats2025': ('Lesion-wise: the official BraTS 2025 package (brats-evaluation on panoptica);'
                  ' means over the cases where a value is defined.')}


def markdown(summary, title):
  left_out = summary.get('references_left_out', ())
  lines = [f'### {title}', '',
           f"{summary['num_cases']} cases"
           + (f" ({len(left_out)} reference case(s) without a prediction left out)"
              if left_out else '')
           + "; mean +- standard deviation (median) over cases. "
           f"HD95 convention: {summary['hd95_convention_note']}.", '']
  lesion = summary.get('lesion_wise')
  definition = summary.get('lesion_wise_definition', 'brats2023')
  head = '| Region | Dice (%) | HD95 (mm) |'
  rule = '|---|---:|---:|'
  if lesion:
    lines[-1:-1] = [_LESION_NOTES[definition]]
    for m in LESION_METRICS[definition]:
      head += f' {_LESION_HEADS[m]} |'
      rule += '---:|'
    head += (' Lesions found / missed / false |' if definition == 'brats2023'
             else ' Instances matched / missed / false |')
    rule += '---:|'
  lines += [head, rule]

  def cell(stats, scale):
    return (f"{stats['mean'] * scale:.2f} +- {stats['sd'] * scale:.2f} "
            f"({stats['median'] * scale:.2f})")

  for r in metrics.REGIONS:
    stats = summary['regions'][r]
    line = f"| {r} | {cell(stats['dice'], 100)} | {cell(stats['hd95'], 1)} |"
    if lesion:
      lw = lesion[r]
      for m in LESION_METRICS[definition]:
        line += f" {cell(lw[m], 1 if m == 'hd95' else 100)} |"
      line += f" {lw['num_tp']} / {lw['num_fn']} / {lw['num_fp']} |"
    lines.append(line)
  return '\n'.join(lines) + '\n'


def _lesion_evaluator(definition, challenge, log):
  """Checks --challenge for the definition; the official evaluator for brats2025."""
  if definition == 'brats2023':
    lesionwise.challenge_parameters(challenge)
  elif definition == 'brats2025':
    evaluator = lesionwise_brats2025.load_evaluator(challenge)
    log(f'lesion-wise metrics: {lesionwise_brats2025.versions()} (please cite panoptica: '
        'https://github.com/BrainLesion/panoptica#citation)')
    return evaluator
  return None


def evaluate_folder(pred_dir, ref_dir, out_dir, labels='auto', convention='brats',
                    lesion_wise=False, challenge='BraTS-GLI', subset='prediction', log=print,
                    missing='error'):
  """Scores every reference case; writes per_case.csv, summary.json, table.md (and the
  lesion-wise files of ``lesion_wise``: False / 'none', True / 'brats2023', 'brats2025') into
  ``out_dir``; returns the summary."""
  if labels not in LABEL_CHOICES:
    raise EvaluationInputError(f'--labels must be one of {LABEL_CHOICES}, got {labels!r}')
  definition = lesion_definition(lesion_wise)
  evaluator = _lesion_evaluator(definition, challenge, log)
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
  rows, lesion_rows, official = [], [], []
  audit = {}
  bar = Progress(len(pairs), 'evaluate', log_lines=False)
  lines = not sys.stderr.isatty()
  for case_id, pred_path, ref_path in pairs:
    started = time.time()
    scores, lesions = score_case(pred_path, ref_path, labels, convention, definition,
                                 challenge, evaluator, case_id, audit=audit)
    rows += report.metric_rows(case_id, subset, scores)
    if definition == 'brats2023':
      lesion_rows += [{'case': case_id, 'region': region, 'lesion_dice': s.dice,
                       'lesion_hd95': s.hd95, 'num_tp': s.num_tp, 'num_fn': s.num_fn,
                       'num_fp': s.num_fp} for region, s in lesions.items()]
    elif definition == 'brats2025':
      official.append(lesions)
    if lines:
      dice = '/'.join(f"{scores[r]['dice'] * 100:.1f}" for r in metrics.REGIONS)
      print(f'{case_id}: Dice WT/TC/ET {dice} % ({time.time() - started:.1f} s)',
            file=sys.stderr, flush=True)
    bar.update()
  bar.close()
  os.makedirs(out_dir, exist_ok=True)
  if definition == 'brats2025':
    lesion_rows = lesionwise_brats2025.write_official(official, challenge, out_dir)
  summary = summarize(rows, lesion_rows, convention, subset, definition)
  if left_out:
    summary['references_left_out'] = left_out
  if labels == 'auto':
    summary['label_conventions_read'] = {
        folder: {str(conv or 'either'): len(ids) for conv, ids in found.items()}
        for folder, found in audit.items()}
    summary['label_convention_warnings'] = convention_report(audit)
    for line in summary['label_convention_warnings']:
      log(line)
  else:
    summary['label_conventions_read'] = {'pred': labels, 'ref': labels}
  report.write_per_case_csv(rows, os.path.join(out_dir, 'per_case.csv'))
  if lesion_rows:
    columns = LESION_COLUMNS if definition == 'brats2023' else lesionwise_brats2025.COLUMNS
    with open(os.path.join(out_dir, LESION_FILES[definition]), 'w', newline='') as f:
      writer = csv.DictWriter(f, columns)
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
flags.DEFINE_enum('lesion_wise', 'none', LESION_WISE_CHOICES, 'Also the lesion-wise metrics of '
                  'the BraTS challenges: brats2023 (the official 2023 script; --lesion_wise '
                  'alone), brats2025 (the official brats-evaluation package on panoptica: pip '
                  'install brats-evaluation panoptica), or none.', flag_values=_FV)
flags.DEFINE_enum('challenge', 'BraTS-GLI', sorted(lesionwise.CHALLENGES),
                  'Lesion-wise parameters of this challenge (brats2023: dilation and minimum '
                  'lesion volume; brats2025: the official config, not for BraTS-PED).',
                  flag_values=_FV)
flags.DEFINE_enum('missing', 'error', MISSING_CHOICES, 'A reference case without a '
                  'prediction: an error, left out (skip), or scored as an empty segmentation.',
                  flag_values=_FV)
flags.DEFINE_string('subset', 'prediction', 'Name of the modality subset the predictions '
                    "were made from, for the CSV's subset column (e.g. FLAIR+T1Gd).",
                    flag_values=_FV)


def lesion_wise_argv(argv):
  """``--lesion_wise`` without a value means brats2023 (it was a switch before it took one),
  ``--lesion_wise VALUE`` is ``--lesion_wise=VALUE``, ``--nolesion_wise`` is none."""
  argv, out = cli.underscore_flags(list(argv)), []
  index = 0
  while index < len(argv):
    arg = argv[index]
    if arg == '--lesion_wise':
      following = argv[index + 1] if index + 1 < len(argv) else None
      value = following if following in LESION_WISE_CHOICES else 'brats2023'
      index += following == value
      arg = f'--lesion_wise={value}'
    elif arg == '--nolesion_wise':
      arg = '--lesion_wise=none'
    out.append(arg)
    index += 1
  return out


def main(argv=None):
  """Runs the command on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  f = COMMAND.parse_flags_only(lesion_wise_argv(sys.argv[1:] if argv is None else argv))
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
  extra = {'brats2023': [LESION_FILES['brats2023']],
           'brats2025': [LESION_FILES['brats2025'], lesionwise_brats2025.JSON_NAME,
                         lesionwise_brats2025.OFFICIAL_CSV_NAME]}.get(f.lesion_wise, [])
  print(f'written: {out}/per_case.csv, summary.json, table.md' + ''.join(f', {x}' for x in extra))
  return 0


def console_main():
  """The ``mstkd-evaluate`` command (``pip install .``)."""
  sys.exit(main())


if __name__ == '__main__':
  console_main()
