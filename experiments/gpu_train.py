"""What a user's run costs on a GPU, as JSON lines: a training epoch end to end, and a short
real training run that is brought back.

  python experiments/gpu_train.py --cases epoch,cpu_real --data .gpu_data/brats2018_2mm \
      --out-dir $OUT                                   # GPU, ~6 min
  python experiments/gpu_train.py --smoke --out-dir /tmp/gpu_train_smoke   # CPU, tiny sizes

Cases (each runs the real command, ``python -m mstkd_jax.main``, in a subprocess):

  epoch     one training epoch of ``configs/brats.py`` at full size from the real input
            pipeline: ``--epoch-cases`` synthetic cases of 240x240x155 written as NIfTI
            (``mstkd_jax.data.synthetic``, 70 % of them for training), the cache built,
            augmentation on (the config's flips and intensity changes), ``--workers`` grain
            workers, validation on the validation cases at the end of the epoch, then the
            test split's 15-subset evaluation. From ``metrics.jsonl``: the training steps' own
            rate (``steps_per_s`` as logged: the step with the pipeline feeding it) and the
            epoch end to end (first logged step to the end of validation: steps, input
            pipeline, validation), in volumes per second; compare with gpu_check.py's bare
            step (``step_bf16`` / ``step_f32``) on the same device.
  cpu_real  ``configs/cpu_real.py`` trained on real cases (``--data``: for a machine that takes
            little data, the compact copy made by ``experiments/compact_cases.py``, 2 mm, as
            the recipe trains at 2 mm) for ``--train-s`` seconds of training (stopped by
            SIGTERM, which saves a checkpoint), exported (student and teacher, a few MB) and
            evaluated over the 15 subsets on the split's test cases. The export (as
            ``export.tar.gz``), the log, the table and ``metrics.jsonl`` are copied into
            ``--out-dir/cpu_real`` (to commit them under experiments/results/).

``--smoke`` runs both on the CPU at ``configs/brats.py:tiny`` / ``cpu_real`` with tiny
synthetic data and a few seconds of training (the test suite does, so the script cannot rot).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _emit(record, out_dir):
  line = json.dumps(record)
  print(line, flush=True)
  if out_dir:
    with open(os.path.join(out_dir, 'gpu_train.jsonl'), 'a') as f:
      f.write(line + '\n')


def _main_command(config, workdir, *overrides, mode='train'):
  return [sys.executable, '-m', 'mstkd_jax.main', f'--config={config}', f'--workdir={workdir}',
          f'--mode={mode}', *overrides]


def _run(command, log_path, timeout, stop_after_s=None, started_marker=None):
  """Runs ``command`` with its output in ``log_path``; with ``stop_after_s``, sends SIGTERM
  that many seconds after ``started_marker`` (a file) appears. Returns (status, seconds)."""
  t0 = time.time()
  with open(log_path, 'a') as log:
    log.write('$ ' + ' '.join(command) + '\n')
    log.flush()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    started = None
    while proc.poll() is None:
      time.sleep(0.5)
      now = time.time()
      if now - t0 > timeout:
        proc.kill()
        proc.wait()
        return 'timeout', now - t0
      if stop_after_s is not None and started is None and os.path.exists(started_marker):
        started = now
      if started is not None and now - started > stop_after_s:
        proc.send_signal(signal.SIGTERM)
        started = stop_after_s = None  # once
  return proc.returncode, time.time() - t0


def _records(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _median(values):
  values = sorted(values)
  return values[len(values) // 2] if values else None


def case_epoch(args, work):
  config = 'configs/brats.py:tiny' if args.smoke else 'configs/brats.py'
  shape = (40, 40, 36) if args.smoke else (240, 240, 155)
  data = os.path.join(work, 'synthetic_full')
  t0 = time.time()
  subprocess.run([sys.executable, '-m', 'mstkd_jax.data.synthetic', '--out', data,
                  '--cases', str(args.epoch_cases), '--shape', *map(str, shape),
                  '--workers', str(args.workers)], cwd=ROOT, check=True,
                 stdout=subprocess.DEVNULL)
  generated = time.time() - t0
  workdir = os.path.join(work, 'epoch')
  overrides = [f'--config.data.root={data}', '--config.train.epochs=1',
               '--config.train.eval_every_epochs=1', '--config.train.log_every=1',
               f'--config.data.workers={args.workers}', f'--config.dtype={args.dtype}']
  log = os.path.join(work, 'epoch.log')
  status, wall = _run(_main_command(config, workdir, *overrides), log, args.case_timeout_s)
  records = _records(workdir)
  train = [r for r in records if 'steps_per_s' in r]
  validation = [r for r in records if any(k.startswith('val') for k in r) and r not in train]
  out = {'case': 'epoch', 'config': config, 'dtype': args.dtype, 'cases': args.epoch_cases,
         'shape': list(shape), 'workers': args.workers, 'status': status,
         'synthetic_s': round(generated, 1), 'command_s': round(wall, 1),
         'steps': len(train)}
  if len(train) >= 2:
    end = validation[-1]['time'] if validation else train[-1]['time']
    span = end - train[0]['time']
    out.update(
        steps_per_s_median=round(_median([r['steps_per_s'] for r in train[1:]]), 3),
        volumes_per_s_median=round(_median([r['volumes_per_s'] for r in train[1:]]), 3),
        epoch_end_to_end_s=round(span, 2),
        volumes_per_s_end_to_end=round((len(train) - 1) / span, 3),
        validation_included=bool(validation))
  if args.out_dir:
    shutil.copy(log, os.path.join(args.out_dir, 'epoch.log'))
  return out


def case_cpu_real(args, work):
  workdir = os.path.join(work, 'cpu_real')
  if args.smoke:
    config, data_flags = 'configs/demo.py', ['--config.data.synthetic_shape=(56,56,52)']
  else:
    config, data_flags = 'configs/cpu_real.py', [f'--config.data.root={os.path.abspath(args.data)}']
  overrides = data_flags + ['--config.train.epochs=100000', '--config.eval.figure=False',
                            f'--config.dtype={args.dtype}']
  log = os.path.join(work, 'cpu_real.log')
  # The first step's record in metrics.jsonl marks the start of training (after compiling).
  marker = os.path.join(workdir, 'metrics.jsonl')
  status, wall = _run(_main_command(config, workdir, *overrides), log, args.case_timeout_s,
                      stop_after_s=args.train_s, started_marker=marker)
  records = _records(workdir)
  steps = max([r['step'] for r in records], default=0)
  span = records[-1]['time'] - records[0]['time'] if len(records) > 1 else None
  out = {'case': 'cpu_real', 'config': config, 'dtype': args.dtype, 'train_status': status,
         'command_s': round(wall, 1), 'train_s': args.train_s, 'steps': steps,
         'logged_span_s': span and round(span, 1)}
  export = os.path.join(workdir, 'export')
  status, _ = _run(_main_command(config, workdir, *overrides, mode='export'), log,
                   args.step_timeout_s)
  out['export_status'] = status
  status, seconds = _run(_main_command(config, workdir, *overrides, f'--checkpoint={export}',
                                       mode='eval'), log, args.step_timeout_s)
  out.update(eval_status=status, eval_s=round(seconds, 1))
  results = os.path.join(workdir, 'eval')
  out['table'] = os.path.join(results, 'table.md') if os.path.exists(
      os.path.join(results, 'table.md')) else None
  if args.out_dir:
    target = os.path.join(args.out_dir, 'cpu_real')
    os.makedirs(target, exist_ok=True)
    if os.path.isdir(export):        # one file: the device machine brings back a few files
      shutil.make_archive(os.path.join(target, 'export'), 'gztar', export)
    shutil.copy(log, os.path.join(target, 'cpu_real.log'))
    for name in ('table.md', 'summary.json', 'per_case.csv'):
      if os.path.exists(os.path.join(results, name)):
        shutil.copy(os.path.join(results, name), os.path.join(target, name))
    if os.path.exists(marker):
      shutil.copy(marker, os.path.join(target, 'metrics.jsonl'))
  return out


CASES = {'epoch': case_epoch, 'cpu_real': case_cpu_real}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cases', default='epoch,cpu_real', help='comma-separated, in order')
  parser.add_argument('--smoke', action='store_true', help='tiny sizes on the CPU')
  parser.add_argument('--data', help='cpu_real: folder of real case folders')
  parser.add_argument('--out-dir', help='JSON lines, logs and the export are copied here')
  parser.add_argument('--work', default=None, help='scratch folder (default: a new one in /tmp)')
  parser.add_argument('--dtype', default='bfloat16', help='the config\'s dtype (default bfloat16)')
  parser.add_argument('--epoch-cases', type=int, default=24,
                      help='epoch: synthetic full-size cases (70 %% train, default 24)')
  parser.add_argument('--workers', type=int, default=16, help='epoch: grain workers (default 16)')
  parser.add_argument('--train-s', type=float, default=240.0,
                      help='cpu_real: seconds of training after the first step (default 240)')
  parser.add_argument('--case-timeout-s', type=float, default=420.0,
                      help='the training command\'s limit, compile included (default 420)')
  parser.add_argument('--step-timeout-s', type=float, default=120.0,
                      help='cpu_real: the export\'s and the evaluation\'s limits (default 120)')
  args = parser.parse_args(argv)
  if args.smoke:
    args.dtype, args.epoch_cases, args.workers = 'float32', 6, 0
    args.train_s = min(args.train_s, 5.0)
  names = [n for n in args.cases.split(',') if n]
  unknown = [n for n in names if n not in CASES]
  if unknown:
    parser.error(f'unknown case(s) {unknown}; known: {sorted(CASES)}')
  if 'cpu_real' in names and not args.smoke and not args.data:
    parser.error('cpu_real needs --data (a folder of case folders)')
  if args.out_dir:
    os.makedirs(args.out_dir, exist_ok=True)
  work = args.work or os.path.join('/tmp', f'gpu_train_{os.getpid()}')
  os.makedirs(work, exist_ok=True)
  failed = False
  for name in names:
    t0 = time.time()
    try:
      record = CASES[name](args, work)
    except Exception as e:  # pylint: disable=broad-except
      record, failed = {'case': name, 'error': f'{type(e).__name__}: {e}'}, True
    record['wall_s'] = round(time.time() - t0, 1)
    _emit(record, args.out_dir)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
