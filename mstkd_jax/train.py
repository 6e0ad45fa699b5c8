"""Training: state set-up, the compiled step, the loop, logging, checkpoints, resume.

``train_loop(config, workdir, train_iter, steps_per_epoch, validate=...)`` trains; the face that
wires a run (``mstkd_jax.run.train_and_evaluate``, what ``python -m mstkd_jax.main`` runs)
gives it the data and the validator (a callback: training imports nothing from evaluation).
Resume order: the workdir's latest checkpoint, else a fresh start. Re-running the same
command with the same workdir continues exactly where it stopped (state, data order), and
refuses when the workdir was trained with a different config (``allow_config_change``).

Faults: SIGTERM / SIGINT finish the current step, save a checkpoint and exit with status
128 + signal (``Preempted``); a non-finite loss stops training (``TrainingStopped``, naming the
step, the offending terms and the last good checkpoint) or, with ``train.nan_policy='skip'``,
skips that update. Checkpoints are atomic, so a kill -9 leaves the previous one usable.
"""

import functools
import json
import math
import os
import signal
import time
from typing import Callable, Iterator, Optional

import jax
import numpy as np
from absl import logging

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import compile_cache
from mstkd_jax import disk
from mstkd_jax import host_memory
from mstkd_jax import optim
from mstkd_jax import parallel
from mstkd_jax import programs
from mstkd_jax.data import layouts
from mstkd_jax.models import build
from mstkd_jax.fileio import read_json, write_text_atomic
from mstkd_jax.logging_utils import (MetricWriter, describe_memory, drop_records_after,
                                     preload_tensorboard)
# The programs of a run (programs.py), under the names tests and experiments use.
from mstkd_jax.programs import (batch_struct, compile_train_step, create_state,  # noqa: F401
                                state_shardings)


class TrainingStopped(RuntimeError):
  """Training hit a non-finite loss (message names the step, terms, and last checkpoint)."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions): one line saying why, the free
  space and the last good checkpoint. The failed save's temporary folder is removed."""

  def __init__(self, step, manager, error=None, needed=None):
    try:
      manager.wait_until_finished()      # the earlier saves still in flight count as good
    except Exception:  # pylint: disable=broad-except
      pass
    if parallel.is_main_process():
      disk.remove_orbax_temporaries(manager.directory)
    done = [s for s in ckpt.saved_steps(manager.directory) if s != step]
    last = (f'the last good checkpoint is step {done[-1]} in {manager.directory}' if done
            else 'no earlier checkpoint exists')
    if needed is not None:
      reason = f'not enough space: it needs about {disk.megabytes(needed)}'
    elif error is None:
      reason = 'not enough space, as process 0 found'
    elif disk.is_full(error):
      reason = 'No space left on device'
    else:
      reason = f'{type(error).__name__}: {error}'
    super().__init__(f'saving the checkpoint of step {step} into {manager.directory} failed '
                     f'({reason}; {disk.space(manager.directory)}); {last}. Free space or fix '
                     'the permissions, then re-run the same command to resume from it.')


def check_checkpoint_space(manager, step, state):
  """Raises CheckpointSaveError before a save when the filesystem has less free space than
  a checkpoint takes (the last complete one, or 90 % of the state's bytes while none is: the
  weights barely compress): a full disk stops training with one line, not in the middle of
  Orbax's writes. The new checkpoint is written before an old one is deleted."""
  needed = 0
  if parallel.is_main_process():
    done = ckpt.saved_steps(manager.directory)
    size = (disk.folder_bytes(os.path.join(manager.directory, str(done[-1]))) if done else
            int(0.9 * sum(x.nbytes for x in jax.tree.leaves(state))))
    needed = size if disk.enough_for(manager.directory, size) is not None else 0
  if parallel.any_process(needed > 0):
    raise CheckpointSaveError(step, manager, needed=needed or None)


class Preempted(SystemExit):
  """A signal stopped training after a checkpoint was saved; exit status 128 + signal."""

  def __init__(self, signum, step, directory):
    super().__init__(128 + signum)
    self.signum, self.step, self.directory = signum, step, directory
    self.message = (f'stopped by signal {signum} ({signal.Signals(signum).name}) after step '
                    f'{step}; checkpoint saved in {directory}. Re-run the same command to '
                    'resume.')

  def __str__(self):
    return self.message


def frozen_teacher_network(config):
  """The network of ``train.frozen_teacher``'s workdir that becomes the teacher ('student' unless
  ``train.frozen_teacher_network`` says 'teacher'), or None when the teacher is trained. Raises
  CheckpointError naming the field for a bad name or a network named without a source."""
  name = config.train.get('frozen_teacher_network')
  if not optim.teacher_is_frozen(config):
    if name:
      raise ckpt.CheckpointError(
          f'train.frozen_teacher_network: {name!r} is set but train.frozen_teacher is not (name '
          'the workdir or export whose network the teacher starts from, or drop the field)')
    return None
  name = name or 'student'
  if name not in ('student', 'teacher'):
    raise ckpt.CheckpointError(f"train.frozen_teacher_network: {name!r}, expected 'student' or "
                               "'teacher'")
  return name


def with_frozen_teacher(config, state, shardings):
  """``state`` with the teacher's weights read from ``train.frozen_teacher`` (a training
  workdir, whose ``train.frozen_teacher_network`` is taken, or an exported network), placed
  like the fresh teacher. The source must have this config's model, input and spacing."""
  source = config.train.frozen_teacher
  name = frozen_teacher_network(config)
  try:
    loaded = ckpt.load_networks(None, source, None, names=(name,))
  except FileNotFoundError as e:
    raise ckpt.CheckpointError(f'train.frozen_teacher: {e}') from e
  ckpt.check_compatible(config, loaded.config, source)
  variables = loaded.primary() if loaded.is_export else loaded.networks[name]
  variables = jax.device_get(variables)
  params = parallel.host_to_global(variables['params'], shardings.params['teacher'])
  stats = parallel.host_to_global(variables['batch_stats'], shardings.batch_stats['teacher'])
  logging.info('frozen teacher: the %s of %s (%s); it is not trained',
               'network' if loaded.is_export else name, source, loaded.source)
  return state.replace(params={**state.params, 'teacher': params},
                       batch_stats={**state.batch_stats, 'teacher': stats})


def as_step_batch(batch):
  """A batch in the step's types: one-hot labels given as float (0/1) become uint8."""
  label = np.asarray(batch['label'])
  if label.dtype != layouts.TRAIN_LABEL_DTYPE:
    converted = label.astype(layouts.TRAIN_LABEL_DTYPE)
    if not np.array_equal(converted, label):
      raise ValueError('training labels must be one-hot 0/1 values')
    batch = {**batch, 'label': converted}
  return batch


# Fields that may change between a run and its resumption: how long, how often to log,
# validate and save, how to react to NaNs, how the work is spread over devices and workers.
_RESUMABLE_CHANGES = {
    'train': ('epochs', 'log_every', 'checkpoint_every', 'eval_every_epochs',
              'keep_checkpoints', 'nan_policy', 'shard_state'),
    'data': ('workers', 'worker_kind', 'cache_dir'),
}


def _config_for_comparison(config_dict):
  """The parts of a config that must match to resume (not run length, logging, evaluation,
  or how the work is spread)."""
  d = json.loads(json.dumps(config_dict))
  for section, keys in _RESUMABLE_CHANGES.items():
    for key in keys:
      d.get(section, {}).pop(key, None)
  d.pop('eval', None)
  return d


def check_workdir_config(config, workdir, allow_change=False):
  """Compares ``config`` with the workdir's ``config.json``; returns the differing fields.

  Raises ValueError when a field that changes training differs, unless ``allow_change``.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return []
  old = read_json(path)
  new = json.loads(config.to_json_best_effort())
  old = _with_added_defaults(old)
  diffs = sorted(_diff_keys(_config_for_comparison(old), _config_for_comparison(new)))
  changes = ', '.join(f'{k} {_dotted(old, k)!r} -> {_dotted(new, k)!r}' for k in diffs)
  if diffs and not allow_change:
    raise ckpt.CheckpointError(
        f'{path} holds a different config (saved -> given: {changes}). Use a new '
        '--workdir, or pass --allow_config_change to resume anyway.')
  if diffs:
    logging.warning('resuming with a changed config (allowed): %s', changes)
  return diffs


def _with_added_defaults(saved):
  """``saved`` with every field it lacks set to the project's default for it.

  A workdir written before a field existed trained as that field's default does (new fields
  are added with the old behaviour as their default), so resuming it with the default is no
  change; a non-default value still is.
  """
  from mstkd_jax.configs import brats    # pylint: disable=import-outside-toplevel

  def fill(tree, defaults):
    out = dict(tree)
    for key, value in defaults.items():
      if key not in out:
        out[key] = value
      elif isinstance(value, dict) and isinstance(out[key], dict):
        out[key] = fill(out[key], value)
    return out

  return fill(saved, json.loads(brats.base_config().to_json_best_effort()))


def _dotted(tree, key):
  """The value at ``'a.b.c'`` of nested dicts (None where absent)."""
  for part in key.split('.'):
    tree = tree.get(part) if isinstance(tree, dict) else None
  return tree


def _diff_keys(a, b, prefix=''):
  out = []
  for k in set(a) | set(b):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _diff_keys(va, vb, f'{prefix}{k}.')
    elif va != vb:
      out.append(prefix + k)
  return out


class _StopRequest:
  """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.signal = signum
    logging.warning('received signal %d: finishing this step, then saving a checkpoint',
                    signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def _data_state(train_iter):
  """The iterator's position as a JSON-able value (grain's bytes become a string)."""
  get_state = getattr(train_iter, 'get_state', None)
  if get_state is None:
    return None
  state = get_state()
  if isinstance(state, (bytes, bytearray)):
    return {'bytes': state.decode('utf-8')}
  return {'value': state}


def _restore_data_state(train_iter, data_state):
  """Puts the iterator back where the checkpoint was taken; False if it cannot."""
  if not data_state or not hasattr(train_iter, 'set_state'):
    return False
  if 'bytes' in data_state:
    train_iter.set_state(data_state['bytes'].encode('utf-8'))
  else:
    train_iter.set_state(data_state['value'])
  return True


def _summarise(metrics):
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def train_loop(config, workdir, train_iter: Iterator, steps_per_epoch: int, *,
               validate: Optional[Callable] = None, allow_config_change=False,
               max_steps: Optional[int] = None, mesh=None):
  """Runs training from ``train_iter`` until ``epochs * steps_per_epoch`` steps (or
  ``max_steps``).

  ``train_iter`` yields {'image' float32, 'label' one-hot uint8 (0/1 floats are converted)}
  NumPy batches of this process's share of the global batch (``batch_size_per_device x local
  devices``; ``batch_struct``); with ``get_state`` / ``set_state`` its
  position is checkpointed too. ``validate(state, epoch) -> dict`` (optional) runs every
  ``eval_every_epochs`` epochs; its 'dice' entry chooses the best checkpoint. Every process
  runs this function. Returns the final state.
  """
  train_cfg = config.train
  frozen_teacher_network(config)  # a bad setting fails before anything is written
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh if mesh is not None else parallel.make_mesh()
  global_bs = train_cfg.batch_size_per_device * mesh.size
  total_steps = int(train_cfg.epochs * steps_per_epoch)
  if max_steps is not None:
    total_steps = min(total_steps, int(max_steps))

  manager = ckpt.make_manager(os.path.join(workdir, 'checkpoints'),
                              keep=train_cfg.keep_checkpoints)
  resuming = manager.latest_step() is not None
  if resuming:
    check_workdir_config(config, workdir, allow_config_change)
  elif os.path.exists(os.path.join(workdir, 'config.json')):
    logging.warning('%s has a config.json but no checkpoint: starting afresh', workdir)
  parallel.sync('mstkd_config_checked')
  if parallel.is_main_process():
    write_text_atomic(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))

  load_step = functools.partial(programs.prefetch_step, config, mesh, steps_per_epoch,
                                global_bs)
  if not resuming or manager.latest_step() < total_steps:
    if resuming or programs.has_initial_state(config, mesh, steps_per_epoch):
      load_step()   # the cached step loads in a thread while the state is read
    if parallel.is_main_process():
      preload_tensorboard()   # seconds of imports, in a thread while the programs load
  abstract = programs.abstract_state(config, mesh, steps_per_epoch)
  shardings = state_shardings(config, mesh, abstract)
  best_dice = -math.inf
  if resuming:
    start = manager.latest_step()
    state, data_state, meta = ckpt.restore(manager, start,
                                           ckpt.abstract_like(abstract, shardings))
    if not _restore_data_state(train_iter, data_state):
      logging.warning('no data-iterator state restored (none saved for this process, or the '
                      'iterator has no set_state): the data order restarts')
    if meta.get('best_dice') is not None:
      best_dice = float(meta['best_dice'])
    logging.info('resumed from %s at step %d', manager.directory, start)
    if parallel.is_main_process():
      dropped = drop_records_after(workdir, start)
      if dropped:
        logging.info('metrics.jsonl: dropped %d record(s) of steps after %d (lost with the '
                     'interrupted run; they are logged again)', dropped, start)
  else:
    logging.info('building the networks and initialising the train state')
    t0 = time.time()
    # Otherwise the cached step loads in a thread once the initialisation is loaded, while
    # it runs.
    state = create_state(config, mesh, steps_per_epoch, shardings, after_load=load_step)
    if optim.teacher_is_frozen(config):
      state = with_frozen_teacher(config, state, shardings)
    logging.info('fresh start in %.1f s: teacher %d, student %d, discriminator %d parameters',
                 time.time() - t0, build.count_params(state.params['teacher']),
                 build.count_params(state.params['student']),
                 build.count_params(state.disc_params))

  if int(state.step) >= total_steps:
    logging.info('training already finished: step %d of %d (raise --config.train.epochs or '
                 '--max_steps to train on; --mode=eval re-evaluates a checkpoint)',
                 int(state.step), total_steps)
    manager.close()
    return state

  host_memory.trim()
  logging.info('the training step (teacher, student, every loss, discriminator): from the '
               'executable cache, else compiled (about a minute on a CPU the first time)')
  with compile_cache.timed('the training step', log=False) as tally:
    compiled = compile_train_step(config, mesh, steps_per_epoch, abstract, global_bs, shardings)
  host_memory.trim()
  logging.info('the training step (global batch %d on %d devices): %s; %s', global_bs,
               mesh.size, tally.text, describe_memory(compiled))
  rng = parallel.replicated_key(config.seed + 1, mesh)

  writer = MetricWriter(workdir, enabled=parallel.is_main_process())
  step = int(state.step)
  first_step = step
  last_saved = step if resuming else None
  last_time, last_step_logged = time.time(), step
  progress = writer.progress(total=total_steps, initial=step)

  def meta(epoch):
    return {'step': step, 'epoch': epoch, 'best_dice': None if best_dice == -math.inf
            else best_dice, 'config': json.loads(config.to_json_best_effort())}

  def save(data_state, val_dice=None, force=False):
    nonlocal last_saved
    finish_saves()        # Orbax waits for the previous save anyway; its failure is its own
    check_checkpoint_space(manager, step, state)
    try:
      ckpt.save(manager, step, state, data_state, meta(step // steps_per_epoch),
                val_dice=val_dice, force=force)
    except (OSError, ValueError) as e:   # Orbax raises TensorStore's I/O errors as ValueError
      raise CheckpointSaveError(step, manager, e) from e
    last_saved = step

  def finish_saves():
    try:
      manager.wait_until_finished()
    except (OSError, ValueError) as e:
      raise CheckpointSaveError(last_saved, manager, e) from e

  def fetch():
    return parallel.global_batch(as_step_batch(next(train_iter)), mesh)

  try:
    with _StopRequest() as stop:
      batch = fetch() if step < total_steps else None
      data_state = _data_state(train_iter)
      while step < total_steps:
        state, metrics = compiled(state, batch, rng)
        step += 1
        # The iterator has delivered exactly `step` batches: this is the position to save
        # with this state. Then the next batch goes to the devices while this step runs.
        data_state = _data_state(train_iter)
        batch = fetch() if step < total_steps else None

        finite = bool(metrics['finite'])
        if not finite:
          bad = sorted(k for k, v in _summarise(metrics).items() if not math.isfinite(v))
          if train_cfg.nan_policy != 'skip':
            manager.wait_until_finished()
            last = manager.latest_step()
            where = (f'the last good checkpoint is step {last} in {manager.directory}'
                     if last is not None else 'no checkpoint was saved yet')
            raise TrainingStopped(
                f'non-finite loss at step {step} (epoch {(step - 1) // steps_per_epoch}): '
                f'{", ".join(bad)} are NaN/Inf; {where}. Re-running resumes from it; '
                "train.nan_policy='skip' skips such updates instead.")
          logging.warning('step %d: non-finite %s; update skipped', step, ', '.join(bad))

        if step % train_cfg.log_every == 0 or step == total_steps or step == first_step + 1:
          values = _summarise(metrics)
          now = time.time()
          steps_per_s = (step - last_step_logged) / max(now - last_time, 1e-9)
          last_time, last_step_logged = now, step
          values.update(steps_per_s=steps_per_s, volumes_per_s=steps_per_s * global_bs,
                        eta_s=(total_steps - step) / max(steps_per_s, 1e-9))
          writer.write(step, values)
        progress.update_to(step)

        epoch = step // steps_per_epoch
        if validate is not None and step % steps_per_epoch == 0 and (
            epoch % train_cfg.eval_every_epochs == 0 or step == total_steps):
          result = validate(state, epoch)
          writer.write(step, {f'val_{k}': v for k, v in result.items()})
          best_dice = max(best_dice, float(result['dice']))
          save(data_state, val_dice=result['dice'])
        elif step % train_cfg.checkpoint_every == 0:
          save(data_state)

        if parallel.any_process(stop.signal is not None):
          if last_saved != step:
            save(data_state, force=True)
          finish_saves()
          manager.close()
          stopped = Preempted(stop.signal or signal.SIGTERM, step, manager.directory)
          logging.warning('%s', stopped.message)
          raise stopped
      if last_saved != step:
        save(data_state, force=True)
      finish_saves()
      manager.close()
  except BaseException:
    progress.close()
    writer.close(quiet=True)     # the error in flight is the one to report
    raise
  progress.close()
  writer.close()
  return state


class RandomBatches:
  """Endless random {'image', 'label'} batches for benchmarks and tests.

  Batch ``i`` is a pure function of (seed, i), so the iterator has a position
  (``get_state`` / ``set_state``, JSON bytes like grain's) and each process can take its own
  rows of the same global batch (``process_index`` of ``process_count``). ``nan_at``: a batch
  index whose image is NaN (fault tests).
  """

  def __init__(self, config, global_batch_size, seed=0, process_index=0, process_count=1,
               nan_at=None):
    if global_batch_size % process_count:
      raise ValueError(f'global batch {global_batch_size} is not divisible by '
                       f'{process_count} processes')
    self.shape = build.input_shape(config, global_batch_size)
    self.num_classes = config.model.num_classes
    self.seed = seed
    self.local = global_batch_size // process_count
    self.offset = process_index * self.local
    self.nan_at = nan_at
    self.index = 0
    self.served = []   # indices delivered by this object (tests check the data order)

  def batch(self, index):
    rs = np.random.RandomState([self.seed, index])
    image = rs.rand(*self.shape).astype(np.float32)
    classes = rs.randint(0, self.num_classes, size=self.shape[:-1])
    label = np.eye(self.num_classes, dtype=layouts.TRAIN_LABEL_DTYPE)[classes]
    rows = slice(self.offset, self.offset + self.local)
    image, label = image[rows], label[rows]
    if index == self.nan_at:
      image = np.full_like(image, np.nan)
    return {'image': image, 'label': label}

  def __iter__(self):
    return self

  def __next__(self):
    out = self.batch(self.index)
    self.served.append(self.index)
    self.index += 1
    return out

  def get_state(self):
    return json.dumps({'index': self.index, 'seed': self.seed}).encode()

  def set_state(self, state):
    state = json.loads(state)
    if state['seed'] != self.seed:
      raise ValueError(f'iterator state of seed {state["seed"]}, not {self.seed}')
    self.index = int(state['index'])


def random_batches(config, batch_size, seed=0):
  """Endless random {'image', 'label'} batches (benchmarks, smoke tests)."""
  return RandomBatches(config, batch_size, seed)
