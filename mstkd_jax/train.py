"""Training: state set-up, the loop, logging, periodic validation, checkpoints, resume.

``train_and_evaluate(config, workdir)`` is what ``python -m mstkd_jax.main --mode=train`` runs.
Resume order: the workdir's latest checkpoint, else a fresh start. Re-running the same
command with the same workdir continues exactly where it stopped (state, data order).
"""

import functools
import json
import math
import os
import signal
import sys
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import parallel
from mstkd_jax import step as step_lib
from mstkd_jax.logging_utils import MetricWriter, describe_memory


class TrainingStopped(RuntimeError):
  """Training hit a non-finite loss (message names the step, terms, and last checkpoint)."""


def create_state(config, mesh, spe):
  """Initialises the TrainState directly into replicated device memory."""
  init = functools.partial(step_lib.init_state, config, spe=spe)
  return jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.key(config.seed))


def batch_struct(config, global_batch_size, mesh):
  shape = step_lib.input_shape(config, global_batch_size)
  label_shape = shape[:-1] + (config.model.num_classes,)
  sharding = parallel.batch_sharding(mesh)
  return {'image': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding),
          'label': jax.ShapeDtypeStruct(label_shape, jnp.float32, sharding=sharding)}


def compile_train_step(config, mesh, spe, abstract_state, global_batch_size):
  """Lowers and compiles the training step ahead of time for these shapes and shardings.

  The state is donated. Returns the compiled executable: call it as
  ``compiled(state, batch, rng) -> (state, metrics)``.
  """
  rep = parallel.replicated(mesh)
  fn = jax.jit(functools.partial(step_lib.train_step, config=config, spe=spe),
               in_shardings=(rep, parallel.batch_sharding(mesh), rep),
               out_shardings=(rep, rep), donate_argnums=(0,))
  state_struct = ckpt.abstract_like(abstract_state, rep)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
  return fn.lower(state_struct, batch_struct(config, global_batch_size, mesh), rng).compile()


def _config_for_comparison(config_dict):
  """The parts of a config that must match to resume (everything but run-length/logging)."""
  d = json.loads(json.dumps(config_dict))
  for key in ('epochs', 'log_every', 'checkpoint_every', 'eval_every_epochs',
              'keep_checkpoints', 'nan_policy'):
    d.get('train', {}).pop(key, None)
  d.get('data', {}).pop('workers', None)
  return d


def check_workdir_config(config, workdir, allow_change=False):
  """Refuses to resume a workdir that was trained with a different config."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(config.to_json_best_effort())
  a, b = _config_for_comparison(old), _config_for_comparison(new)
  if a != b and not allow_change:
    diffs = sorted(_diff_keys(a, b))
    raise ValueError(
        f'{path} holds a different config (fields differing: {", ".join(diffs)}). Use a new '
        '--workdir, or pass --allow_config_change to resume anyway.')


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
      except ValueError:  # not the main thread (e.g. some test runners)
        pass
    return self

  def _handle(self, signum, frame):
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
  get_state = getattr(train_iter, 'get_state', None)
  if get_state is None:
    return {}
  state = get_state()
  if isinstance(state, bytes):
    state = state.decode('utf-8')
  return {'iterator': state}


def _restore_data_state(train_iter, data_state):
  if data_state and 'iterator' in data_state and hasattr(train_iter, 'set_state'):
    state = data_state['iterator']
    try:
      train_iter.set_state(state)
    except TypeError:
      train_iter.set_state(state.encode('utf-8'))


def _summarise(metrics):
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def train_loop(config, workdir, train_iter: Iterator, spe: int, *,
               validate: Optional[Callable] = None, allow_config_change=False,
               max_steps: Optional[int] = None):
  """Runs training from ``train_iter`` (yields {'image','label'} NumPy batches of this
  process's share) until ``epochs * spe`` steps (or ``max_steps``). Returns the final state.

  ``validate(state, epoch) -> dict`` (optional) runs every ``eval_every_epochs`` epochs; its
  'dice' entry chooses the best checkpoint.
  """
  os.makedirs(workdir, exist_ok=True)
  check_workdir_config(config, workdir, allow_config_change)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = parallel.make_mesh()
  global_bs = config.train.batch_size_per_device * jax.device_count()
  total_steps = int(config.train.epochs * spe)
  if max_steps is not None:
    total_steps = min(total_steps, int(max_steps))

  manager = ckpt.make_manager(os.path.join(workdir, 'checkpoints'),
                              keep=config.train.keep_checkpoints)
  abstract = step_lib.abstract_state(config, spe)
  best_dice = -math.inf
  if manager.latest_step() is not None:
    start = manager.latest_step()
    state, data_state, meta = ckpt.restore(
        manager, start, ckpt.abstract_like(abstract, parallel.replicated(mesh)))
    _restore_data_state(train_iter, data_state)
    best_dice = meta.get('best_dice', best_dice) if meta.get('best_dice') is not None else \
        -math.inf
    logging.info('resumed from %s at step %d', manager.directory, start)
  else:
    state = create_state(config, mesh, spe)
    logging.info('fresh start: teacher %d, student %d, discriminator %d parameters',
                 step_lib.count_params(state.params['teacher']),
                 step_lib.count_params(state.params['student']),
                 step_lib.count_params(state.disc_params))

  t0 = time.time()
  compiled = compile_train_step(config, mesh, spe, abstract, global_bs)
  logging.info('compiled the training step in %.1f s; %s', time.time() - t0,
               describe_memory(compiled))
  rng = jax.device_put(jax.random.key(config.seed + 1), parallel.replicated(mesh))

  writer = MetricWriter(workdir, enabled=is_main)
  step = int(state.step)
  first_step = step
  last_saved = step if manager.latest_step() is not None else None
  last_time, last_step_logged = time.time(), step
  progress = writer.progress(total=total_steps, initial=step)

  def meta(epoch):
    return {'step': step, 'epoch': epoch, 'best_dice': None if best_dice == -math.inf
            else best_dice, 'config': json.loads(config.to_json_best_effort())}

  def save(val_dice=None, force=False):
    nonlocal last_saved
    ckpt.save(manager, step, state, _data_state(train_iter), meta(step // spe),
              val_dice=val_dice, force=force)
    last_saved = step

  with _StopRequest() as stop:
    while step < total_steps:
      batch = parallel.global_batch(next(train_iter), mesh)
      state, metrics = compiled(state, batch, rng)
      step += 1
      log_now = step % config.train.log_every == 0 or step == total_steps or \
          step == first_step + 1
      if log_now or config.train.nan_policy == 'stop':
        finite = bool(metrics['finite'])
        if not finite:
          values = _summarise(metrics)
          bad = [k for k, v in values.items() if not math.isfinite(v)]
          if config.train.nan_policy == 'stop':
            manager.wait_until_finished()
            last = manager.latest_step()
            raise TrainingStopped(
                f'non-finite loss at step {step}: terms {", ".join(bad)} are NaN/Inf. The last '
                f'good checkpoint is step {last} in {manager.directory}'
                if last is not None else f'non-finite loss at step {step}: terms '
                f'{", ".join(bad)} are NaN/Inf; no checkpoint was saved yet')
          logging.warning('step %d: non-finite terms %s; update skipped', step, bad)
      if log_now:
        values = _summarise(metrics)
        now = time.time()
        steps_per_s = (step - last_step_logged) / max(now - last_time, 1e-9)
        last_time, last_step_logged = now, step
        values.update(steps_per_s=steps_per_s, volumes_per_s=steps_per_s * global_bs,
                      eta_s=(total_steps - step) / max(steps_per_s, 1e-9))
        writer.write(step, values)
      progress.update(step)
      epoch_done = step % spe == 0
      epoch = step // spe
      if validate is not None and epoch_done and (
          epoch % config.train.eval_every_epochs == 0 or step == total_steps):
        result = validate(state, epoch)
        writer.write(step, {f'val_{k}': v for k, v in result.items()})
        best_dice = max(best_dice, result['dice'])
        save(val_dice=result['dice'])
      elif step % config.train.checkpoint_every == 0:
        save()
      if stop.signal is not None:
        save(force=True)
        manager.wait_until_finished()
        progress.close()
        writer.close()
        logging.warning('stopped by signal %d at step %d; checkpoint saved in %s. Re-run the '
                        'same command to resume.', stop.signal, step, manager.directory)
        sys.exit(128 + stop.signal)
  if last_saved != step:
    save(force=True)
  manager.wait_until_finished()
  progress.close()
  writer.close()
  return state


def random_batches(config, batch_size, seed=0):
  """Endless random {'image', 'label'} batches (benchmarks, smoke tests)."""
  rs = np.random.RandomState(seed)
  shape = step_lib.input_shape(config, batch_size)
  while True:
    image = rs.rand(*shape).astype(np.float32)
    classes = rs.randint(0, config.model.num_classes, size=shape[:-1])
    label = np.eye(config.model.num_classes, dtype=np.float32)[classes]
    yield {'image': image, 'label': label}


def train_and_evaluate(config, workdir, allow_config_change=False, max_steps=None):
  """Trains on ``config.data`` (synthetic cases when no root is given), validating every
  ``eval_every_epochs`` epochs, then evaluates the 15 modality subsets on the test split."""
  from mstkd_jax.data import pipeline
  from mstkd_jax import evaluate

  os.makedirs(workdir, exist_ok=True)
  root = pipeline.resolve_root(config, workdir)
  logging.info('data: %s', root)
  split = pipeline.make_split(config, workdir)
  per_process_batch = config.train.batch_size_per_device * jax.local_device_count()
  train_iter = pipeline.make_train_loader(
      config, workdir, batch_size=per_process_batch, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  num_train = len(split['train']) - len(getattr(train_iter, 'skipped_cases', []) or [])
  spe = step_lib.steps_per_epoch(config, num_train)
  logging.info('%d training cases, %d steps per epoch, %d epochs', num_train, spe,
               config.train.epochs)
  validate = evaluate.make_validator(config, workdir) if split['val'] else None
  try:
    state = train_loop(config, workdir, train_iter, spe, validate=validate,
                       allow_config_change=allow_config_change, max_steps=max_steps)
  finally:
    close = getattr(train_iter, 'close', None)
    if close is not None:
      close()
  if split['test']:
    evaluate.evaluate_state(config, workdir, state, split='test')
  return state
