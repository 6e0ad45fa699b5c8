"""Benchmark of the full training step (teacher, student, every loss, discriminator).

  python experiments/bench_step.py --config=configs/brats.py:tiny --steps 5
  python experiments/bench_step.py --config=configs/brats.py --params-only
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python experiments/bench_step.py --config=configs/brats.py:tiny

Compiles the real step ahead of time for a global batch of batch_size_per_device x devices,
times --steps steps after --warmup on random data, and prints one JSON object as its last line.
The same script runs unchanged on GPUs.
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

from mstkd_jax import parallel, step as step_lib, train  # noqa: E402
from mstkd_jax.logging_utils import memory_dict  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'config file[:variant]', lock_config=True)
flags.DEFINE_integer('steps', 5, 'timed steps')
flags.DEFINE_integer('warmup', 1, 'untimed steps after compilation')
flags.DEFINE_bool('params_only', False, 'only count parameters (jax.eval_shape, no compute)')
flags.mark_flag_as_required('config')


def main(argv):
  del argv
  config = FLAGS.config
  spe = 100
  abstract = step_lib.abstract_state(config, spe)
  result = {
      'shape': list(config.data.input_shape),
      'devices': jax.device_count(),
      'device_kind': jax.devices()[0].device_kind,
      'backend': jax.default_backend(),
      'jax': jax.__version__,
      'dtype': config.dtype,
      'remat': bool(config.remat),
      'params': {'teacher': step_lib.count_params(abstract.params['teacher']),
                 'student': step_lib.count_params(abstract.params['student']),
                 'discriminator': step_lib.count_params(abstract.disc_params)},
  }
  if FLAGS.params_only:
    print(json.dumps(result))
    return
  mesh = parallel.make_mesh()
  global_bs = config.train.batch_size_per_device * jax.device_count()
  result['global_batch'] = global_bs
  t0 = time.time()
  compiled = train.compile_train_step(config, mesh, spe, abstract, global_bs)
  result['compile_s'] = round(time.time() - t0, 2)
  result['memory'] = memory_dict(compiled)
  state = train.create_state(config, mesh, spe)
  batches = train.random_batches(config, global_bs)
  batch = parallel.global_batch(next(batches), mesh)
  rng = jax.device_put(jax.random.key(0), parallel.replicated(mesh))
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
  try:
    import resource
    result['peak_host_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  except Exception:
    pass
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
