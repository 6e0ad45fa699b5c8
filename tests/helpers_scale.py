"""Subprocess scenarios for the scaling, resume and fault tests (and helpers to launch them).

Run as a script, it does one scenario in a fresh process (so that forced CPU devices,
``jax.distributed`` and signals do not touch the pytest process):

  devices   (4 forced devices) one step of :tiny on a global batch of 4 with meshes of 1, 2,
            and 4 devices (and 4 with the state sharded); then 3 steps of train_loop on 2
            devices: the reference of the two-process test.
  train     train_loop on :tiny for --steps steps in --workdir with a deterministic iterator
            (``train.RandomBatches``); options inject a NaN batch or hang a checkpoint save
            (for kill -9); dumps the final state and the data order to --dump.
  resume    6 steps straight, then 3 + 3 with a fresh train_loop and iterator in another
            workdir, then a NaN run; reports equality of everything.

Imported, it gives the tests ``run_helper`` / ``start_helper`` (env with a shared persistent
XLA compilation cache, so each program compiles once per test session).
"""

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

_CACHE = {}


def xla_cache_dir():
  """The persistent XLA compilation cache of the scenarios: ``MSTKD_TEST_XLA_CACHE``, else
  ``~/.cache/mstkd_jax/xla_test_cache`` (kept between sessions: a program compiles once per
  machine); ``MSTKD_TEST_XLA_CACHE=session`` for a fresh one that is deleted at the end."""
  if 'dir' not in _CACHE:
    path = os.environ.get('MSTKD_TEST_XLA_CACHE') or os.path.join(
        os.path.expanduser('~'), '.cache', 'mstkd_jax', 'xla_test_cache')
    if path == 'session':
      path = tempfile.mkdtemp(prefix='mstkd_xla_cache_')
      atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    _CACHE['dir'] = path
  return _CACHE['dir']


def helper_env(devices=1, **extra):
  env = dict(os.environ)
  env.update({
      'PYTHONPATH': ROOT + os.pathsep + env.get('PYTHONPATH', ''),
      'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
      'JAX_PLATFORMS': 'cpu',
      'JAX_COMPILATION_CACHE_DIR': xla_cache_dir(),
      'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
      'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1',
  })
  env.update({k: str(v) for k, v in extra.items()})
  return env


def start_helper(args, devices=1, log_path=None, **env):
  """Starts this script with ``args`` in a new process; stdout+stderr go to ``log_path``."""
  out = open(log_path, 'w') if log_path else subprocess.DEVNULL
  return subprocess.Popen([sys.executable, os.path.abspath(__file__)] + list(args),
                          env=helper_env(devices, **env), stdout=out,
                          stderr=subprocess.STDOUT, cwd=ROOT)


def run_helper(args, devices=1, timeout=300, log_path=None, **env):
  """Runs this script to completion; returns (exit status, log text)."""
  if log_path is None:
    fd, log_path = tempfile.mkstemp(prefix='mstkd_helper_', suffix='.log')
    os.close(fd)
  proc = start_helper(args, devices, log_path, **env)
  try:
    code = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    code = 'timeout'
  with open(log_path) as f:
    return code, f.read()


def wait_for(predicate, proc, timeout, what):
  """Polls ``predicate()`` until true; fails if ``proc`` ends or time runs out."""
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f'process ended (status {proc.returncode}) before {what}')
    time.sleep(0.2)
  proc.kill()
  raise AssertionError(f'timed out waiting for {what}')


def metrics_steps(workdir):
  """Steps logged in <workdir>/metrics.jsonl so far."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)['step'] for line in f if line.strip().endswith('}')]


def scenario_once(name, args=(), devices=1, timeout=600):
  """Runs scenario ``name`` once per test session (several test files use its results);
  returns (report dict, output folder, log text)."""
  key = ('scenario', name)
  if key not in _CACHE:
    out = tempfile.mkdtemp(prefix=f'mstkd_{name}_')
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    log = os.path.join(out, 'log.txt')
    t0 = time.time()
    code, text = run_helper([name, '--out', out] + list(args), devices=devices,
                            timeout=timeout, log_path=log)
    if code != 0:
      raise AssertionError(f'scenario {name} failed ({code}):\n{text[-6000:]}')
    with open(os.path.join(out, f'{name}.json')) as f:
      report = json.load(f)
    report['wall_s'] = round(time.time() - t0, 1)
    _CACHE[key] = (report, out, text)
  return _CACHE[key]


# ---------------------------------------------------------------------------------------------
# Scenarios (run in the subprocess)


def tiny_config(**train):
  from configs.brats import get_config
  config = get_config('tiny')
  config.train.update(train)
  return config


def state_arrays(state):
  """{path: np.ndarray} of every leaf of a TrainState (process-local copy of each array)."""
  import jax
  import numpy as np
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if leaf.is_fully_addressable:
      value = np.asarray(leaf)
    else:  # replicated across processes: any local copy is the whole array
      value = np.asarray(leaf.addressable_shards[0].data)
    out[jax.tree_util.keystr(path)] = value
  return out


def max_rel_diff(a, b):
  """(max over arrays of |a - b|_2 / |b|_2, worst element-wise |a - b|)."""
  import numpy as np
  worst, worst_elem = 0.0, 0.0
  for k in b:
    d = np.linalg.norm((a[k] - b[k]).ravel().astype(np.float64))
    worst = max(worst, float(d / max(np.linalg.norm(b[k].ravel().astype(np.float64)), 1e-12)))
    worst_elem = max(worst_elem, float(np.max(np.abs(a[k] - b[k]))) if b[k].size else 0.0)
  return worst, worst_elem


def group_rel_diff(a, b):
  """{part of the state: |a - b|_2 / |b|_2 over all its arrays} (params, opt_state, ...)."""
  import numpy as np
  num, den = {}, {}
  for k in b:
    group = k.split('[')[0].lstrip('.')
    diff = (a[k] - b[k]).ravel().astype(np.float64)
    num[group] = num.get(group, 0.0) + float(diff @ diff)
    ref = b[k].ravel().astype(np.float64)
    den[group] = den.get(group, 0.0) + float(ref @ ref)
  return {g: (num[g] ** 0.5) / max(den[g] ** 0.5, 1e-12) for g in num}


def _rms(x):
  import numpy as np
  return float(np.sqrt(np.mean(np.square(x.astype(np.float64))))) if x.size else 0.0


def gradient_free_leaves(arrays, ratio=1e-4):
  """Parameters whose gradient is zero in exact arithmetic (a bias followed by a
  normalisation, the key bias of softmax attention): after one step, the RMS of their Adam
  first moment (0.1 x gradient) is below ``ratio`` x the median over parameters. Their
  computed gradient is rounding noise, which Adam's first step scales to +-lr whatever its
  size, so its sign, and their update, depend on the order of the sums (the device count)."""
  import numpy as np
  prefix = '.opt_state[1].mu'
  rms = {k[len(prefix):]: _rms(v) for k, v in arrays.items() if k.startswith(prefix)}
  median = float(np.median([v for v in rms.values() if v > 0]))
  free = sorted(k for k, v in rms.items() if v < ratio * median)
  kept = [v / median for k, v in rms.items() if k not in free]
  return {'leaves': free, 'median_rms': median,
          'largest_free_ratio': max([rms[k] / median for k in free], default=0.0),
          'smallest_kept_ratio': min(kept)}


def compare_after_adam_step(a, b, free):
  """Compares two states after Adam steps from the same start: the relative difference
  |a - b|_2 / |b|_2 over each part of the state (parameters, Adam moments, BatchNorm
  statistics, discriminator, ...) without the gradient-free parameters, and the largest change
  of a gradient-free parameter (Adam moves each by at most about lr per step)."""
  import numpy as np
  free = set(free)
  num, den, free_abs = {}, {}, 0.0
  changed, counted, params_abs = 0, 0, 0.0
  for k in b:
    group, name = k.split('[')[0].lstrip('.'), None
    for prefix, label in (('.params', 'params'), ('.opt_state[1].mu', 'adam_mu'),
                          ('.opt_state[1].nu', 'adam_nu')):
      if k.startswith(prefix):
        group, name = label, k[len(prefix):]
    if name in free:
      if group == 'params':
        free_abs = max(free_abs, float(np.max(np.abs(a[k] - b[k]))))
      continue
    d = (a[k] - b[k]).ravel().astype(np.float64)
    r = b[k].ravel().astype(np.float64)
    num[group] = num.get(group, 0.0) + float(d @ d)
    den[group] = den.get(group, 0.0) + float(r @ r)
    if group == 'params' and d.size:
      changed += int(np.sum(np.abs(d) > 1e-6 + 1e-5 * np.abs(r)))
      counted += d.size
      params_abs = max(params_abs, float(np.max(np.abs(d))))
  rel = {g: (num[g] ** 0.5) / max(den[g] ** 0.5, 1e-30) for g in num}
  return {'rel': rel, 'max_rel': max(rel.values()),
          'params_changed_fraction': changed / max(counted, 1),
          'max_abs_params': params_abs,
          'max_abs_gradient_free_params': free_abs}


def worst_leaves(a, b, count=3):
  import numpy as np
  rel = {k: float(np.linalg.norm((a[k] - b[k]).ravel()) /
                  max(np.linalg.norm(b[k].ravel()), 1e-12)) for k in b}
  return sorted(rel.items(), key=lambda kv: -kv[1])[:count]


def scenario_devices(args):
  import jax
  import numpy as np
  from mstkd_jax import parallel, train
  from mstkd_jax.models import build

  global_bs = 4
  steps_per_epoch = 4
  opts = dict(checkpoint_every=100, log_every=1, epochs=10)
  report = {'device_count': jax.device_count(), 'runs': {}}
  reference = None
  for n, shard in [(1, False), (2, False), (4, False)] + ([(4, True)] if args.shard else []):
    config = tiny_config(batch_size_per_device=global_bs // n, shard_state=shard, **opts)
    mesh = parallel.make_mesh(jax.devices()[:n])
    abstract = build.abstract_state(config, steps_per_epoch)
    t0 = time.time()
    compiled = train.compile_train_step(config, mesh, steps_per_epoch, abstract, global_bs)
    compile_s = time.time() - t0
    state = train.create_state(config, mesh, steps_per_epoch)
    batch = parallel.global_batch(train.RandomBatches(config, global_bs, seed=0).batch(0), mesh)
    rng = parallel.replicated_key(7, mesh)
    state, metrics = compiled(state, batch, rng)
    values = {k: float(v) for k, v in metrics.items()}
    arrays = state_arrays(state)
    name = f'{n}{"_sharded" if shard else ""}'
    run = {'devices': n, 'sharded': shard, 'compile_s': round(compile_s, 1),
           'metrics': values,
           'largest_param_sharding': str(max(jax.tree.leaves(state.params),
                                             key=lambda x: x.size).sharding.spec),
           'seconds': round(time.time() - t0, 1)}
    np.savez(os.path.join(args.out, f'step_{name}.npz'), **arrays)
    if reference is None:
      reference = arrays
      report['gradient_free'] = gradient_free_leaves(arrays)
    else:
      run['rel_diff_vs_1'] = group_rel_diff(arrays, reference)
      run['max_abs_diff_vs_1'] = max_rel_diff(arrays, reference)[1]
      run['worst_leaves_vs_1'] = worst_leaves(arrays, reference)
      run['compare_vs_1'] = compare_after_adam_step(arrays, reference,
                                                    report['gradient_free']['leaves'])
    report['runs'][name] = run
    print(json.dumps({name: run}), flush=True)

  # Reference for the two-process test (2 processes x 1 device, batch 2 each): 3 steps of
  # train_loop on 2 devices of this process (the 2-device step above is reused).
  config = tiny_config(batch_size_per_device=global_bs // 2, shard_state=False, **opts)
  workdir = os.path.join(args.out, 'reference')
  it = train.RandomBatches(config, global_bs, seed=1)
  state = train.train_loop(config, workdir, it, steps_per_epoch=steps_per_epoch, max_steps=3,
                           mesh=parallel.make_mesh(jax.devices()[:2]))
  np.savez(os.path.join(args.out, 'reference.npz'), **state_arrays(state))
  report['reference_served'] = it.served
  with open(os.path.join(args.out, 'devices.json'), 'w') as f:
    json.dump(report, f, indent=1)


def _hang_save_at(step):
  """Makes Orbax stop just before it commits checkpoint ``step`` (its files are written into
  the temporary folder, which is not yet renamed): a marker file says so, then the commit
  thread sleeps until the test kills the process."""
  from orbax.checkpoint._src.path import atomicity
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *a, **k):
    if self.get_final().name == str(step):
      workdir = os.path.dirname(os.path.dirname(str(self.get_final())))
      marker = os.path.join(workdir, f'HANGING_{step}')
      with open(marker, 'w') as f:
        f.write(str(self.get()))
      while True:
        time.sleep(1)
    return await original(self, *a, **k)
  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def run_train(workdir, steps, train_opts, nan_at=None, seed=1, dump=None):
  """One train_loop in this process; returns (state or None, served indices, message)."""
  import jax
  import numpy as np
  from mstkd_jax import train

  config = tiny_config(**train_opts)
  global_bs = config.train.batch_size_per_device * jax.device_count()
  it = train.RandomBatches(config, global_bs, seed=seed, process_index=jax.process_index(),
                           process_count=jax.process_count(), nan_at=nan_at)
  message, state = None, None
  try:
    state = train.train_loop(config, workdir, it, steps_per_epoch=4, max_steps=steps)
  except train.TrainingStopped as e:
    message = str(e)
  if dump:
    arrays = state_arrays(state) if state is not None else {}
    np.savez(dump, **arrays)
    with open(dump + '.json', 'w') as f:
      json.dump({'served': it.served, 'message': message,
                 'process': jax.process_index()}, f)
  return state, it.served, message


def scenario_train(args):
  from mstkd_jax import parallel
  parallel.maybe_initialize_distributed()
  if args.hang_save_at is not None:
    _hang_save_at(args.hang_save_at)
  opts = dict(checkpoint_every=args.checkpoint_every, log_every=1, epochs=args.epochs,
              nan_policy=args.nan_policy, batch_size_per_device=args.batch_per_device)
  _, served, message = run_train(args.workdir, args.steps, opts, nan_at=args.nan_at,
                                 dump=args.dump)
  print(json.dumps({'served': served, 'message': message}), flush=True)
  if message:
    sys.exit(3)


def scenario_resume(args):
  import numpy as np
  opts = dict(checkpoint_every=2, log_every=1, epochs=10)
  out = {}
  straight, served_straight, _ = run_train(os.path.join(args.out, 'straight'), 6, opts)
  first, served_a, _ = run_train(os.path.join(args.out, 'split'), 3, opts)
  del first
  resumed, served_b, _ = run_train(os.path.join(args.out, 'split'), 6, opts)
  a, b = state_arrays(straight), state_arrays(resumed)
  out['same_keys'] = sorted(a) == sorted(b)
  out['unequal'] = [k for k in a if not np.array_equal(a[k], b[k])]
  out['leaves'] = len(a)
  out['served_straight'] = served_straight
  out['served_split'] = [served_a, served_b]
  out['final_step'] = int(a['.step'])
  np.savez(os.path.join(args.out, 'straight.npz'), **a)

  # A NaN in batch 2 (consumed by step 3) with a checkpoint every 2 steps.
  _, served_nan, message = run_train(os.path.join(args.out, 'nan'), 6, opts, nan_at=2)
  out['nan_message'] = message
  out['nan_served'] = served_nan
  if args.skip:
    state, _, message = run_train(os.path.join(args.out, 'nan_skip'), 6,
                                  dict(opts, nan_policy='skip'), nan_at=2)
    skip = state_arrays(state)
    out['skip_message'] = message
    out['skip_finite'] = all(np.all(np.isfinite(v)) for v in skip.values()
                             if np.issubdtype(v.dtype, np.floating))
    out['skip_step'] = int(skip['.step'])
  with open(os.path.join(args.out, 'resume.json'), 'w') as f:
    json.dump(out, f, indent=1)


def scenario_precision(args):
  """One step of :tiny from the same state and batch with f32, f32 + remat, bf16 + remat."""
  import jax
  import numpy as np
  from mstkd_jax import parallel, train
  from mstkd_jax.models import build

  mesh = parallel.make_mesh()
  opts = dict(checkpoint_every=2, log_every=1, epochs=10)   # as the resume runs: same step
  out, reference = {}, None
  for name, dtype, remat in [('f32', 'float32', False), ('f32_remat', 'float32', True),
                             ('bf16_remat', 'bfloat16', True)]:
    config = tiny_config(**opts)
    config.dtype, config.remat = dtype, remat
    abstract = build.abstract_state(config, 4)
    t0 = time.time()
    compiled = train.compile_train_step(config, mesh, 4, abstract, 1)
    compile_s = time.time() - t0
    state = train.create_state(config, mesh, 4)
    batch = parallel.global_batch(train.RandomBatches(config, 1, seed=0).batch(0), mesh)
    state, metrics = compiled(state, batch, parallel.replicated_key(7, mesh))
    arrays = state_arrays(state)
    run = {'compile_s': round(compile_s, 1),
           'metrics': {k: float(v) for k, v in metrics.items()},
           'metric_dtypes': {k: str(v.dtype) for k, v in metrics.items()},
           'state_float_dtypes': sorted({str(v.dtype) for v in arrays.values()
                                         if np.issubdtype(v.dtype, np.floating)
                                         or v.dtype == jax.numpy.bfloat16})}
    if reference is None:
      reference = arrays
      free = gradient_free_leaves(arrays)['leaves']
    else:
      run['rel_diff_vs_f32'] = group_rel_diff(arrays, reference)
      run['compare_vs_f32'] = compare_after_adam_step(arrays, reference, free)
    out[name] = run
    print(json.dumps({name: run}), flush=True)
  with open(os.path.join(args.out, 'precision.json'), 'w') as f:
    json.dump(out, f, indent=1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('scenario', choices=['devices', 'train', 'resume', 'precision'])
  parser.add_argument('--out')
  parser.add_argument('--workdir')
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--checkpoint-every', type=int, default=2)
  parser.add_argument('--nan-at', type=int)
  parser.add_argument('--nan-policy', default='stop')
  parser.add_argument('--hang-save-at', type=int)
  parser.add_argument('--batch-per-device', type=int, default=1)
  parser.add_argument('--dump')
  parser.add_argument('--shard', action='store_true')
  parser.add_argument('--skip', action='store_true')
  args = parser.parse_args()
  from absl import logging
  from mstkd_jax.logging_utils import quiet_libraries
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  quiet_libraries()
  {'devices': scenario_devices, 'train': scenario_train, 'resume': scenario_resume,
   'precision': scenario_precision}[args.scenario](args)


if __name__ == '__main__':
  main()
