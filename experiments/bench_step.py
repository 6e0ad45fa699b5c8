"""Benchmark of the full training step (teacher, student, every loss, discriminator).

  python experiments/bench_step.py --config=configs/brats.py:tiny --steps 5
  python experiments/bench_step.py --config=configs/brats.py --params_only
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python experiments/bench_step.py --config=configs/brats.py:tiny
  python experiments/bench_step.py --config=configs/brats.py --config.dtype=bfloat16 \
      --config.remat=True --compile_only

Compiles the real step ahead of time for a global batch of batch_size_per_device x devices
(every local device, or --devices of them), times --steps steps after --warmup on random data,
and prints one JSON object as its last line. ``--compile_only`` stops after compiling and
reports the compiled program's memory (``compiled.memory_analysis()``: arguments, outputs,
temporaries; per device), which is how full-size memory is measured on a machine without the
accelerator. The same script runs unchanged on GPUs. Programs come from the persistent
compilation cache when an earlier run compiled them (``compile`` says which;
``MSTKD_COMPILE_CACHE=0`` measures a cold compile).
"""

import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mstkd_jax import compile_cache, host_memory, parallel, step as step_lib, train  # noqa: E402
from mstkd_jax.models import build  # noqa: E402
from mstkd_jax.logging_utils import memory_dict  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'config file[:variant]', lock_config=True)
flags.DEFINE_integer('steps', 5, 'timed steps')
flags.DEFINE_integer('warmup', 1, 'untimed steps after compilation')
flags.DEFINE_bool('params_only', False, 'only count parameters (jax.eval_shape, no compute; '
                  'with --residuals, also the saved activations)')
flags.DEFINE_bool('compile_only', False, 'stop after compiling; report compiled memory')
flags.DEFINE_integer('devices', None, 'use the first N devices (default: all)')
flags.DEFINE_enum('mode', 'train', ['train', 'infer'],
                  'train: the training step; infer: one network\'s evaluation forward pass '
                  '(what prediction runs), batch 1')
flags.DEFINE_bool('residuals', False, 'also report the activations saved for the backward pass '
                  '(compiler-independent: what remat and bf16 act on)')
flags.mark_flag_as_required('config')


def main(argv):
  del argv
  config = FLAGS.config
  compile_cache.enable()
  if FLAGS.mode == 'infer':
    print(json.dumps(bench_forward(config)))
    return
  steps_per_epoch = 100
  abstract = build.abstract_state(config, steps_per_epoch)
  result = {
      'shape': list(config.data.input_shape),
      'devices': jax.device_count(),
      'device_kind': jax.devices()[0].device_kind,
      'backend': jax.default_backend(),
      'jax': jax.__version__,
      'dtype': config.dtype,
      'remat': bool(config.remat),
      'params': {'teacher': build.count_params(abstract.params['teacher']),
                 'student': build.count_params(abstract.params['student']),
                 'discriminator': build.count_params(abstract.disc_params)},
  }
  if FLAGS.residuals:
    result['residuals'] = saved_residuals(config, abstract)
  if FLAGS.params_only:
    print(json.dumps(result))
    return
  devices = jax.devices()[:FLAGS.devices] if FLAGS.devices else jax.devices()
  mesh = parallel.make_mesh(devices)
  global_bs = config.train.batch_size_per_device * mesh.size
  result.update(devices=mesh.size, global_batch=global_bs,
                shard_state=bool(config.train.get('shard_state', False)))
  if not FLAGS.compile_only:
    # As training does: the state first, then the step (each followed by a trim of the host
    # heap), so that the compiler's freed memory is not counted on top of the state.
    state = train.create_state(config, mesh, steps_per_epoch)
    host_memory.trim()
  t0 = time.time()
  with compile_cache.timed('the training step') as tally:
    compiled = train.compile_train_step(config, mesh, steps_per_epoch, abstract, global_bs)
  result['compile_s'] = round(time.time() - t0, 2)
  result['compile'] = tally.text
  result['compile_cache'] = compile_cache.directory()
  host_memory.trim()
  result['memory'] = memory_dict(compiled)
  if result['memory']:
    m = result['memory']
    result['memory_gib'] = {
        'arguments': round(m['argument_bytes'] / 2**30, 3),
        'outputs': round(m['output_bytes'] / 2**30, 3),
        'temporaries': round(m['temp_bytes'] / 2**30, 3),
        # Donated state: outputs reuse the argument buffers (alias).
        'total_estimate': round((m['argument_bytes'] + m['output_bytes'] - m['alias_bytes']
                                 + m['temp_bytes']) / 2**30, 3)}
  if FLAGS.compile_only:
    _add_host_rss(result)
    print(json.dumps(result))
    return
  batches = train.random_batches(config, global_bs)
  batch = parallel.global_batch(next(batches), mesh)
  rng = parallel.replicated_key(0, mesh)
  for _ in range(FLAGS.warmup):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  result.update(sec_per_step_median=round(med, 4), sec_per_step_min=round(min(times), 4),
                volumes_per_s=round(global_bs / med, 3),
                loss=float(metrics['total']))
  try:
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
      result['peak_device_bytes'] = int(stats['peak_bytes_in_use'])
  except Exception:
    pass
  _add_host_rss(result)
  print(json.dumps(result))


def bench_forward(config):
  """Compile and time one network's evaluation forward pass (sigmoid probabilities)."""
  import jax.numpy as jnp
  from mstkd_jax.models.mstkdnet import network_from_config
  net = network_from_config(config)
  x = jnp.asarray(np.random.RandomState(0).rand(*build.input_shape(config)), jnp.float32)
  variables = jax.jit(lambda k: net.init({'params': k, 'dropout': k}, x, train=False))(
      jax.random.key(config.seed))
  host_memory.trim()
  forward = jax.jit(functools.partial(build.predict_probs, config=config))
  t0 = time.time()
  with compile_cache.timed('the evaluation forward pass') as tally:
    compiled = forward.lower(variables['params'], variables['batch_stats'], x).compile()
  host_memory.trim()
  result = {'mode': 'infer', 'shape': list(config.data.input_shape), 'dtype': config.dtype,
            'backend': jax.default_backend(), 'jax': jax.__version__,
            'compile_s': round(time.time() - t0, 2), 'compile': tally.text,
            'compile_cache': compile_cache.directory()}
  jax.block_until_ready(compiled(variables['params'], variables['batch_stats'], x))
  times = []
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(variables['params'], variables['batch_stats'], x))
    times.append(time.perf_counter() - t0)
  result.update(sec_per_forward_median=round(float(np.median(times)), 4),
                sec_per_forward_min=round(min(times), 4), forwards=FLAGS.steps)
  _add_host_rss(result)
  return result


def saved_residuals(config, abstract):
  """Bytes the teacher + student forward keeps for the backward pass, per device (batch
  batch_size_per_device), from the shapes of jax.vjp's residuals (no compilation): what
  ``config.remat`` and ``config.dtype`` change, whatever a compiler then does with it.
  The parameters, which the residuals also reference, are counted apart."""
  import jax.numpy as jnp
  n = config.train.batch_size_per_device
  image = jax.ShapeDtypeStruct(build.input_shape(config, n), jnp.float32)
  label = jax.ShapeDtypeStruct(build.input_shape(config, n)[:-1] +
                               (config.model.num_classes,), jnp.float32)
  keys = (jax.random.key(1), jax.random.key(2))

  def residuals(params, batch_stats, disc_params, image, label):
    objective = functools.partial(step_lib.network_objective, batch_stats=batch_stats,
                                  disc_params=disc_params, image=image, image_m=image,
                                  label=label, keys=keys, epoch=0, config=config)
    return jax.vjp(lambda p: objective(p)[0], params)[1]

  res = jax.eval_shape(residuals, abstract.params, abstract.batch_stats, abstract.disc_params,
                       image, label)
  param_shapes = {(tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(abstract.params)}
  total, activations, by_dtype = 0, 0, {}
  for x in jax.tree.leaves(res):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      continue   # dropout keys saved by remat: a few bytes
    size = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    total += size
    if (tuple(x.shape), str(x.dtype)) not in param_shapes:
      activations += size
      by_dtype[str(x.dtype)] = by_dtype.get(str(x.dtype), 0) + size
  gib = lambda b: round(b / 2**30, 3)
  return {'total_gib': gib(total), 'activations_gib': gib(activations),
          'activations_by_dtype_gib': {k: gib(v) for k, v in sorted(by_dtype.items())},
          'count': len(jax.tree.leaves(res))}


def _add_host_rss(result):
  try:
    import resource
    result['peak_host_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  except Exception:  # pylint: disable=broad-except
    pass


if __name__ == '__main__':
  from mstkd_jax.cli import underscore_flags
  app.run(main, argv=underscore_flags(sys.argv))
