"""The 15-subset evaluation (docs/method.md, "Evaluation") and validation during training.

``evaluate_checkpoint(config, workdir, checkpoint, split)`` (``--mode=eval``) and
``evaluate_state(config, dataset, state, split)`` (end of training) run the student on every case
of the split once per modality subset (absent modalities zeroed), and the teacher on the full
input as a reference row when the checkpoint has one. Per case and subset they compute Dice and
HD95 of WT / TC / ET (``config.eval.hd95_convention``; HD95 in mm of the case's voxel spacing)
and write into ``<workdir>/eval`` (``eval_<split>`` for other splits than 'test'):

  per_case.csv   case, subset, region, dice, hd95 (one row per case x subset x region)
  summary.json   means per subset and region, their average over the 15 subsets, the teacher
  table.md       the paper's Tables 1-2 layout: Dice and HD95 rows WT/TC/ET, 15 subset columns
                 named by modality, then the average

and print the table. What the network sees of a case: ``config.eval.sliding_window`` False (the
paper's protocol, the default) takes the centre window of ``data.input_shape`` of the brain
box, and the metrics are computed inside that window; True slides overlapping windows over the
whole box and blends them (as ``mstkd_jax.predict`` does), with metrics over the whole box.

Speed: the forward passes go through ``inference.Inference`` (one compiled function per network
size) in batches of ``config.eval.batch_size``, the last batch padded so the shape never
changes. On the centre window a case's image travels to the devices once, its 15 masked copies
are made there, and each batch's outputs go straight into ``scoring.summarize_on_device``
(thresholds, regions, Dice counts, surfaces): only counts and bit-packed surfaces come back.
The host finishes HD95 (``scoring.case_metrics``, distance transforms in threads) of one case
while the devices run the next. Sliding windows blend on the host and are scored there with the
same functions. The numbers are those of ``metrics`` (tests/test_evaluate.py compares them).
With several processes each evaluates a share of the cases and the results are gathered; only
process 0 writes files.

``make_validator(config, dataset)`` returns ``validate(state, epoch)``, which the face that
wires a run passes to the training loop: the student's mean Dice (WT, TC, ET averaged) on the
validation split over ``config.eval.val_subsets`` ('all' 15, or any subsets in the vocabulary of
``modalities.parse_subsets``) and the teacher's on the full input, on the centre window; the
loop keeps the checkpoint with the best student value (``--checkpoint=best``).

Evaluation imports nothing from training: networks come from ``models.build`` and
``checkpoint``, data from ``data.pipeline``.
"""

import concurrent.futures
import json
import os
import time

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import inference as inference_lib
from mstkd_jax import metrics as metrics_lib
from mstkd_jax import model_facts
from mstkd_jax import report
from mstkd_jax import scoring
from mstkd_jax.data import pipeline
from mstkd_jax.logging_utils import Progress
from mstkd_jax.models import build
from mstkd_jax.modalities import (ALL_SUBSETS, FULL, masked_copies, parse_subsets, subset_masks,
                                  subset_name)

# Threads of the host's share of the scoring (HD95's distance transforms; scipy releases the GIL).
HOST_THREADS = max(1, min(8, os.cpu_count() or 1))


# ----------------------------------------------------------------------------------------------
# Evaluation


def _gather_rows(rows):
  """All processes' rows, in every process (identity with one process)."""
  if jax.process_count() == 1:
    return rows
  blob = np.frombuffer(json.dumps(rows).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([blob.size], np.int64))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:blob.size] = blob
  everything = multihost_utils.process_allgather(padded)
  out = []
  for size, data in zip(np.asarray(sizes).reshape(-1), np.asarray(everything)):
    out += json.loads(bytes(data[:int(size)]).decode())
  return out


def _start_case(inference, case, runs, sliding_window, convention):
  """Starts the forward passes of one case, asynchronous on the devices: ``runs`` is
  [(variables, subsets, row names)], one per network. Returns ``finish(pool) -> rows``, which
  waits for the outputs and scores them (``scoring``; HD95's distance transforms in ``pool``)."""
  names = [name for _, _, run_names in runs for name in run_names]
  if sliding_window:   # boxes of any size: probabilities and scores on the host
    truth, summary = scoring.reference(case.label)
    probs = np.concatenate([inference.predict(v, masked_copies(case.image, subsets))
                            for v, subsets, _ in runs])
    reference = lambda: summary
    outputs = lambda: scoring.Summary.join([(scoring.summarize(probs, truth), len(probs))])
  else:
    image = inference.put(case.image)
    truth, on_device = scoring.reference_on_device(inference.put(case.label))
    score = lambda probs: scoring.summarize_on_device(probs, truth)
    parts = [part for v, subsets, _ in runs
             for part in inference.run_masked(v, image, subset_masks(subsets), score)]
    reference = lambda: scoring.Summary.join([(on_device, 1)])
    outputs = lambda: scoring.Summary.join(parts)

  def finish(pool):
    scores = scoring.case_metrics(reference(), outputs(), case.spacing, convention, pool=pool)
    rows = []
    for name, metrics in zip(names, scores):
      rows += report.metric_rows(case.case_id, name, metrics)
    return rows

  return finish


def evaluate_cases(config, cases, student, teacher=None, subsets=ALL_SUBSETS,
                   sliding_window=None, progress=True, desc='evaluate'):
  """Per-case rows (case, subset, region, dice, hd95) of the student on every subset (and the
  teacher on the full input when given) over ``cases`` (``pipeline.EvalCase`` sequence).

  A case's forwards and their scoring programs are queued on the devices; while they run, the
  host reads the next case and finishes the previous one (HD95's distance transforms in
  ``HOST_THREADS`` threads)."""
  sliding_window = bool(inference_lib.eval_field(config, 'sliding_window', False)
                        if sliding_window is None else sliding_window)
  convention = inference_lib.eval_field(config, 'hd95_convention', 'brats')
  inference = inference_lib.get_inference(config)
  runs = [(inference.place(student), tuple(subsets), list(subsets))]
  if teacher is not None:
    runs.append((inference.place(teacher), (FULL,), [report.TEACHER_SUBSET]))
  share = list(range(jax.process_index(), len(cases), jax.process_count()))
  bar = Progress(len(share), desc, enabled=progress and jax.process_index() == 0)
  rows = []
  pending = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as finisher, \
      concurrent.futures.ThreadPoolExecutor(max_workers=HOST_THREADS) as pool:
    for index in share:
      finish = _start_case(inference, cases[index], runs, sliding_window, convention)
      pending.append(finisher.submit(finish, pool))
      # At most two cases in flight: this one on the devices, the previous one on the host.
      while pending and (pending[0].done() or len(pending) > 1):
        rows += pending.pop(0).result()
        bar.update()
    for future in pending:
      rows += future.result()
      bar.update()
  bar.close()
  return _gather_rows(rows)


def output_dir(workdir, split):
  return os.path.join(workdir, 'eval' if split == 'test' else f'eval_{split}')


def _student_kind(config):
  """'MST-KDNet student', or 'Student trained without distillation' (the :plain variant)."""
  l = config.loss
  if not (l.lambda_mstkd or l.lambda_logit or l.lambda_gsme or l.content_weight):
    return 'Student trained without distillation'
  return 'MST-KDNet student'


def _evaluate_and_report(config, dataset, student, teacher, split, source, out=None):
  sliding = bool(inference_lib.eval_field(config, 'sliding_window', False))
  cases = pipeline.load_eval_cases(dataset, split=split, full_box=sliding)
  if not len(cases):
    raise ValueError(f'the {split} split of {dataset.workdir} has no usable case')
  logging.info('evaluating %s on %d %s cases x %d subsets%s (%s)', source, len(cases), split,
               len(ALL_SUBSETS), ' + the teacher' if teacher is not None else '',
               'sliding windows over the brain box' if sliding else 'centre window')
  t0 = time.time()
  rows = evaluate_cases(config, cases, student, teacher, ALL_SUBSETS, sliding,
                        desc=f'evaluate {split}')
  seconds = time.time() - t0
  out = out or output_dir(dataset.workdir, split)
  convention = inference_lib.eval_field(config, 'hd95_convention', 'brats')
  summary = report.summarize(rows, convention)
  if jax.process_index() == 0:
    summary = report.write_report(rows, out, convention,
                                  title=f'{_student_kind(config)}, {split} split ({source})')
    summary.update(split=split, source=source, data=model_facts.evaluation_data(config),
                   seconds=round(seconds, 1),
                   sliding_window=sliding, skipped_cases=list(cases.skipped_cases))
    report.write_summary_json(summary, os.path.join(out, 'summary.json'))
    text = report.text_table(summary)
    print(f'\n15-subset evaluation, {split} split ({source}), {seconds:.0f} s:\n{text}'
          f'Files: {out}/per_case.csv, summary.json, table.md', flush=True)
  return summary


def evaluate_state(config, dataset, state, split='test'):
  """Evaluates the student (and teacher) of a TrainState on ``dataset``; see the module doc."""
  return _evaluate_and_report(config, dataset, build.network_variables(state, 'student'),
                              build.network_variables(state, 'teacher'), split,
                              f'step {int(jax.device_get(state.step))}')


def evaluate_checkpoint(config, workdir, checkpoint=None, split='test', out=None):
  """``--mode=eval``: loads ``checkpoint`` (None / 'latest' / 'best' / a step of ``workdir``,
  or the path of an exported network or another workdir; ``checkpoint.load_networks``) and
  evaluates the 15 subsets on ``split`` of ``workdir``'s data; writes ``out`` (default
  ``<workdir>/eval``, ``eval_<split>`` for other splits). Returns the summary."""
  location, which = ckpt.resolve_location(workdir, checkpoint)
  loaded = ckpt.load_networks(config, location, which, names=('student', 'teacher'))
  dataset = pipeline.prepare(config, workdir, splits=(split,))
  return _evaluate_and_report(config, dataset, loaded.primary(),
                              loaded.networks.get('teacher'),
                              split, loaded.source, out)


# ----------------------------------------------------------------------------------------------
# Validation during training


def mean_dice(rows, prefix='dice'):
  """{'dice': mean over regions of the per-region means, 'dice_WT': ..., ...} of CSV rows."""
  out = {}
  for region in metrics_lib.REGIONS:
    values = [r['dice'] for r in rows if r['region'] == region]
    out[f'{prefix}_{region}'] = float(np.mean(values)) if values else float('nan')
  out[prefix] = float(np.mean([out[f'{prefix}_{r}'] for r in metrics_lib.REGIONS]))
  return out


def _dice_rows(case_id, subsets, counts, truth_count):
  """Validation rows {'case', 'subset', 'region', 'dice'} from ``scoring.dice_counts``' host
  arrays (``metrics.dice``'s values)."""
  rows = []
  for i, subset in enumerate(subsets):
    for r, region in enumerate(metrics_lib.REGIONS):
      rows.append({'case': case_id, 'subset': subset_name(subset), 'region': region,
                   'dice': scoring.dice_from_counts(counts['count'][i, r],
                                                    counts['overlap'][i, r], truth_count[r])})
  return rows


def _case_dice(inference, case, runs):
  """Per network of ``runs`` [(variables, subsets)], the Dice rows of one case: thresholds,
  regions and voxel counts on the devices, only the counts fetched."""
  image = inference.put(case.image)
  truth = scoring.region_masks(np.asarray(case.label))
  truth_count = truth.sum(axis=(0, 1, 2))
  on_device = inference.put(truth)
  count = lambda probs: scoring.dice_counts(probs, on_device)
  started = [inference.run_masked(variables, image, subset_masks(subsets), count)
             for variables, subsets in runs]
  out = []
  for (_, subsets), parts in zip(runs, started):
    parts = [(jax.device_get(p), rows) for p, rows in parts]
    counts = {k: np.concatenate([p[k][:rows] for p, rows in parts]) for k in parts[0][0]}
    out.append(_dice_rows(case.case_id, subsets, counts, truth_count))
  return out


def make_validator(config, dataset):
  """``validate(state, epoch) -> {'dice', 'dice_WT', 'dice_TC', 'dice_ET', 'teacher_dice',
  'teacher_dice_WT', ...}``: the student's mean Dice over ``dataset``'s validation cases
  (centre window) and ``config.eval.val_subsets`` (the subset vocabulary of
  ``modalities.parse_subsets``), and the teacher's on the full input. The training loop keeps
  the checkpoint with the best 'dice' and logs every entry (learning curves)."""
  subsets = parse_subsets(inference_lib.eval_field(config, 'val_subsets', 'all'))
  cases = pipeline.load_eval_cases(dataset, split='val', full_box=False)

  def validate(state, epoch):
    t0 = time.time()
    inference = inference_lib.get_inference(config)
    student = inference.place(build.network_variables(state, 'student'))
    teacher = inference.place(build.network_variables(state, 'teacher'))
    rows, teacher_rows = [], []
    for index in range(jax.process_index(), len(cases), jax.process_count()):
      student_dice, teacher_dice = _case_dice(inference, cases[index],
                                              [(student, subsets), (teacher, (FULL,))])
      rows += student_dice
      teacher_rows += teacher_dice
    result = mean_dice(_gather_rows(rows))
    result.update(mean_dice(_gather_rows(teacher_rows), prefix='teacher_dice'))
    logging.info('epoch %d validation: student Dice %.4f (WT %.4f, TC %.4f, ET %.4f) over %d '
                 'cases x %d subsets, teacher %.4f (WT %.4f), in %.1f s', epoch,
                 result['dice'], result['dice_WT'], result['dice_TC'], result['dice_ET'],
                 len(cases), len(subsets), result['teacher_dice'], result['teacher_dice_WT'],
                 time.time() - t0)
    return result

  return validate
