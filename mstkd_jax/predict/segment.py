"""Segmenting patients: one patient's files (``predict_files``) and a folder of cases with
``--continue`` (``predict_folder``), through the inference module's forward pass, with the
network and scans the model's prediction policy chooses for the scans at hand.
"""

import os
import sys
import time

from absl import logging
import numpy as np

from mstkd_jax import inference
from mstkd_jax import prediction_policy
from mstkd_jax import subset_selection
from mstkd_jax.data import pipeline
from mstkd_jax.logging_utils import Progress
from mstkd_jax.modalities import MODALITIES, channel_index, parse_subset
import mstkd_jax.predict.outputs as outputs
from mstkd_jax.predict.cases import check_paths, paths_only, preprocess
from mstkd_jax.predict.errors import PredictionError, write_error
from mstkd_jax.predict.labels import LabelChoice, probs_to_labels, resolve_labels

def network_probabilities(model: inference.Model, image, plan, overlap=None, blend=None,
                          tta=False):
  """(probabilities, TTA disagreement or None) of one preprocessed box under ``plan``
  (``prediction_policy.Plan``): one network on every scan given, or, per region, the network
  and scans the plan names (one pass per distinct network and subset; the outputs of several
  subsets of one region averaged), composed nested ET within TC within WT."""
  keys = []             # (network, subset name) of every pass
  for net, scans in plan.sources.values():
    for name in subset_selection.parse_candidate(scans):
      if (net, name) not in keys:
        keys.append((net, name))

  def combine(outputs):
    by_key = dict(zip(keys, outputs))
    per_region = {r: np.mean([by_key[(net, n)] for n in subset_selection.parse_candidate(s)],
                             axis=0) for r, (net, s) in plan.sources.items()}
    if plan.single:
      return per_region['WT']
    return subset_selection.compose(per_region)

  return inference.box_probabilities(
      model, image, overlap, blend, tta,
      [(model.network(net), parse_subset(name)) for net, name in keys], combine)


def predict_files(model: inference.Model, paths, labels='auto', threshold=0.5, overlap=None,
                  blend=None, case_id='patient', option_names=(), tta=False,
                  resample_to=None, network='auto') -> outputs.Prediction:
  """Segments one patient: ``paths`` maps modality names (FLAIR/t2f/flair, T1/t1n/t1,
  T1Gd/t1c/t1ce, T2/t2w/t2) to NIfTI files, any non-empty subset. ``labels``: a
  ``LabelChoice`` of the run, or a --labels value resolved for this case alone.
  ``resample_to``: a modality whose voxel grid the others are resampled onto first
  (``regrid.onto_grid_of``); the output is then in its geometry. ``network``: 'auto' (the
  model's prediction policy), 'student' or 'teacher' (``prediction_policy.plan``)."""
  started = time.time()
  given = check_paths(paths)
  choice = labels if isinstance(labels, LabelChoice) else resolve_labels(
      labels, model, given.values(), option_names)
  image, meta, coverage = preprocess(model, given, case_id, resample_to)
  try:
    plan = prediction_policy.plan(model.policy, meta['present'], network,
                                  model.teacher is not None)
  except ValueError as e:
    raise PredictionError(str(e)) from e
  box_probs, box_disagreement = network_probabilities(model, image, plan, overlap, blend, tta)
  probs = pipeline.restore_geometry(box_probs, meta, order=1).astype(np.float32)
  # Outside the box the model saw nothing: background with probability 1 there.
  seen = pipeline.restore_geometry(np.ones(box_probs.shape[:3], np.float32), meta, order=1)
  probs[..., 3] += 1.0 - seen
  seg = probs_to_labels(probs, choice.layout, threshold)
  uncertainty = None
  if box_disagreement is not None:
    # Nearest neighbour: every voxel keeps a share k/8 of the mirrorings.
    uncertainty = pipeline.restore_geometry(box_disagreement, meta, order=0).astype(np.float32)
  inputs = {MODALITIES[channel_index(k)]: os.path.abspath(v) for k, v in given.items()}
  return outputs.Prediction(
      seg, probs, choice.layout, meta, tuple(meta['present']), choice.source, uncertainty, tta,
      inputs, time.time() - started,
      MODALITIES[channel_index(resample_to)] if resample_to else None, coverage, plan)


def predict_folder(model, cases, out_dir, labels='auto', save_probabilities=False,
                   skip_existing=False, report=False, **kwargs):
  """Segments ``cases`` (from ``folder_cases``) into ``out_dir/<case id>.nii.gz`` with a
  ``<case id>.json`` sidecar each and ``volumes.csv`` over the folder; one label convention
  for the whole run (``resolve_labels``), also with the cases of the folder that stay.
  ``skip_existing``: not the cases already done (label map and sidecar written). Returns
  (written paths, {case id: error message}, skipped case ids, LabelChoice, {case id: sidecar
  record})."""
  choice = labels if isinstance(labels, LabelChoice) else resolve_labels(
      labels, model, paths_only(cases))
  os.makedirs(out_dir, exist_ok=True)
  done = outputs.finished_cases(out_dir)
  kept = done if skip_existing else {c: r for c, r in done.items()
                                     if c not in {case_id for case_id, _ in cases}}
  check_one_convention(kept, choice, out_dir)
  written, failed, skipped = [], {}, []
  todo = []
  records = {}
  for case_id, paths in cases:
    out = os.path.join(out_dir, f'{case_id}.nii.gz')
    if skip_existing and case_id in done:
      skipped.append(case_id)
      records[case_id] = done[case_id]
    else:
      todo.append((case_id, paths, out))
  if skipped:
    print(f'--continue: {len(skipped)} case(s) already segmented in {out_dir}, '
          f'{len(todo)} to go', file=sys.stderr, flush=True)
  # A terminal gets a bar; logs (SLURM, pipes) one line per case with its time.
  bar = Progress(len(todo), 'predict', log_lines=False)
  lines = not sys.stderr.isatty()
  for case_id, paths, out in todo:
    try:
      if isinstance(paths, PredictionError):
        raise paths
      prediction = predict_files(model, paths, labels=choice, case_id=case_id, **kwargs)
      files, record = write_case(prediction, model, case_id, out, save_probabilities, report,
                                 kwargs.get('threshold', 0.5))
      records[case_id] = record
      written += files
      if lines:
        volumes = record['volumes_ml']
        print(f'{case_id}: {prediction.seconds:.1f} s, {record["modalities_used"]}, WT / TC / '
              f'ET {volumes["WT"]:.1f} / {volumes["TC"]:.1f} / {volumes["ET"]:.1f} mL -> {out}',
              file=sys.stderr, flush=True)
    except PredictionError as e:
      failed[case_id] = str(e)
      logging.error('%s: %s', case_id, e)
    bar.update()
  bar.close()
  if records:
    path = os.path.join(out_dir, 'volumes.csv')
    try:
      written.append(outputs.write_volumes_csv([records[c] for c in sorted(records)], path))
    except OSError as e:
      raise write_error(e, path) from e
  return written, failed, skipped, choice, records


def write_case(prediction, model, case_id, out, save_probabilities=False, report=False,
               threshold=0.5):
  """Writes one case's outputs (label map, optional probabilities and report, then the
  sidecar, which marks the case done); returns (paths, sidecar record). A write that fails
  (a full disk) raises ``OutputWriteError``; no temporary file is left behind."""
  try:
    files = outputs.write_prediction(prediction, out, save_probabilities)
    record = outputs.case_record(prediction, model, case_id, files, threshold)
    if report:
      files.append(outputs.write_case_report(prediction, record, out))
      record['outputs'].append(os.path.abspath(files[-1]))
    files.append(outputs.write_sidecar(record, out))
  except OSError as e:
    raise write_error(e, e.filename or out) from e
  return files, record


def check_one_convention(records, choice, out_dir):
  """Refuses to add ``choice``'s labels to a folder whose remaining segmentations
  (``records``: {case id: sidecar}) use another label convention."""
  other = sorted(c for c, r in records.items()
                 if (r.get('labels') or {}).get('convention') not in (None, choice.layout))
  if other:
    convention = records[other[0]]['labels']['convention']
    raise PredictionError(
        f'--out {out_dir} already holds {convention} segmentations ({len(other)} case(s), e.g. '
        f'{other[0]}); writing {choice.layout} labels beside them would mix two label '
        f'conventions: give --labels {convention}, or another --out')
