r"""Input-pipeline throughput: cold (decoding .nii.gz into the cache) and cached epochs.

  python experiments/bench_data.py --root data/brats2018 --workers 2
  taskset -c 0 python experiments/bench_data.py --synthetic 4 --workers 1 --epochs 6

Prints one JSON object: for the first epoch the cache build (decode, check, scale, crop, write)
and the first pass of the training pipeline over it, then cases (training volumes) per second
for every later, cached epoch (random crop, flips, intensity scale/shift, one-hot labels,
batching, worker processes). The cache goes to a fresh temporary workdir unless --workdir is
given (then a second run is cached from the start). ``--synthetic N`` writes N synthetic
full-size cases (240x240x155, 1 mm) into the workdir instead of reading ``--root``.

Besides wall-clock rates it reports the CPU time the cached epochs cost (this process, its
threads and its worker processes: ``cpu_s``) and ``cases_per_cpu_s``, the volumes one fully
used core delivers: on a shared machine the wall-clock rate depends on what else runs, the CPU
time much less. One GPU at T seconds per step and B volumes per step needs B / T volumes/s,
i.e. (B / T) / cases_per_cpu_s cores (docs/scaling.md).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import brats  # pylint: disable=g-import-not-at-top,wrong-import-position
from mstkd_jax.data import pipeline, synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position


def cpu_seconds():
  """User + system CPU seconds of this process (all threads) and its live worker processes."""
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:
      pass
  return total


def cache_workers_arg(args):
  return args.workers if args.cache_workers is None else args.cache_workers


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--root', help='folder of case folders')
  p.add_argument('--synthetic', type=int, default=0,
                 help='instead of --root: this many synthetic 240x240x155 cases')
  p.add_argument('--layout', default='auto')
  p.add_argument('--workers', type=int, default=2, help='parallel batch builders')
  p.add_argument('--worker_kind', default='threads', choices=('threads', 'processes'))
  p.add_argument('--threads', type=int, default=None,
                 help='override: threads building batches in the main process')
  p.add_argument('--touch', action='store_true',
                 help='copy every batch in the main process, as a host-to-device put would')
  p.add_argument('--cache_workers', type=int, default=None,
                 help='processes building the cache (default: --workers)')
  p.add_argument('--epochs', type=int, default=3, help='epochs in all (first one cold)')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--input_shape', type=int, nargs=3, default=(160, 192, 128))
  p.add_argument('--normalization', default='minmax')
  p.add_argument('--spacing', type=float, default=None)
  p.add_argument('--rotation_prob', type=float, default=0.0)
  p.add_argument('--workdir', default=None, help='default: a temporary folder, removed after')
  args = p.parse_args(argv)
  if bool(args.root) == bool(args.synthetic):
    p.error('give --root or --synthetic N')

  config = brats.get_config()
  d = config.data
  d.root = args.root
  d.layout = args.layout
  d.input_shape = tuple(args.input_shape)
  d.normalization = args.normalization
  d.spacing = args.spacing
  d.rotation_prob = args.rotation_prob
  d.workers = args.workers
  d.worker_kind = args.worker_kind
  d.split = (1.0, 0.0, 0.0)      # every case is a training case
  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_data_')
  if args.synthetic:
    d.root = os.path.join(workdir, 'synthetic_full_size')
    synthetic.generate_dataset(d.root, args.synthetic, shape=(240, 240, 155), layout='brats2021',
                               workers=cache_workers_arg(args))
  cache_workers = cache_workers_arg(args)
  result = {'load_average_before': [round(v, 2) for v in os.getloadavg()],
            'command': ' '.join(['python', 'experiments/bench_data.py'] + sys.argv[1:]),
            'workers': args.workers, 'worker_kind': args.worker_kind, 'threads': args.threads, 'touch': args.touch,
            'batch': args.batch,
            'input_shape': list(args.input_shape), 'cpus': os.cpu_count()}
  try:
    t0 = time.perf_counter()
    prep = pipeline.prepare(config, workdir, workers=cache_workers, progress=False)
    build_s = time.perf_counter() - t0
    loader = pipeline.make_train_loader(prep, args.batch, seed=0, threads=args.threads)
    n = len(loader.case_ids)
    steps = max(1, n // args.batch)
    result.update(cases=n, skipped=len(prep.skipped), steps_per_epoch=steps)
    epochs = []
    cpu_start = None
    for epoch in range(args.epochs):
      if epoch == 1:
        cpu_start = cpu_seconds()
      t = time.perf_counter()
      for _ in range(steps):
        batch = next(loader)
        assert batch['image'].shape[0] == args.batch
        if args.touch:
          for v in batch.values():   # read every byte of the batch once
            np.array(v)
        del batch
      epochs.append(time.perf_counter() - t)
    cpu_s = cpu_seconds() - cpu_start if cpu_start is not None else None
    loader.close()
    cold_s = build_s + epochs[0]
    result['cold'] = {'cache_build_s': round(build_s, 2),
                      'first_epoch_s': round(epochs[0], 2),
                      'cases_per_s': round(steps * args.batch / cold_s, 2),
                      'cache_build_cases_per_s': round(n / build_s, 2)}
    cached = [steps * args.batch / e for e in epochs[1:]]
    result['cached_epochs_cases_per_s'] = [round(v, 2) for v in cached]
    if cached:
      result['cached_cases_per_s'] = round(
          (len(cached) * steps * args.batch) / sum(epochs[1:]), 2)
      result['cpu_s'] = round(cpu_s, 2)
      result['cases_per_cpu_s'] = round((len(cached) * steps * args.batch) / cpu_s, 2)
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  result['load_average_after'] = [round(v, 2) for v in os.getloadavg()]
  print(json.dumps(result, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
