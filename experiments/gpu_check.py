"""The GPU check: full-size training step and 15-subset evaluation throughput, as JSON lines.

  python experiments/gpu_check.py --out gpu_check.jsonl            # on a GPU, ~6-8 minutes
  python experiments/gpu_check.py --smoke                          # the same code, CPU, :tiny
  python experiments/gpu_check.py --torch-ref-dir .ref             # also the authors' step

Measurements, each in its own subprocess (a crash, a hang or an out-of-memory in one leaves
the others standing; each starts with an empty device):
  env         device kind and count, jax / jaxlib / flax versions, CUDA and driver versions;
  step_*      the full training step at 160x192x128 (teacher + student forwards, every loss,
              one backward, both optimisers) for float32 / bfloat16 x remat off / on:
              compile time, compiled memory (``compiled.memory_analysis()``), seconds per step
              (each step synchronised, and a pipelined run of several steps), volumes/s,
              peak device memory, achieved TFLOP/s and MFU from the step's 6,670 GFLOP
              (REFERENCE_NUMBERS.md) against the chip's dense bf16 peak;
  eval_*      the 15-subset evaluation of one full-size synthetic case (15 student forwards
              plus the teacher, Dice and HD95 on the host), as ``evaluate.evaluate_cases``
              runs it: compile time, seconds per case, forwards per second;
  torch_ref   (with --torch-ref-dir) the authors' PyTorch step on the same device, from their
              files extracted into that folder with ``ref_torch_step.py`` beside them.
Every line is a JSON object with a ``case`` field; failures are lines with ``error``.
``--smoke`` runs every case at ``configs/brats.py:tiny`` size on the CPU (the test suite does,
so the script cannot rot).
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# One full training step at 160x192x128 (REFERENCE_NUMBERS.md, the authors' network).
STEP_GFLOP_FULL = 6670.0
# NVIDIA H200 / H100 SXM dense bf16 tensor-core peak (datasheet), TFLOP/s.
PEAK_TFLOPS = {'H200': 989.4, 'H100': 989.4}

STEP_CASES = [('step_bf16', 'bfloat16', False), ('step_f32', 'float32', False),
              ('step_bf16_remat', 'bfloat16', True), ('step_f32_remat', 'float32', True)]
EVAL_CASES = [('eval_f32', 'float32'), ('eval_bf16', 'bfloat16')]
# The most wanted first: a lease may end before the last.
DEFAULT_CASES = ['env', 'step_bf16', 'step_f32', 'eval_f32', 'step_bf16_remat',
                 'step_f32_remat', 'eval_bf16']
# On the CPU every case costs a compilation of a minute or more: one of each kind.
SMOKE_CASES = ['env', 'step_f32', 'eval_f32']


def _config(smoke, dtype='float32', remat=False):
  from configs import brats
  config = brats.get_config('tiny' if smoke else None)
  config.dtype = dtype
  config.remat = remat
  return config


def _progress(text):
  print(f'[gpu_check {time.strftime("%H:%M:%S")}] {text}', file=sys.stderr, flush=True)


def _peak_tflops(kind):
  for name, value in PEAK_TFLOPS.items():
    if name in kind:
      return value
  return None


def _device_memory():
  import jax
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return {}
  return {k: int(stats[k]) for k in ('peak_bytes_in_use', 'bytes_in_use', 'bytes_limit')
          if k in stats}


def case_env(args):
  import jax
  import jaxlib
  import flax
  import optax
  out = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
         'optax': optax.__version__, 'backend': jax.default_backend(),
         'devices': [d.device_kind for d in jax.devices()], 'python': sys.version.split()[0]}
  try:
    import orbax.checkpoint
    out['orbax'] = orbax.checkpoint.__version__
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    out['platform_version'] = jax.devices()[0].client.platform_version
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    smi = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total,'
                          'clocks.max.sm', '--format=csv,noheader'], capture_output=True,
                         text=True, timeout=30)
    out['nvidia_smi'] = smi.stdout.strip()
  except Exception:  # pylint: disable=broad-except
    pass
  out['xla_flags'] = os.environ.get('XLA_FLAGS', '')
  return out


def case_step(args, dtype, remat):
  """Compile and time the training step (the same function training runs)."""
  import jax
  import numpy as np
  from mstkd_jax import parallel, train
  from mstkd_jax.models import build
  from mstkd_jax.logging_utils import memory_dict
  config = _config(args.smoke, dtype, remat)
  steps_per_epoch = 100
  mesh = parallel.make_mesh(jax.devices()[:1])
  abstract = build.abstract_state(config, steps_per_epoch)
  out = {'shape': list(config.data.input_shape), 'dtype': dtype, 'remat': remat,
         'device': jax.devices()[0].device_kind, 'batch': 1}
  _progress('compiling the step')
  t0 = time.perf_counter()
  compiled = train.compile_train_step(config, mesh, steps_per_epoch, abstract, 1)
  out['compile_s'] = round(time.perf_counter() - t0, 2)
  _progress(f'compiled in {out["compile_s"]} s; initialising the state')
  memory = memory_dict(compiled)
  if memory:
    out['compiled_memory_gib'] = {k.replace('_bytes', ''): round(v / 2**30, 3)
                                  for k, v in memory.items()}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out['xla_gflop'] = round(float(cost.get('flops', 0.0)) / 1e9, 1)
  except Exception:  # pylint: disable=broad-except
    pass
  t0 = time.perf_counter()
  state = train.create_state(config, mesh, steps_per_epoch)
  batch = parallel.global_batch(next(train.random_batches(config, 1)), mesh)
  rng = parallel.replicated_key(0, mesh)
  jax.block_until_ready(state)
  out['init_s'] = round(time.perf_counter() - t0, 2)
  _progress(f'initialised in {out["init_s"]} s; stepping')
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready((state, metrics))
  pipelined = (time.perf_counter() - t0) / args.steps
  med = float(np.median(times))
  out.update(sec_per_step_median=round(med, 5), sec_per_step_min=round(min(times), 5),
             sec_per_step_pipelined=round(pipelined, 5), steps=args.steps,
             volumes_per_s=round(1.0 / min(med, pipelined), 2),
             loss=float(metrics['total']), finite=bool(metrics['finite']))
  best = min(med, pipelined)
  if not args.smoke:
    out['tflops_achieved'] = round(STEP_GFLOP_FULL / best / 1e3, 1)
    peak = _peak_tflops(out['device'])
    if peak:
      out['mfu_vs_dense_bf16_peak'] = round(STEP_GFLOP_FULL / best / 1e3 / peak, 4)
  out['device_memory_gib'] = {k: round(v / 2**30, 3) for k, v in _device_memory().items()}
  return out


def _synthetic_eval_case(config):
  """One BraTS-like case of the model's input shape, as ``pipeline.EvalCase``."""
  import numpy as np
  from mstkd_jax.data import layouts, synthetic
  from mstkd_jax.data.pipeline import EvalCase
  shape = tuple(config.data.input_shape)
  images, _, tissue = synthetic.generate_case(shape, 'brats2021', seed=0, index=0,
                                              return_tissue=True)
  codes = synthetic.TISSUE_CODE[tissue]
  image = np.moveaxis(images, 0, -1)
  image = image / np.maximum(image.max(axis=(0, 1, 2)), 1e-6)
  return EvalCase(case_id='synthetic_0', image=image.astype(np.float32),
                  label=layouts.codes_to_onehot(codes), codes=codes, meta={},
                  spacing=(1.0, 1.0, 1.0))


def case_eval(args, dtype):
  """The 15-subset evaluation of one case (student x 15 subsets + teacher), as evaluation runs."""
  import jax
  import numpy as np
  from mstkd_jax import evaluate
  from mstkd_jax.modalities import ALL_SUBSETS, masked_copies
  from mstkd_jax.models.mstkdnet import network_from_config
  from mstkd_jax.models.build import input_shape
  config = _config(args.smoke, dtype)
  net = network_from_config(config)
  t0 = time.perf_counter()
  variables = jax.jit(lambda k: net.init({'params': k, 'dropout': k},
                                         jax.numpy.zeros(input_shape(config)), train=False))(
                                             jax.random.key(0))
  variables = jax.device_get(variables)
  init_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  case = _synthetic_eval_case(config)
  case_s = time.perf_counter() - t0
  inference = evaluate.get_inference(config)
  placed = inference.place(variables)
  images = masked_copies(case.image, ALL_SUBSETS)
  t0 = time.perf_counter()
  inference.run(placed, images[:1])
  compile_s = time.perf_counter() - t0
  forwards = []
  for _ in range(2):
    t0 = time.perf_counter()
    inference.run(placed, images)
    forwards.append(time.perf_counter() - t0)
  totals = []
  for _ in range(2):
    t0 = time.perf_counter()
    rows = evaluate.evaluate_cases(config, [case], variables, teacher=variables,
                                   progress=False)
    totals.append(time.perf_counter() - t0)
  return {'shape': list(config.data.input_shape), 'dtype': dtype,
          'device': jax.devices()[0].device_kind, 'init_s': round(init_s, 2),
          'synthetic_case_s': round(case_s, 2), 'compile_and_first_s': round(compile_s, 2),
          'forwards_15_subsets_s': round(min(forwards), 3),
          'forwards_per_s': round(15 / min(forwards), 2),
          'case_15_subsets_plus_teacher_s': round(min(totals), 3),
          'cases_per_hour': round(3600 / min(totals), 1), 'rows': len(rows),
          'mean_dice': round(float(np.mean([r['dice'] for r in rows])), 4),
          'device_memory_gib': {k: round(v / 2**30, 3) for k, v in _device_memory().items()}}


def case_torch_ref(args):
  """The authors' training step on this device (their files in --torch-ref-dir)."""
  import importlib.util
  import statistics
  import torch
  ref_dir = os.path.abspath(args.torch_ref_dir)
  spec = importlib.util.spec_from_file_location('ref_torch_step',
                                                os.path.join(ref_dir, 'ref_torch_step.py'))
  rts = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(rts)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  # The smallest the authors' code builds at (GroupNorm of 8 groups, discriminator >= 64^3).
  shape = (64, 64, 64) if args.smoke else rts.FULL_SHAPE
  init_channels = 8 if args.smoke else 16
  torch.manual_seed(0)
  rts.install_import_stubs()
  ref = rts.Ref(os.path.join(ref_dir, 'authors'))
  deviations = []
  teacher, student, d_style = rts.build(ref, torch, shape, init_channels, False, deviations)
  teacher, student, d_style = teacher.to(device), student.to(device), d_style.to(device)
  step = rts.Step(ref, torch, teacher, student, d_style)
  x, y = (t.to(device) for t in rts.make_batch(torch, shape))
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  times = []
  for i in range(args.warmup + args.steps):
    sync()
    t0 = time.perf_counter()
    step(x, y)
    sync()
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  out = {'shape': list(shape), 'device': torch.cuda.get_device_name() if device == 'cuda'
         else 'cpu', 'torch': torch.__version__, 'dtype': 'float32',
         'sec_per_step_median': round(statistics.median(times), 5),
         'sec_per_step_min': round(min(times), 5), 'steps': len(times),
         'tf32_matmul': torch.backends.cuda.matmul.allow_tf32,
         'cudnn_tf32': torch.backends.cudnn.allow_tf32, 'deviations': deviations}
  if device == 'cuda':
    out['peak_device_gib'] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
  return out


def run_case(args):
  """Child process: one case, one JSON line on stdout."""
  name = args.run_case
  cases = dict(env=lambda: case_env(args), torch_ref=lambda: case_torch_ref(args))
  for case, dtype, remat in STEP_CASES:
    cases[case] = lambda d=dtype, r=remat: case_step(args, d, r)
  for case, dtype in EVAL_CASES:
    cases[case] = lambda d=dtype: case_eval(args, d)
  if args.smoke:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  result = {'case': name}
  result.update(cases[name]())
  print('RESULT ' + json.dumps(result), flush=True)


def _child(args, name, timeout):
  cmd = [sys.executable, os.path.abspath(__file__), '--run-case', name,
         '--steps', str(args.steps), '--warmup', str(args.warmup)]
  if args.smoke:
    cmd.append('--smoke')
  if args.torch_ref_dir:
    cmd += ['--torch-ref-dir', args.torch_ref_dir]
  env = dict(os.environ)
  # Cases share one compilation cache (the initialisation program is the same for all).
  env.setdefault('JAX_COMPILATION_CACHE_DIR', args.cache_dir)
  if args.smoke:
    env['JAX_PLATFORMS'] = 'cpu'
  t0 = time.perf_counter()
  try:
    # The child's stderr (its progress lines) goes straight to ours.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return {'case': name, 'error': f'timed out after {timeout:.0f} s'}
  wall = round(time.perf_counter() - t0, 2)
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith('RESULT '):
      result = json.loads(line[len('RESULT '):])
      result['wall_s'] = wall
      return result
  return {'case': name, 'error': f'exit status {proc.returncode} (its stderr is above)',
          'wall_s': wall}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--smoke', action='store_true',
                      help='CPU, configs/brats.py:tiny size (what the test suite runs)')
  parser.add_argument('--out', help='append the JSON lines to this file too')
  parser.add_argument('--cases', help='comma-separated cases, run in this order (default: '
                      + ','.join(DEFAULT_CASES) + '; with --smoke: ' + ','.join(SMOKE_CASES)
                      + '; torch_ref is added with --torch-ref-dir)')
  parser.add_argument('--budget-s', type=float, default=480.0,
                      help='stop starting cases when this much wall time has passed')
  parser.add_argument('--case-timeout-s', type=float, default=240.0,
                      help='the most one case may take')
  parser.add_argument('--steps', type=int, default=10, help='timed steps per step case')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  parser.add_argument('--torch-ref-dir', help="folder holding ref_torch_step.py and the "
                      "authors' files under authors/ (never committed)")
  parser.add_argument('--cache-dir', default=os.path.join('/tmp', f'gpu_check_cache_{os.getpid()}'),
                      help='JAX compilation cache shared by the cases')
  parser.add_argument('--run-case', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.run_case:
    run_case(args)
    return 0
  cases = args.cases.split(',') if args.cases else (SMOKE_CASES if args.smoke
                                                     else DEFAULT_CASES)
  cases = [c for c in cases if c]
  if args.torch_ref_dir and 'torch_ref' not in cases:
    cases.append('torch_ref')
  start = time.perf_counter()
  failures = 0
  for name in cases:
    left = args.budget_s - (time.perf_counter() - start)
    if left < 20:
      result = {'case': name, 'error': 'skipped: budget spent'}
    else:
      result = _child(args, name, min(args.case_timeout_s, left))
    result['smoke'] = args.smoke
    failures += 'error' in result
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
      with open(args.out, 'a') as f:
        f.write(line + '\n')
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
