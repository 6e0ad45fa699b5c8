r"""Start-up time of the commands, cold (empty compilation cache) and warm, each in a fresh process.

  python experiments/bench_startup.py                       # everything, JSON lines on stdout
  python experiments/bench_startup.py --scenarios tiny,demo --out startup.jsonl
  python experiments/bench_startup.py --scenarios predict --keep /tmp/startup   # keep the files
  python experiments/bench_startup.py --scenarios demo --keep /tmp/startup --phases warm  # again
  python experiments/bench_startup.py --scenarios tiny --root /tmp/before   # another checkout

Scenarios (each runs twice with one fresh compilation cache, ``$MSTKD_CACHE_DIR`` pointed at a
temporary folder: first ``cold``, then ``warm``; every run is a new process with a new workdir):

  demo     ``python -m mstkd_jax.main --config=configs/demo.py``: the whole run's wall time
  tiny     ``configs/brats.py:tiny``, launch to the first finished training step
  cube64   ``configs/brats.py:cube64`` (full widths, 64^3), launch to the first finished step
  predict  ``python -m mstkd_jax.predict`` of one full-size case (a synthetic 240x240x155 case,
           4 modalities) with a full-size exported student (random weights), and the forward
           pass it is compared with (``bench_step.py --mode infer``, the fastest of 2)
  eval     ``--mode=eval`` of that export: the 15-subset evaluation of that one case

The training scenarios stop the process once the first step is logged (``metrics.jsonl``)
and split the time to it by the log's timestamps into imports and set-up, data (synthetic
cases, split, preprocessing cache: ``data_s``), the initialisation and the training step
(``init``/``step``: compiled or loaded, from the command's own log lines); ``phases`` has
every stretch between those lines (imports and flags, set-up, data, the state's shapes, the
state, the step program, the first step). ``--root DIR`` measures the commands of another
checkout (an earlier commit extracted with ``git archive``: the "before" of a change).
Every line holds the load average before and after the run (``load_before`` /
``load_after``, 1/5/15 min): on a busy machine all times stretch. ``JAX_LOG_COMPILES=1`` is
set in the runs, so ``compiles`` counts every program obtained (compiled or loaded) and
``compile_s_total`` their seconds.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SCENARIOS = ('tiny', 'demo', 'cube64', 'predict', 'eval')
CHECKOUT = [ROOT]   # the checkout whose commands are measured (--root)
LOG_TIME = re.compile(r'^[IWEF](\d{4}) (\d\d:\d\d:\d\d\.\d+)')
COMPILE_LINE = re.compile(r'Finished XLA compilation of (.+?) in ([0-9.eE+-]+) sec')


def load():
  return [round(v, 2) for v in os.getloadavg()]


def run_env(cache_root):
  """The environment of a measured run: its own compilation cache, no inherited JAX cache."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAX_COMPILATION_CACHE', 'MSTKD_COMPILE_CACHE'))}
  env.update(MSTKD_CACHE_DIR=cache_root, PYTHONPATH=CHECKOUT[0], JAX_LOG_COMPILES='1',
             MSTKD_NATIVE_CACHE=os.path.join(os.path.expanduser('~'), '.cache', 'mstkd_jax',
                                             'native'))
  return env


def log_times(text, day):
  """[(seconds since the epoch, line)] of absl's log lines (``I1204 13:33:22.515 ...``)."""
  out = []
  for line in text.splitlines():
    m = LOG_TIME.match(line)
    if m:
      stamp = datetime.datetime.strptime(f'{day.year}{m.group(1)} {m.group(2)}',
                                         '%Y%m%d %H:%M:%S.%f')
      out.append((stamp.timestamp(), line))
  return out


def first_time(lines, needle):
  for t, line in lines:
    if needle in line:
      return t, line
  return None, None


def compile_summary(text):
  found = [(name, float(s)) for name, s in COMPILE_LINE.findall(text)]
  top = sorted(found, key=lambda x: -x[1])[:3]
  return {'compiles': len(found), 'compile_s_total': round(sum(s for _, s in found), 2),
          'compile_top': [[n[:60], round(s, 2)] for n, s in top]}


def phrase(line):
  """The part of a log line after the logger's prefix (``... train.py:95] ``)."""
  return line.split('] ', 1)[-1] if line else None


def run_command(cmd, env, log_path, stop_when=None, timeout=3600):
  """Runs ``cmd`` in the measured checkout; returns (launch time, exit time, exit status).
  ``stop_when()`` true stops the process early (SIGKILL: its workdir is thrown away)."""
  launch = time.time()
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(cmd, cwd=CHECKOUT[0], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
      while proc.poll() is None:
        if stop_when is not None and stop_when():
          os.killpg(proc.pid, signal.SIGKILL)
          proc.wait()
          return launch, time.time(), 'stopped after the first step'
        if time.time() - launch > timeout:
          os.killpg(proc.pid, signal.SIGKILL)
          proc.wait()
          return launch, time.time(), 'timeout'
        time.sleep(0.1)
    except BaseException:
      os.killpg(proc.pid, signal.SIGKILL)
      raise
  return launch, time.time(), proc.returncode


def first_record(metrics_path):
  try:
    with open(metrics_path) as f:
      line = f.readline()
    return json.loads(line) if line.endswith('\n') else None
  except (OSError, ValueError):
    return None


def train_run(config, workdir, env, log_path, to_first_step):
  """One training command in a fresh workdir; the time to its first step and its phases."""
  cmd = [sys.executable, '-m', 'mstkd_jax.main', f'--config={config}', f'--workdir={workdir}']
  metrics = os.path.join(workdir, 'metrics.jsonl')
  before = load()
  launch, end, status = run_command(
      cmd, env, log_path, stop_when=(lambda: first_record(metrics) is not None)
      if to_first_step else None)
  with open(log_path) as f:
    text = f.read()
  lines = log_times(text, datetime.date.today())
  record = first_record(metrics)
  result = {'command': ' '.join(['python'] + cmd[1:]), 'status': status,
            'wall_s': round(end - launch, 2), 'load_before': before, 'load_after': load()}
  if record is not None:
    result['launch_to_first_step_s'] = round(record['time'] - launch, 2)
  t_data, _ = first_time(lines, '] process 0 of ')   # just before the data work
  t_cases, _ = first_time(lines, 'training cases, ')
  _, init_line = first_time(lines, 'the initialisation program: ')
  _, step_line = first_time(lines, 'the training step (global')
  _, eval_line = first_time(lines, 'the evaluation forward pass (')
  if lines:
    result['first_log_line_s'] = round(lines[0][0] - launch, 2)
  if t_data and t_cases:
    result['data_s'] = round(t_cases - t_data, 2)
    if 'launch_to_first_step_s' in result:
      result['to_first_step_without_data_s'] = round(
          result['launch_to_first_step_s'] - result['data_s'], 2)
  result['phases'] = phases(lines, launch, record)
  result.update(init=phrase(init_line), step=phrase(step_line), eval_forward=phrase(eval_line))
  result.update(compile_summary(text))
  return result


# Log lines that open each phase of a training start, in order (either spelling of a line:
# this checkout's and earlier ones').
PHASES = (('imports_and_flags', None), ('set_up', ('] process 0 of ',)),
          ('data', ('training cases, ',)),
          ('state_shapes', ('building the networks and initialising', 'resumed from ')),
          ('state', ('fresh start in ', 'resumed from ')),
          ('before_step', ('compiling the training step', 'the training step (teacher')),
          ('step_program', ('the training step (global',)), ('first_step', None))


def phases(lines, launch, record):
  """Seconds of each phase of a start, from the log's timestamps: imports and flags (to the
  first line), set-up, data, the state's shapes, the state (initialised or restored), what
  precedes the step program, the step program (loaded or compiled), the first step."""
  marks = [launch, lines[0][0] if lines else None]
  for _, needles in PHASES[1:-1]:
    marks.append(next((t for t, line in lines if any(n in line for n in needles)), None))
  marks.append(record['time'] if record else None)
  out = {}
  for (name, _), start, end in zip(PHASES, marks, marks[1:]):
    if start is not None and end is not None:
      out[name + '_s'] = round(end - start, 2)
  return out


def make_export(folder, env):
  """A full-size exported student with random weights (numpy; no compilation)."""
  script = r'''
import sys, numpy as np, jax
from configs import brats
from mstkd_jax import checkpoint
from mstkd_jax.models import build
config = brats.get_config()
rs = np.random.RandomState(0)
def value(path, x):
  name = jax.tree_util.keystr(path)
  if 'var' in name or 'scale' in name:
    return np.ones(x.shape, x.dtype)
  if x.ndim < 2:
    return np.zeros(x.shape, x.dtype)
  return (rs.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(x.dtype)
variables = jax.tree_util.tree_map_with_path(value, build.network_struct(config))
checkpoint.save_network(sys.argv[1], variables, config, source='random weights (bench_startup)')
'''
  subprocess.run([sys.executable, '-c', script, folder], cwd=ROOT, env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_case(folder):
  """One synthetic full-size case (240x240x155, 1 mm, BraTS 2021 file names)."""
  from mstkd_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  synthetic.generate_dataset(folder, 1, shape=(240, 240, 155), layout='brats2021', seed=0)
  case = [n for n in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, n))][0]
  return os.path.join(folder, case)


def timed_run(cmd, env, log_path):
  """Runs ``cmd`` with its output in ``log_path``: the result's common fields and the log."""
  before = load()
  launch, end, status = run_command(cmd, env, log_path)
  with open(log_path) as f:
    text = f.read()
  return {'command': ' '.join(['python'] + cmd[1:]), 'status': status,
          'wall_s': round(end - launch, 2), 'load_before': before, 'load_after': load()}, text


def predict_run(export, case, out, env, log_path):
  cid = os.path.basename(case)
  files = {key: os.path.join(case, f'{cid}_{key}.nii.gz') for key in ('flair', 't1', 't1ce', 't2')}
  cmd = [sys.executable, '-m', 'mstkd_jax.predict', '--checkpoint', export,
         '--out', out] + [a for k, p in files.items() for a in (f'--{k}', p)]
  result, text = timed_run(cmd, env, log_path)
  result.update(compile_summary(text))
  return result


def forward_run(env, log_path):
  cmd = [sys.executable, os.path.join('experiments', 'bench_step.py'), '--mode', 'infer',
         '--config=configs/brats.py', '--steps', '2']
  result, text = timed_run(cmd, env, log_path)
  lines = [line for line in text.splitlines() if line.startswith('{')]
  if lines:
    bench = json.loads(lines[-1])
    result.update(forward_s=bench['sec_per_forward_min'], compile=bench.get('compile'))
  return result


def eval_run(export, root, split_file, workdir, env, log_path):
  cmd = [sys.executable, '-m', 'mstkd_jax.main', '--config=configs/brats.py', '--mode=eval',
         f'--checkpoint={export}', f'--workdir={workdir}', f'--config.data.root={root}',
         f'--config.data.split_file={split_file}']
  result, text = timed_run(cmd, env, log_path)
  m = re.search(r'15-subset evaluation, test split \(.*?\), (\d+) s', text)
  if m:
    result['evaluation_s'] = int(m.group(1))
  _, eval_line = first_time(log_times(text, datetime.date.today()),
                            'the evaluation forward pass (')
  result['eval_forward'] = phrase(eval_line)
  result.update(compile_summary(text))
  return result


def remove(path):
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def emit(record, out):
  line = json.dumps(record)
  print(line, flush=True)
  if out:
    with open(out, 'a') as f:
      f.write(line + '\n')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--scenarios', default=','.join(SCENARIOS),
                 help=f'comma-separated, of {",".join(SCENARIOS)}')
  p.add_argument('--out', help='also append the JSON lines to this file')
  p.add_argument('--root', default=ROOT,
                 help='measure the commands of this checkout (e.g. an earlier commit, '
                      'extracted with git archive) instead of this one')
  p.add_argument('--label', help="a name for the measured checkout in the JSON lines "
                 "('checkout'; default its path)")
  p.add_argument('--keep', help='work in this folder and keep it (logs, workdirs, caches)')
  p.add_argument('--phases', default='cold,warm',
                 help="'cold,warm' (default), or 'warm' alone: again with the cache a run with "
                      "--keep left in that folder")
  args = p.parse_args(argv)
  CHECKOUT[0] = os.path.abspath(args.root)
  chosen = [s.strip() for s in args.scenarios.split(',') if s.strip()]
  phases = [s.strip() for s in args.phases.split(',') if s.strip()]
  if phases not in (['cold', 'warm'], ['warm'], ['cold']):
    p.error('--phases: cold,warm | cold | warm')
  if phases == ['warm'] and not args.keep:
    p.error('--phases warm needs --keep (the folder of an earlier run, with its cache)')
  unknown = sorted(set(chosen) - set(SCENARIOS))
  if unknown:
    p.error(f'unknown scenarios: {", ".join(unknown)}')
  base = args.keep or tempfile.mkdtemp(prefix='bench_startup_')
  os.makedirs(base, exist_ok=True)
  common = {'cpus': os.cpu_count(), 'host': os.uname().nodename,
            'checkout': args.label or CHECKOUT[0]}
  try:
    export = case = None
    for name in chosen:
      folder = os.path.join(base, name)
      if 'cold' in phases:
        shutil.rmtree(folder, ignore_errors=True)
      os.makedirs(folder, exist_ok=True)
      cache = os.path.join(folder, 'cache')
      env = run_env(cache)
      if name in ('predict', 'eval') and export is None:
        setup = os.path.join(base, 'setup')
        os.makedirs(setup, exist_ok=True)
        export = os.path.join(setup, 'export')
        if not os.path.isdir(os.path.join(export, 'variables')):
          make_export(export, run_env(os.path.join(setup, 'cache')))
        case = make_case(os.path.join(setup, 'cases'))
      for phase in phases:
        log_path = os.path.join(folder, f'{phase}.log')
        for leftover in (f'{phase}_workdir', f'{phase}_seg.nii.gz'):
          remove(os.path.join(folder, leftover))   # a fresh workdir for every run
        record = {'scenario': name, 'phase': phase, **common}
        if name in ('tiny', 'cube64', 'demo'):
          config = {'tiny': 'configs/brats.py:tiny', 'cube64': 'configs/brats.py:cube64',
                    'demo': 'configs/demo.py'}[name]
          record.update(train_run(config, os.path.join(folder, f'{phase}_workdir'), env,
                                  log_path, to_first_step=name != 'demo'))
        elif name == 'predict':
          record.update(predict_run(export, case, os.path.join(folder, f'{phase}_seg.nii.gz'),
                                    env, log_path))
          fwd = forward_run(env, os.path.join(folder, f'{phase}_forward.log'))
          record['forward'] = fwd
          if 'forward_s' in fwd and phase == 'warm':
            record['predict_minus_forward_s'] = round(record['wall_s'] - fwd['forward_s'], 2)
        elif name == 'eval':
          split = os.path.join(folder, 'split.json')
          with open(split, 'w') as f:
            json.dump({'train': [], 'val': [], 'test': [os.path.basename(case)]}, f)
          record.update(eval_run(export, os.path.dirname(case), split,
                                 os.path.join(folder, f'{phase}_workdir'), env, log_path))
        emit(record, args.out)
  finally:
    if not args.keep:
      shutil.rmtree(base, ignore_errors=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
