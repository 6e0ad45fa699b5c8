r"""What verifying the preprocessing cache's checksums costs (docs/data.md, "Cache").

  python experiments/bench_cache_verify.py --root data/brats2018 --config cpu_real
  python experiments/bench_cache_verify.py --root data/brats2018 --config brats --workdir W

Builds (or reuses, with ``--workdir``) the cache of every case under ``--root`` for the config's
preprocessing, then times ``cache.verify_entries`` over all entries as a command does once per
process at start-up: cold (each cache file evicted from the page cache first, with
``posix_fadvise(DONTNEED)``, so the bytes come from the disk) and warm (from the page cache),
``--repeats`` times each, and CRC-32 alone over bytes in memory. Prints one JSON object: cases,
bytes, seconds per run, per case and per GB.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mstkd_jax import configs  # pylint: disable=wrong-import-position
from mstkd_jax.data import cache, pipeline  # pylint: disable=wrong-import-position


def evict(paths):
  """Drops the files' pages from the page cache (their next read comes from the disk)."""
  for path in paths:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def timed_verify(entries):
  cache._VERIFIED.clear()   # pylint: disable=protected-access  (as in a new process)
  start = time.perf_counter()
  problems = cache.verify_entries(entries)
  seconds = time.perf_counter() - start
  assert not problems, problems
  return seconds


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--root', required=True, help='folder of case folders')
  p.add_argument('--config', default='cpu_real', help='a packaged config name (its data part)')
  p.add_argument('--workdir', default=None, help='default: a temporary folder, removed after')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--workers', type=int, default=2, help='processes building the cache')
  args = p.parse_args(argv)

  config = configs.load(args.config)
  config.data.root = args.root
  config.data.split = (1.0, 0.0, 0.0)
  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_verify_')
  result = {'command': ' '.join(['python', 'experiments/bench_cache_verify.py'] + sys.argv[1:]),
            'config': args.config, 'input_shape': list(config.data.input_shape),
            'spacing': config.data.spacing, 'cpus': os.cpu_count(),
            'load_average_before': [round(v, 2) for v in os.getloadavg()]}
  try:
    start = time.perf_counter()
    dataset = pipeline.prepare(config, workdir, workers=args.workers, progress=False)
    result['cache_build_s'] = round(time.perf_counter() - start, 1)
    entries = dataset.entries
    files = [os.path.join(e, n) for e in entries.values() for n in cache.ARRAY_FILES]
    size = sum(os.path.getsize(f) for f in files)
    result.update(cases=len(entries), bytes=size, mb_per_case=round(size / 1e6 / len(entries), 1))
    cold, warm = [], []
    for _ in range(args.repeats):
      evict(files)
      cold.append(timed_verify(entries))
      warm.append(timed_verify(entries))
    block = np.random.RandomState(0).bytes(256 << 20)
    start = time.perf_counter()
    zlib.crc32(block)
    crc_gb_s = len(block) / 1e9 / (time.perf_counter() - start)
    for name, runs in (('cold', cold), ('warm', warm)):
      best = min(runs)
      result[name] = {'runs_s': [round(v, 3) for v in runs],
                      's_per_case': round(best / len(entries), 4),
                      's_per_gb': round(best / (size / 1e9), 3)}
    result['crc32_in_memory_gb_per_s'] = round(crc_gb_s, 2)
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  result['load_average_after'] = [round(v, 2) for v in os.getloadavg()]
  print(json.dumps(result, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
