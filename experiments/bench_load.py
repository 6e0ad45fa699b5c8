r"""How long a compiled training step takes to load, and what XLA has to rebuild to load it.

  python experiments/bench_load.py --config=configs/brats.py:tiny --cache /tmp/load_cache
  perf record -F 200 -g -o load.perf -- \
      python experiments/bench_load.py --config=configs/brats.py:tiny --cache /tmp/load_cache
  perf report -i load.perf --children --sort symbol      # where the load's time goes

The first run compiles the step (``programs.compile_train_step``) into the executable cache
under ``--cache`` (as ``$MSTKD_CACHE_DIR``); every run then loads it from there ``--loads``
times in this process (``jax.experimental.serialize_executable``: the deserialisation a warm
start pays) and prints one JSON line: seconds per load, the entry's size, and the size of the
program XLA rebuilds when loading (instructions, computations, fusions, YNNPACK fusions,
oneDNN custom calls, from the compiled HLO).
"""

import collections
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'config file[:variant]', lock_config=True)
flags.DEFINE_string('cache', None, 'cache root ($MSTKD_CACHE_DIR) of the executable cache')
flags.DEFINE_integer('loads', 3, 'timed loads')
flags.mark_flags_as_required(['config', 'cache'])


def program_counts(text):
  """Instructions, computations and fusions of a compiled program's HLO text."""
  calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
  return {'hlo_chars': len(text),
          'instructions': len(re.findall(r'^\s+(?:ROOT )?%?\S+ = ', text, re.M)),
          'computations': len(re.findall(r'^(?:ENTRY )?%?[\w.\-]+ .*\{$', text, re.M)),
          'loop_fusions': text.count('kind=kLoop'),
          'ynn_fusions': text.count('"kind":"__ynn_fusion"'),
          'onednn_calls': sum(v for k, v in calls.items() if k.startswith('mstkd_conv3d'))}


def main(argv):
  del argv
  os.environ['MSTKD_CACHE_DIR'] = FLAGS.cache
  import jax  # pylint: disable=import-outside-toplevel
  # pylint: disable=import-outside-toplevel  (after MSTKD_CACHE_DIR is set)
  from mstkd_jax import compile_cache, executable_cache, parallel, programs
  compile_cache.enable()
  config = FLAGS.config
  mesh = parallel.make_mesh(jax.devices()[:1])
  keys = programs.cache_keys(config, mesh, 10, 1)
  devices = list(mesh.devices.flat)
  t0 = time.perf_counter()
  abstract = programs.abstract_state(config, mesh, 10)
  compiled = programs.compile_train_step(config, mesh, 10, abstract, 1)
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(FLAGS.loads):
    t0 = time.perf_counter()
    loaded = executable_cache.load(keys['step'], devices)
    times.append(time.perf_counter() - t0)
    if loaded is None:
      raise SystemExit('the step is not in the executable cache (compiled from the '
                       'compilation cache?); use an empty --cache')
  path = os.path.join(executable_cache.folder(), keys['step'] + '.pkl')
  print(json.dumps({'shape': list(config.data.input_shape), 'backend': jax.default_backend(),
                    'first_obtain_s': round(first_s, 2),
                    'load_s': [round(t, 2) for t in times],
                    'entry_mib': round(os.path.getsize(path) / 2**20, 1),
                    'load': [round(v, 2) for v in os.getloadavg()],
                    **program_counts(compiled.as_text())}))


if __name__ == '__main__':
  app.run(main)
