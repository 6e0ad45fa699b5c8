"""What prediction writes for one case: the label map (and probabilities, the TTA uncertainty),
the sidecar JSON (inputs, modalities, label convention, volumes, expected accuracy), the case
report picture, and ``volumes.csv`` over a folder of cases.
"""

import csv
import dataclasses
import io
import json
import os
import tempfile
from typing import Optional

import numpy as np

from mstkd_jax import model_facts
from mstkd_jax.data import layouts, pipeline
from mstkd_jax.fileio import write_json_atomic, write_text_atomic
from mstkd_jax.modalities import MODALITIES, subset_name
from mstkd_jax.predict.errors import PredictionError
from mstkd_jax.predict.labels import LABEL_NAMES

@dataclasses.dataclass
class Prediction:
  labels: np.ndarray          # original grid, uint8 label values of ``layout``
  probabilities: np.ndarray   # original grid, float32 [..., 4]
  layout: str
  meta: dict
  present: tuple              # which modalities were given
  label_source: str = ''      # why ``layout`` (LabelChoice.source)
  uncertainty: Optional[np.ndarray] = None   # original grid, float32 (with tta)
  tta: bool = False
  inputs: dict = dataclasses.field(default_factory=dict)   # {modality name: path}
  seconds: float = 0.0
  resampled_to: Optional[str] = None     # the modality whose grid the others were put on
  coverage: dict = dataclasses.field(default_factory=dict)  # {resampled modality: share}
  plan: Optional[object] = None          # prediction_policy.Plan: which network and scans


def check_out(out, folder=False):
  """The output must be a .nii / .nii.gz file (or, with ``folder``, a folder), never an
  existing folder where a file is wanted, in a folder this process can write into (checked
  before any work). A missing folder is created."""
  if folder:
    if os.path.exists(out) and not os.path.isdir(out):
      raise PredictionError(f'--out {out} exists and is not a folder (--input_dir writes one '
                            'file per case into a folder)')
    parent = os.path.abspath(out)
  else:
    if os.path.isdir(out):
      raise PredictionError(f'--out {out} is a folder; give a file name ending in .nii.gz')
    if not out.endswith(('.nii.gz', '.nii')):
      raise PredictionError(f'--out {out}: the segmentation is written as NIfTI; give a name '
                            'ending in .nii.gz or .nii')
    parent = os.path.dirname(os.path.abspath(out))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise PredictionError(f'--out {out}: cannot create the folder {parent}: '
                          f'{e.strerror or e}') from e
  try:
    handle, probe = tempfile.mkstemp(prefix='.mstkd-write-test-', dir=parent)
    os.close(handle)
    os.remove(probe)
  except OSError as e:
    raise PredictionError(f'--out {out}: cannot write into {parent}: {e.strerror or e}') from e


def voxel_volume_ml(meta):
  """The volume of one voxel of the original grid, in mL (|det| of the affine's 3x3, mm^3)."""
  affine = np.asarray(meta['original_affine'], np.float64)
  return float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0


def tumour_volumes(prediction: Prediction):
  """{name: mL} of the regions (WT, TC, ET) and of each written label (NCR/NETC, ED/SNFH, ET)
  of a prediction, from its labels and voxel size."""
  voxel = voxel_volume_ml(prediction.meta)
  codes = layouts.labels_to_codes(prediction.labels, prediction.layout)
  out = {region: float(mask.sum()) * voxel
         for region, mask in layouts.region_masks(codes).items()}
  for name, value in LABEL_NAMES[prediction.layout]:
    out[name] = float(np.count_nonzero(prediction.labels == value)) * voxel
  return {k: round(v, 3) for k, v in out.items()}


def write_prediction(prediction: Prediction, out, save_probabilities=False):
  """Writes the segmentation (and ``<out>_probs.nii.gz``, with TTA ``<out>_uncertainty.nii.gz``);
  returns the written paths."""
  pipeline.write_nifti(prediction.labels, prediction.meta, out, dtype=np.uint8)
  written = [out]
  if save_probabilities:
    path = probabilities_path(out)
    pipeline.write_nifti(prediction.probabilities, prediction.meta, path, dtype=np.float32)
    written.append(path)
  if prediction.uncertainty is not None:
    path = _with_suffix(out, '_uncertainty')
    pipeline.write_nifti(prediction.uncertainty, prediction.meta, path, dtype=np.float32)
    written.append(path)
  return written


def sidecar_path(out):
  """``<out>.json`` beside ``<out>.nii.gz``."""
  for suffix in ('.nii.gz', '.nii'):
    if out.endswith(suffix):
      return out[:-len(suffix)] + '.json'
  return out + '.json'


def expected_scores(model, prediction: Prediction):
  """{region: {'dice', 'hd95' (may be absent), 'num_cases'}} of the held-out evaluation that
  fits how each region was made: the teacher's on all four scans, the student's with exactly
  these scans, or the held-out Dice of a per-region choice of scans; None when the model
  carries no evaluation."""
  facts_expected = model.facts.expected(subset_name(prediction.present)) if model.facts else None
  plan = prediction.plan
  if plan is None:
    return facts_expected
  evaluation = (model.facts.evaluation if model.facts else None) or {}
  name = subset_name(prediction.present)
  out = {}
  for region, (network, scans) in plan.sources.items():
    if network == 'teacher':
      score = (evaluation.get('teacher') or {}).get(region)
    elif scans == name:
      score = (facts_expected or {}).get(region)
    else:
      score = (plan.expected or {}).get(region)
    if score is None:
      return None
    out[region] = score
  return out


def case_record(prediction: Prediction, model, case_id, written, threshold=0.5):
  """What a user needs beside the label map, as the sidecar JSON of one case."""
  subset = subset_name(prediction.present)
  expected = expected_scores(model, prediction)
  plan = prediction.plan
  record = {
      'case_id': case_id,
      'outputs': [os.path.abspath(p) for p in written],
      'inputs': {m: prediction.inputs.get(m) for m in MODALITIES},
      'modalities_used': subset,
      'modalities_missing': [m for m, p in zip(MODALITIES, prediction.present) if not p],
      'network': {'name': plan.network if plan else 'student',
                  'per_region': plan.networks if plan else None,
                  'scans_per_region': plan.scans if plan else None,
                  'reason': plan.reason if plan else 'every scan given'},
      'labels': {'convention': prediction.layout, 'source': prediction.label_source,
                 'values': dict(LABEL_NAMES[prediction.layout])},
      'volumes_ml': tumour_volumes(prediction),
      'voxel_volume_ml': round(voxel_volume_ml(prediction.meta), 6),
      'expected_accuracy': None,
      'model': {'checkpoint': model.location, 'source': model.source},
      'threshold': threshold,
      'test_time_mirroring': prediction.tta,
      'resampled_to_grid_of': prediction.resampled_to,
      'field_of_view_coverage': prediction.coverage,
      'seconds': round(prediction.seconds, 2),
  }
  if expected:
    evaluation = model.facts.evaluation or {}
    num_cases = max(int(v.get('num_cases', 0)) for v in expected.values())
    record['expected_accuracy'] = {
        'modalities': subset, 'network': record['network']['name'],
        'split': evaluation.get('split'), 'evaluated': evaluation.get('source'),
        'data': model_facts.describe_data(evaluation),
        'caveat': model_facts.evaluation_caveat(evaluation, num_cases),
        'num_cases': num_cases,
        'dice': {r: round(v['dice'], 4) for r, v in expected.items()},
        'hd95_mm': {r: round(v['hd95'], 2) if 'hd95' in v else None
                    for r, v in expected.items()},
        'hd95_convention': evaluation.get('hd95_convention')}
  return record


def write_case_report(prediction: Prediction, record, out):
  """``<out>_report.png``: the one-page picture of the case (visualize.draw_case_report), over
  the T1Gd if given (else FLAIR, T2, T1) on the output's grid."""
  from mstkd_jax import visualize  # pylint: disable=import-outside-toplevel
  if prediction.resampled_to:
    background = prediction.inputs[prediction.resampled_to]
  else:
    background = next(prediction.inputs[m] for m in visualize.REPORT_BACKGROUND
                      if prediction.inputs.get(m))
  path = sidecar_path(out)[:-len('.json')] + '_report.png'
  return visualize.draw_case_report(background, prediction.labels, prediction.layout, record,
                                    path)


def write_sidecar(record, out):
  path = sidecar_path(out)
  write_json_atomic(path, record, indent=2)
  return path


def _with_suffix(out, suffix):
  for ext in ('.nii.gz', '.nii'):
    if out.endswith(ext):
      return out[:-len(ext)] + suffix + ext
  return out + suffix + '.nii.gz'


def probabilities_path(out):
  return _with_suffix(out, '_probs')


VOLUME_COLUMNS = ('case_id', 'modalities_used', 'network', 'label_convention', 'WT_ml',
                  'TC_ml', 'ET_ml')


def write_volumes_csv(records, path):
  """One row per case: the modalities used, the label convention, the region volumes and each
  label's volume in mL (the columns of docs/evaluation.md)."""
  label_columns = []
  for record in records:
    for name in record['volumes_ml']:
      column = f'{name}_ml'
      if column not in VOLUME_COLUMNS and column not in label_columns:
        label_columns.append(column)
  columns = list(VOLUME_COLUMNS) + label_columns + ['dice_expected_WT', 'dice_expected_TC',
                                                    'dice_expected_ET']
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=columns)
  writer.writeheader()
  for record in records:
    row = {'case_id': record['case_id'], 'modalities_used': record['modalities_used'],
           'network': (record.get('network') or {}).get('name', 'student'),
           'label_convention': record['labels']['convention']}
    row.update({f'{k}_ml': v for k, v in record['volumes_ml'].items()})
    expected = (record.get('expected_accuracy') or {}).get('dice', {})
    row.update({f'dice_expected_{r}': expected.get(r, '') for r in ('WT', 'TC', 'ET')})
    writer.writerow(row)
  write_text_atomic(path, text.getvalue())
  return path


def read_sidecar(out):
  try:
    with open(sidecar_path(out)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def finished_cases(out_dir):
  """{case id: sidecar record} of the cases segmented into ``out_dir``: a case is done only
  when both its label map ``<case id>.nii.gz`` and its readable sidecar ``<case id>.json``
  exist."""
  done = {}
  if not os.path.isdir(out_dir):
    return done
  for name in sorted(os.listdir(out_dir)):
    if not name.endswith('.nii.gz') or name.startswith('.'):
      continue
    record = read_sidecar(os.path.join(out_dir, name))
    if record is not None and record.get('case_id') == name[:-len('.nii.gz')]:
      done[record['case_id']] = record
  return done
