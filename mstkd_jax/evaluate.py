"""The 15-subset evaluation (docs/method.md, "Evaluation"), validation during training, and the inference core.

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
the paper's protocol, the default) takes the centre window of ``data.input_shape`` of the brain box, and the metrics
are computed inside that window; True slides overlapping windows over the whole box and blends
them (as ``mstkd_jax.predict`` does), with metrics over the whole box.

Speed: one ``jax.jit`` function ``probs = f(variables, images[B, H, W, D, 4])`` per config,
compiled once (``Inference``); a case's 15 masked copies (and its windows) go through it in
batches of ``config.eval.batch_size``, the last batch zero-padded so the shape never changes.
The host computes the metrics of one case in a background thread while the device runs the next.
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
import functools
import json
import math
import os
import time

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import compile_cache
from mstkd_jax import metrics as metrics_lib
from mstkd_jax import report
from mstkd_jax.data import pipeline
from mstkd_jax.logging_utils import Progress
from mstkd_jax.models import build
from mstkd_jax.modalities import ALL_SUBSETS, FULL, masked_copies, parse_subsets, subset_name


def _eval_field(config, name, default):
  """config.eval.<name>, or ``default`` for configs saved before the field existed."""
  section = config.get('eval') if hasattr(config, 'get') else None
  if section is None:
    return default
  value = section.get(name, default) if hasattr(section, 'get') else default
  return default if value is None else value


# ----------------------------------------------------------------------------------------------
# Inference core: one compiled forward pass, batching, sliding windows


def window_starts(box, window, overlap=0.5):
  """Start offsets of overlapping windows covering ``box`` (per axis, evenly spaced).

  Along an axis of size n with window t <= n: k = ceil((n - t) / (t (1 - overlap))) + 1 windows,
  the first at 0 and the last at n - t. Returns a list of 3-tuples.
  """
  if not 0 <= overlap < 1:
    raise ValueError(f'overlap must be in [0, 1), got {overlap}')
  per_axis = []
  for n, t in zip(box, window):
    if n < t:
      raise ValueError(f'box {tuple(box)} is smaller than the window {tuple(window)}')
    if n == t:
      per_axis.append([0])
      continue
    stride = max(1, int(t * (1.0 - overlap)))
    k = int(math.ceil((n - t) / stride)) + 1
    per_axis.append(sorted({int(round(i * (n - t) / (k - 1))) for i in range(k)}))
  return [(a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]


def blend_weights(window, mode='gaussian'):
  """Per-voxel weights of one window: 'uniform' ones, or 'gaussian' (sigma = 1/8 of the window
  side, peak 1, floored at 1e-3 so that every voxel keeps some weight)."""
  if mode == 'uniform':
    return np.ones(tuple(window), np.float32)
  if mode != 'gaussian':
    raise ValueError(f"blend must be 'gaussian' or 'uniform', got {mode!r}")
  axes = []
  for t in window:
    x = np.arange(t, dtype=np.float64) - (t - 1) / 2.0
    axes.append(np.exp(-0.5 * (x / (t / 8.0)) ** 2))
  w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
  return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def _local_copy(x):
  """A host copy of an array that spans other processes' devices (multi-host): replicated
  arrays are read locally, sharded ones gathered (a collective: every process calls it)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return x


class Inference:
  """The compiled evaluation forward pass of one network size, with batching and windows.

  ``run(variables, images)`` maps [n, H, W, D, 4] inputs of the model's input shape to sigmoid
  probabilities [n, H, W, D, C], ``batch_size`` at a time (the last batch zero-padded: one
  compilation for any n). ``predict(variables, images)`` takes [n, bx, by, bz, 4] boxes at least
  as large as the input shape and slides overlapping windows over them. ``variables`` is
  {'params', 'batch_stats'} of one network, put on this process's devices by ``place``.
  """

  def __init__(self, config, batch_size=None):
    self.config = config
    self.window = tuple(int(s) for s in config.data.input_shape)
    self.channels = int(config.model.in_channels)
    devices = jax.local_devices()
    batch_size = int(batch_size or _eval_field(config, 'batch_size', 1))
    # A multiple of the local device count, so that the batch splits evenly across them.
    n_dev = len(devices)
    self.batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)
    mesh = Mesh(np.asarray(devices), ('data',))
    self._replicated = NamedSharding(mesh, P())
    self._batch_sharding = NamedSharding(mesh, P('data'))
    forward = functools.partial(build.predict_probs, config=config)

    def probs(variables, images):
      with jax.named_scope('evaluate_forward'):
        return forward(variables['params'], variables['batch_stats'], images)

    self._fn = jax.jit(probs, in_shardings=(self._replicated, self._batch_sharding),
                       out_shardings=self._batch_sharding)
    self.compile_seconds = None

  def place(self, variables):
    """{'params', 'batch_stats'} on this process's devices, replicated (idempotent)."""
    variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
    return jax.device_put(jax.tree.map(_local_copy, variables), self._replicated)

  def _call(self, variables, batch):
    if self.compile_seconds is None:
      t0 = time.time()
      with compile_cache.timed('the evaluation forward pass', log=False) as tally:
        out = np.asarray(self._fn(variables, batch))
      self.compile_seconds = time.time() - t0
      logging.info('the evaluation forward pass (batch %d of %s): %s; ready and run once in '
                   '%.1f s', self.batch_size, self.window, compile_cache.describe(tally),
                   self.compile_seconds)
      return out
    return np.asarray(self._fn(variables, batch))

  def stream(self, variables, items):
    """Runs (key, image [H, W, D, 4]) items in batches; yields (key, probs [H, W, D, C])."""
    shape = (self.batch_size,) + self.window + (self.channels,)
    keys, batch = [], np.zeros(shape, np.float32)
    for key, image in items:
      batch[len(keys)] = image
      keys.append(key)
      if len(keys) == self.batch_size:
        out = self._call(variables, batch)
        yield from zip(keys, out)
        keys = []
    if keys:
      batch[len(keys):] = 0.0
      out = self._call(variables, batch)
      yield from zip(keys, out[:len(keys)])

  def run(self, variables, images):
    """[n, H, W, D, 4] (the input shape) -> [n, H, W, D, C] probabilities."""
    images = np.asarray(images, np.float32)
    if tuple(images.shape[1:4]) != self.window:
      raise ValueError(f'inputs of shape {images.shape[1:4]}; the model takes {self.window}')
    out = None
    for i, probs in self.stream(variables, ((i, x) for i, x in enumerate(images))):
      if out is None:
        out = np.empty((len(images),) + probs.shape, np.float32)
      out[i] = probs
    return out

  def predict(self, variables, images, overlap=None, blend=None):
    """[n, bx, by, bz, 4] boxes (each side >= input shape) -> [n, bx, by, bz, C] probabilities,
    from overlapping windows blended with ``blend`` weights (see ``window_starts``)."""
    images = np.asarray(images, np.float32)
    box = tuple(images.shape[1:4])
    if box == self.window:
      return self.run(variables, images)
    overlap = _eval_field(self.config, 'overlap', 0.5) if overlap is None else overlap
    blend = _eval_field(self.config, 'blend', 'gaussian') if blend is None else blend
    starts = window_starts(box, self.window, overlap)
    weights = blend_weights(self.window, blend)
    total = np.zeros(box, np.float32)
    for s in starts:
      total[tuple(slice(a, a + t) for a, t in zip(s, self.window))] += weights
    out = None

    def items():
      for i in range(len(images)):
        for s in starts:
          sl = tuple(slice(a, a + t) for a, t in zip(s, self.window))
          yield (i, sl), images[i][sl]

    for (i, sl), probs in self.stream(variables, items()):
      if out is None:
        out = np.zeros((len(images),) + box + (probs.shape[-1],), np.float32)
      out[i][sl] += probs * weights[..., None]
    out /= total[None, ..., None]
    return out


_INFERENCE = {}


def get_inference(config, batch_size=None) -> Inference:
  """The (cached) ``Inference`` of this network size: every evaluation and validation of a run
  reuses one compiled function."""
  key = json.dumps({'model': config.model.to_dict(), 'dtype': str(config.dtype),
                    'shape': list(config.data.input_shape),
                    'batch': batch_size or _eval_field(config, 'batch_size', 1)},
                   sort_keys=True, default=str)
  if key not in _INFERENCE:
    _INFERENCE[key] = Inference(config, batch_size)
  return _INFERENCE[key]


# ----------------------------------------------------------------------------------------------
# Evaluation


def _case_rows(case_id, label, spacing, outputs, convention):
  """Per-case CSV rows from {subset or TEACHER_SUBSET: probs}."""
  truth = metrics_lib.region_masks(label)
  rows = []
  for subset, probs in outputs.items():
    pred = metrics_lib.region_masks(probs)
    rows += report.metric_rows(case_id, subset,
                               metrics_lib.case_metrics(pred, truth, spacing, convention))
  return rows


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


def evaluate_cases(config, cases, student, teacher=None, subsets=ALL_SUBSETS,
                   sliding_window=None, progress=True, desc='evaluate'):
  """Per-case rows (case, subset, region, dice, hd95) of the student on every subset (and the
  teacher on the full input when given) over ``cases`` (``pipeline.EvalCase`` sequence)."""
  sliding_window = bool(_eval_field(config, 'sliding_window', False)
                        if sliding_window is None else sliding_window)
  convention = _eval_field(config, 'hd95_convention', 'brats')
  inference = get_inference(config)
  student = inference.place(student)
  teacher = inference.place(teacher) if teacher is not None else None
  share = list(range(jax.process_index(), len(cases), jax.process_count()))
  bar = Progress(len(share), desc, enabled=progress and jax.process_index() == 0)
  rows = []
  pending = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    for index in share:
      case = cases[index]
      run = inference.predict if sliding_window else inference.run
      outputs = dict(zip(subsets, run(student, masked_copies(case.image, subsets))))
      if teacher is not None:
        outputs[report.TEACHER_SUBSET] = run(teacher, case.image[None])[0]
      # The host scores this case while the device runs the next one.
      pending.append(pool.submit(_case_rows, case.case_id, case.label, case.spacing, outputs,
                                 convention))
      del outputs
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
  sliding = bool(_eval_field(config, 'sliding_window', False))
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
  convention = _eval_field(config, 'hd95_convention', 'brats')
  summary = report.summarize(rows, convention)
  if jax.process_index() == 0:
    summary = report.write_report(rows, out, convention,
                                  title=f'{_student_kind(config)}, {split} split ({source})')
    summary.update(split=split, source=source, seconds=round(seconds, 1),
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
                              None if loaded.is_export else loaded.networks.get('teacher'),
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


def _dice_rows(case_id, label, outputs):
  truth = metrics_lib.region_masks(label)
  rows = []
  for subset, probs in outputs.items():
    pred = metrics_lib.region_masks(probs)
    for region in metrics_lib.REGIONS:
      rows.append({'case': case_id, 'subset': subset_name(subset), 'region': region,
                   'dice': metrics_lib.dice(pred[region], truth[region])})
  return rows


def make_validator(config, dataset):
  """``validate(state, epoch) -> {'dice', 'dice_WT', 'dice_TC', 'dice_ET', 'teacher_dice',
  'teacher_dice_WT', ...}``: the student's mean Dice over ``dataset``'s validation cases
  (centre window) and ``config.eval.val_subsets`` (the subset vocabulary of
  ``modalities.parse_subsets``), and the teacher's on the full input. The training loop keeps
  the checkpoint with the best 'dice' and logs every entry (learning curves)."""
  subsets = parse_subsets(_eval_field(config, 'val_subsets', 'all'))
  cases = pipeline.load_eval_cases(dataset, split='val', full_box=False)

  def validate(state, epoch):
    t0 = time.time()
    inference = get_inference(config)
    student = inference.place(build.network_variables(state, 'student'))
    teacher = inference.place(build.network_variables(state, 'teacher'))
    rows, teacher_rows = [], []
    for index in range(jax.process_index(), len(cases), jax.process_count()):
      case = cases[index]
      probs = inference.run(student, masked_copies(case.image, subsets))
      rows += _dice_rows(case.case_id, case.label, dict(zip(subsets, probs)))
      probs = inference.run(teacher, case.image[None])
      teacher_rows += _dice_rows(case.case_id, case.label, {FULL: probs[0]})
    result = mean_dice(_gather_rows(rows))
    result.update(mean_dice(_gather_rows(teacher_rows), prefix='teacher_dice'))
    logging.info('epoch %d validation: student Dice %.4f (WT %.4f, TC %.4f, ET %.4f) over %d '
                 'cases x %d subsets, teacher %.4f (WT %.4f), in %.1f s', epoch,
                 result['dice'], result['dice_WT'], result['dice_TC'], result['dice_ET'],
                 len(cases), len(subsets), result['teacher_dice'], result['teacher_dice_WT'],
                 time.time() - t0)
    return result

  return validate
