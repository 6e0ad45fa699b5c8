"""Networks and train state from a config: what training, evaluation and checkpoints share.

  network_from_config / discriminator_from_config   the Flax modules
  input_shape                                       (N, H, W, D, 4) of a config
  TrainState, init_state, abstract_state            the train state, fresh or as shapes only
  init_function                                     init_state bound to a config (traced once)
  network_struct                                    one network's {'params', 'batch_stats'}
                                                    shapes (an Orbax restore target)
  network_variables                                 one network's variables out of a TrainState
  predict_probs                                     the evaluation forward pass
  count_params

To add another network: a module under models/ with the same outputs (``NetworkOutputs``),
chosen here from the config.
"""

import contextlib
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mstkd_jax import optim
from mstkd_jax.models.discriminator import StyleDiscriminator
from mstkd_jax.models.mstkdnet import network_from_config

__all__ = ['TrainState', 'network_from_config', 'discriminator_from_config', 'input_shape',
           'init_state', 'init_function', 'abstract_state', 'network_struct', 'network_variables',
           'predict_probs', 'count_params']


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree.

  params / batch_stats: {'teacher': ..., 'student': ...}; opt_state: the networks' Adam;
  disc_params / disc_opt_state: the style discriminator and its own Adam.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any


def discriminator_from_config(config):
  return StyleDiscriminator(tuple(config.discriminator.channels))


def input_shape(config, batch=1):
  return (batch,) + tuple(config.data.input_shape) + (config.model.in_channels,)


def _initialisation_rng():
  """The random-bit generator of parameter initialisation: threefry in its non-partitionable
  form, which XLA:CPU compiles 8-10x faster (the initialisation program of the tiny config:
  21-26 s against 47-65 s; experiments/RESULTS_speed.md). The state is built once per run, so
  the partitionable form buys little there; dropout in the step keeps jax's default."""
  switch = getattr(jax, 'threefry_partitionable', None)
  return switch(False) if switch is not None else contextlib.nullcontext()


# XLA options for compiling the initialisation program. Its compile time grows with the number
# of parameter arrays (each draws its own random numbers), not with their size, and it runs
# once: LLVM's -O1 instead of -O3 compiles it about a fifth faster (tiny config 28 s against
# 38 s, full size 151 s against 192 s on a loaded 2-core machine) and gives bit-identical
# weights on the CPU (tests/test_init.py); it does not slow the run (experiments/RESULTS_speed.md,
# section 7). -O0 would halve the compile but changes the weights in the last bits.
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


def init_state(config, rng, steps_per_epoch) -> TrainState:
  """Fresh parameters for teacher, student and discriminator (run it under jax.jit)."""
  with _initialisation_rng():
    net = network_from_config(config)
    disc = discriminator_from_config(config)
    k_t, k_s, k_d = jax.random.split(rng, 3)
    x = jnp.zeros(input_shape(config), jnp.float32)
    v_t = net.init({'params': k_t, 'dropout': k_t}, x, train=False)
    v_s = net.init({'params': k_s, 'dropout': k_s}, x, train=False)
    style = jax.eval_shape(lambda v: net.apply(v, x, train=False).style, v_t)
    d_params = disc.init(k_d, jnp.zeros(style.shape, jnp.float32))
    params = {'teacher': v_t['params'], 'student': v_s['params']}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats={'teacher': v_t['batch_stats'], 'student': v_s['batch_stats']},
        opt_state=optim.network_optimizer(config, steps_per_epoch).init(params),
        disc_params=d_params,
        disc_opt_state=optim.discriminator_optimizer(config).init(d_params))


# One bound initialisation per (config, steps per epoch) in this process; see init_function.
_INIT_FUNCTIONS = {}


def init_function(config, steps_per_epoch):
  """``init_state`` with ``config`` and ``steps_per_epoch`` bound: ``fn(rng) -> TrainState``.

  The same object for the same config: jax caches a function's trace by the function object,
  so ``abstract_state`` (eval_shape) and the jitted initialisation share one trace of the
  networks (seconds on a CPU) instead of tracing them twice.
  """
  key = (config.to_json_best_effort(sort_keys=True), int(steps_per_epoch))
  if key not in _INIT_FUNCTIONS:
    _INIT_FUNCTIONS[key] = functools.partial(init_state, config,
                                             steps_per_epoch=int(steps_per_epoch))
  return _INIT_FUNCTIONS[key]


def abstract_state(config, steps_per_epoch=1) -> TrainState:
  """Shapes and dtypes of the state, without computing anything (``steps_per_epoch`` only
  enters the learning-rate schedule, not the shapes)."""
  return jax.eval_shape(init_function(config, steps_per_epoch), jax.random.key(0))


def network_struct(config):
  """Shapes of one network's {'params', 'batch_stats'} for ``config`` (no compute)."""
  net = network_from_config(config)
  x = jax.ShapeDtypeStruct(input_shape(config), jnp.float32)
  return jax.eval_shape(lambda x: net.init({'params': jax.random.key(0),
                                            'dropout': jax.random.key(0)}, x, train=False), x)


def network_variables(state: TrainState, network='student'):
  """{'params', 'batch_stats'} of 'student' or 'teacher' from a TrainState."""
  return {'params': state.params[network], 'batch_stats': state.batch_stats[network]}


def predict_probs(params, batch_stats, image, *, config):
  """Evaluation forward of one network: sigmoid probabilities (N, H, W, D, C)."""
  net = network_from_config(config)
  return net.apply({'params': params, 'batch_stats': batch_stats}, image, train=False).probs


def count_params(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
