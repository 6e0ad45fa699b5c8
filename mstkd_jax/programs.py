"""The two compiled programs of training, the initialisation and the step, obtained as fast as
the caches allow.

Each program is looked up first in ``executable_cache`` under a key made from the config, the
mesh, the steps per epoch (and the batch for the step) with the package's source and the
library versions: a warm start loads it without tracing or lowering. Otherwise it is traced,
lowered and compiled (through the persistent compilation cache, ``compile_cache``) and kept
there for the next start. The shapes of the train state, which would take a trace of both
networks to know, are kept beside them (``abstract_state``), and so is an initial state of at
most ``STATE_LIMIT_BYTES`` (the CPU configs'), which a warm fresh start reads instead of
loading and running the initialisation program. ``prefetch_step`` starts loading the step in a
thread, so that it loads while the state is computed, read or restored.

``train.train_loop`` uses these; ``train`` re-exports ``create_state``,
``compile_train_step``, ``batch_struct`` and ``state_shardings``.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mstkd_jax import checkpoint as ckpt
from mstkd_jax import compile_cache
from mstkd_jax import executable_cache
from mstkd_jax import parallel
from mstkd_jax import step as step_lib
from mstkd_jax.data import layouts
from mstkd_jax.models import build

# Initial states up to this size are kept in the executable cache too (:tiny's is 17 MB, the
# full-size model's 3.5 GiB is not): a warm fresh start reads them instead of loading and
# running the initialisation program.
STATE_LIMIT_BYTES = 64 * 2**20


def state_shardings(config, mesh, abstract_state):
  """Replicated state, or split over the ``data`` axis with ``config.train.shard_state``."""
  shard = bool(config.train.get('shard_state', False))
  return parallel.state_shardings(abstract_state, mesh, shard=shard)


def batch_struct(config, global_batch_size, mesh):
  """The step's batch: image float32 [B, H, W, D, 4], one-hot label uint8 [B, H, W, D, C]."""
  shape = build.input_shape(config, global_batch_size)
  label_shape = shape[:-1] + (config.model.num_classes,)
  sharding = parallel.batch_sharding(mesh)
  return {'image': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding),
          'label': jax.ShapeDtypeStruct(label_shape, layouts.TRAIN_LABEL_DTYPE,
                                        sharding=sharding)}


def cache_keys(config, mesh, steps_per_epoch, global_batch_size=None):
  """{'init', 'shapes', 'state', 'step'}: the executable-cache keys of this run's programs,
  the state's shapes and its initial values (None where the cache is off; 'step' also None
  without a batch size)."""
  devices = list(mesh.devices.flat)
  fingerprint = {'config': json.loads(config.to_json_best_effort(sort_keys=True)),
                 'mesh': [list(mesh.axis_names), list(mesh.devices.shape)],
                 'steps_per_epoch': int(steps_per_epoch)}
  step = None
  if global_batch_size is not None:
    step = executable_cache.key('train_step', dict(fingerprint, batch=int(global_batch_size)),
                                devices)
  return {'init': executable_cache.key('init', fingerprint, devices),
          'shapes': executable_cache.key('state_shapes', fingerprint, devices),
          'state': executable_cache.key('initial_state', fingerprint, devices), 'step': step}


def has_initial_state(config, mesh, steps_per_epoch):
  """Whether the executable cache holds this run's initial state (see ``create_state``)."""
  return executable_cache.has(cache_keys(config, mesh, steps_per_epoch)['state'])


def prefetch_step(config, mesh, steps_per_epoch, global_batch_size):
  """Starts loading the cached training step in a thread; ``compile_train_step`` then waits
  for it. (One load at a time: two deserialisations side by side on a busy 2-core machine
  took longer than one after the other.)"""
  entry = cache_keys(config, mesh, steps_per_epoch, global_batch_size)['step']
  executable_cache.prefetch(entry, list(mesh.devices.flat))


def abstract_state(config, mesh, steps_per_epoch):
  """``build.abstract_state`` (shapes and dtypes of the train state), kept in the executable
  cache: a warm start reads it instead of tracing both networks."""
  entry = cache_keys(config, mesh, steps_per_epoch)['shapes']
  kept = executable_cache.load_value(entry)
  if kept is not None:
    treedef, leaves = kept
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
  abstract = build.abstract_state(config, steps_per_epoch)
  leaves, treedef = jax.tree.flatten(abstract)
  executable_cache.store_value(entry, (treedef, [(x.shape, str(x.dtype)) for x in leaves]))
  return abstract


def create_state(config, mesh, steps_per_epoch, shardings=None, after_load=None):
  """A fresh TrainState placed on the mesh (replicated unless ``shardings`` say otherwise).

  One process: initialised by one program whose outputs already have ``shardings`` (no host
  copy: the state of the full-size model is 3.5 GiB). Several processes: initialised on one
  device of each, brought to the host and copied to the devices, so that every process
  computes the same values from ``config.seed`` and keeps only the pieces its devices hold.
  jax.random's values do not depend on how an array is sharded, so both give the same state.
  The program comes from the executable cache or the persistent compilation cache when an
  earlier run compiled it (logged: compiled or loaded, and how long); a small state it made
  before is read from the executable cache instead (the same values). ``after_load()``, when
  given, is called once the program or the state is there (the training loop starts loading
  its step then).
  """
  usual = state_shardings(config, mesh, abstract_state(config, mesh, steps_per_epoch))
  shardings = usual if shardings is None else shardings
  rng = jax.random.key(config.seed)
  single = jax.process_count() == 1
  keys = cache_keys(config, mesh, steps_per_epoch)
  if not single or repr(jax.tree.leaves(shardings)) != repr(jax.tree.leaves(usual)):
    keys = {}   # not the program the keys describe
  with compile_cache.timed('the initialisation program', log=False) as tally:
    state = _kept_state(keys.get('state'), shardings)
  if state is not None:
    logging.info('the initialisation program: not run (the initial state read from the '
                 'executable cache in %.2f s)', tally.wall_s)
    if after_load is not None:
      after_load()
    return state
  lower = lambda: jax.jit(build.init_function(config, steps_per_epoch),
                          out_shardings=shardings if single else None).lower(rng)
  with compile_cache.timed('the initialisation program'):
    compiled = executable_cache.obtain(keys.get('init'), list(mesh.devices.flat), lower,
                                       compiler_options=build.INIT_COMPILER_OPTIONS)
  if after_load is not None:
    after_load()
  if not single:
    return parallel.host_to_global(jax.device_get(compiled(rng)), shardings)
  state = compiled(rng)
  _keep_state(keys.get('state'), state)
  return state


def _kept_state(entry, shardings):
  """The initial state kept under ``entry``, placed with ``shardings``; None if none."""
  kept = executable_cache.load_value(entry)
  if kept is None:
    return None
  treedef, leaves = kept
  return jax.tree.unflatten(treedef, [jax.device_put(x, s) for x, s in
                                      zip(leaves, jax.tree.leaves(shardings))])


def _keep_state(entry, state):
  """Keeps an initial state of at most ``STATE_LIMIT_BYTES`` (the CPU configs') under
  ``entry``: the same values, read instead of loading and running the program next time."""
  leaves, treedef = jax.tree.flatten(state)
  if entry is None or sum(x.nbytes for x in leaves) > STATE_LIMIT_BYTES:
    return
  executable_cache.store_value(entry, (treedef, [np.asarray(x) for x in jax.device_get(leaves)]))


# Compiled steps of this process, by (config, devices, steps per epoch, batch, shardings): a
# second train_loop in the same process (tests, notebooks) does not compile again.
_COMPILED = {}


def compile_train_step(config, mesh, steps_per_epoch, abstract, global_batch_size,
                       shardings=None):
  """The training step for these shapes and shardings: loaded from the executable cache, or
  lowered and compiled ahead of time (and kept there).

  The state is donated; the batch is sharded over ``data``; the key and the metrics are
  replicated. Returns the compiled executable: call it as
  ``compiled(state, batch, rng) -> (state, metrics)``.
  """
  if shardings is None:
    shardings = state_shardings(config, mesh, abstract)
  key = (config.to_json_best_effort(sort_keys=True), tuple(d.id for d in mesh.devices.flat),
         int(steps_per_epoch), int(global_batch_size), repr(jax.tree.leaves(shardings)))
  if key in _COMPILED:
    return _COMPILED[key]
  rep = parallel.replicated(mesh)

  def lower():
    fn = jax.jit(functools.partial(step_lib.train_step, config=config,
                                   steps_per_epoch=steps_per_epoch),
                 in_shardings=(shardings, parallel.batch_sharding(mesh), rep),
                 out_shardings=(shardings, rep), donate_argnums=(0,))
    state_struct = ckpt.abstract_like(abstract, shardings)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    return fn.lower(state_struct, batch_struct(config, global_batch_size, mesh), rng)

  entry = cache_keys(config, mesh, steps_per_epoch, global_batch_size)['step']
  if repr(jax.tree.leaves(shardings)) != repr(jax.tree.leaves(
      state_shardings(config, mesh, abstract))):
    entry = None   # shardings of the caller's own: not what the key describes
  compiled = executable_cache.obtain(entry, list(mesh.devices.flat), lower)
  _COMPILED[key] = compiled
  return compiled
