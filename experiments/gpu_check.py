"""The GPU check: compile times, training-step and evaluation throughput, kernel profile, as JSON lines.

  python experiments/gpu_check.py --out gpu_check.jsonl --artifacts-dir arts   # GPU, ~9 min
  python experiments/gpu_check.py --smoke                                      # the same code, CPU, :tiny
  python experiments/gpu_check.py --torch-ref-dir .ref                         # also the authors' step

Two phases, each measurement in its own subprocess (a crash, a hang or an out-of-memory in one
leaves the others standing; each starts with an empty device):

1. Cold compile (``compile_*`` lines): one process per step and evaluation program of the run
   and one per initialisation program (``compile_init``: compiled and run), ``--precompile-jobs``
   at a time, each compiling into an empty persistent compilation cache (``--cache-dir``) and
   reporting the seconds.
   Several compile side by side (the machine has many cores; ``concurrent`` says how many), so
   these are upper bounds of one cold compile on an idle machine.
2. Measurements, one after another, each a fresh process reading that cache (so ``compile_s``
   and ``init_s`` below are warm: what a restarted job pays):
  env         device kind and count, jax / jaxlib / flax versions, CUDA and driver versions;
  step_*      the full training step at 160x192x128 (teacher + student forwards, every loss,
              one backward, both optimisers) for float32 / bfloat16 x remat off / on, and
              with NDHWC convolution layouts forced (``_nhwc``, see ``NHWC_FLAG``):
              compile time, compiled memory (``compiled.memory_analysis()``), seconds per step
              (each step synchronised, and a pipelined run of several steps), volumes/s,
              peak device memory, achieved TFLOP/s and MFU from the step's 6,670 GFLOP
              (measured on the authors' PyTorch code) against the chip's dense bf16 peak. Those marked in
              ``STEP_CASES`` then trace one step under ``jax.profiler.trace`` (``profile``):
              device time by kind of operation (convolution, GroupNorm, matmul, ...;
              ``profile_step.classify``) and the ten kernels that take the most time, with
              the XLA instruction each belongs to; with ``--artifacts-dir`` the compiled HLO
              text and every kernel's time are kept there;
  eval_*      the 15-subset evaluation of a full-size synthetic case (15 student forwards
              plus the teacher, scored as ``evaluate.evaluate_cases`` does), its parts
              (host <-> device copies, one forward on the device, the 15 forwards, the
              device's and the host's share of the scoring) and ``evaluate_cases`` on
              ``EVAL_REPEAT_CASES`` copies of the case: cases per minute and the ratio to the
              same forward passes alone (``ratio_to_forwards``; the goal is <= 1.2);
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

# One full training step at 160x192x128, measured on the authors' PyTorch code (commit 2c77373).
STEP_GFLOP_FULL = 6670.0
# NVIDIA H200 / H100 SXM dense bf16 tensor-core peak (datasheet), TFLOP/s.
PEAK_TFLOPS = {'H200': 989.4, 'H100': 989.4}
# The learning-rate schedule's epoch length (any value; the step's cost does not depend on it).
STEPS_PER_EPOCH = 100

# Step cases: data type, remat, extra XLA flags, profiled. On Hopper XLA gives cuDNN's 3D
# convolutions NCDHW layouts, which cuDNN transposes to NDHWC and back inside every call (a
# quarter of the bf16 step on 2026-12-04); the _nhwc cases force NDHWC instead.
NHWC_FLAG = '--xla_gpu_force_conv_nhwc=true'
STEP_CASES = {
    'step_bf16': ('bfloat16', False, '', True),
    'step_bf16_nhwc': ('bfloat16', False, NHWC_FLAG, True),
    'step_f32': ('float32', False, '', True),
    'step_f32_nhwc': ('float32', False, NHWC_FLAG, False),
    'step_bf16_remat': ('bfloat16', True, '', False),
    'step_f32_remat': ('float32', True, '', False),
}
EVAL_CASES = {'eval_f32': ('float32', ''), 'eval_bf16': ('bfloat16', ''),
              'eval_bf16_nhwc': ('bfloat16', NHWC_FLAG)}
# The most wanted first: GPU time may end before the last (torch_ref, with --torch-ref-dir,
# goes after eval_f32).
DEFAULT_CASES = ['env', 'step_bf16', 'step_bf16_nhwc', 'step_f32', 'eval_f32',
                 'step_bf16_remat', 'step_f32_remat', 'eval_bf16']
# The evaluation case runs evaluate_cases on this many copies of its case (pipelined: one
# case's host scoring overlaps the next one's forwards).
EVAL_REPEAT_CASES = 3
# On the CPU every case costs a compilation of a minute or more: one of each kind.
SMOKE_CASES = ['env', 'step_f32', 'eval_f32']


def case_xla_flags(name):
  """Extra XLA flags of a case (or of its cold compile, ``compile_<case>``)."""
  name = name[len('compile_'):] if name.startswith('compile_') else name
  if name in STEP_CASES:
    return STEP_CASES[name][2]
  if name in EVAL_CASES:
    return EVAL_CASES[name][1]
  return NHWC_FLAG if name == 'init_nhwc' else ''


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


def _cache_entries():
  """Files in the persistent compilation cache (0: this process compiles cold)."""
  path = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if not path or not os.path.isdir(path):
    return 0
  return sum(len(files) for _, _, files in os.walk(path))


def _compiled_step(args, dtype, remat):
  """(config, mesh, compiled step, result dict with the compile figures) of one step variant."""
  import jax
  from mstkd_jax import parallel, train
  from mstkd_jax.models import build
  from mstkd_jax.logging_utils import memory_dict
  config = _config(args.smoke, dtype, remat)
  mesh = parallel.make_mesh(jax.devices()[:1])
  abstract = build.abstract_state(config, STEPS_PER_EPOCH)
  out = {'shape': list(config.data.input_shape), 'dtype': dtype, 'remat': remat,
         'device': jax.devices()[0].device_kind, 'batch': 1,
         'cache_entries_at_start': _cache_entries()}
  _progress(f'compiling the step ({out["cache_entries_at_start"]} files in the cache)')
  t0 = time.perf_counter()
  compiled = train.compile_train_step(config, mesh, STEPS_PER_EPOCH, abstract, 1)
  out['compile_s'] = round(time.perf_counter() - t0, 2)
  _progress(f'compiled in {out["compile_s"]} s')
  memory = memory_dict(compiled)
  if memory:
    out['compiled_memory_gib'] = {k.replace('_bytes', ''): round(v / 2**30, 3)
                                  for k, v in memory.items()}
  return config, mesh, compiled, out


def _initial_state(config, mesh, out):
  """The training state, batch and key of the step; ``out['init_s']`` the seconds it took."""
  import jax
  from mstkd_jax import parallel, train
  _progress('initialising the state')
  t0 = time.perf_counter()
  state = train.create_state(config, mesh, STEPS_PER_EPOCH)
  batch = parallel.global_batch(next(train.random_batches(config, 1)), mesh)
  rng = parallel.replicated_key(0, mesh)
  jax.block_until_ready(state)
  out['init_s'] = round(time.perf_counter() - t0, 2)
  _progress(f'initialised in {out["init_s"]} s')
  return state, batch, rng


def case_compile_step(args, dtype, remat):
  """Cold-compile phase: compile one step variant, nothing more."""
  return _compiled_step(args, dtype, remat)[-1]


def case_compile_init(args):
  """Cold-compile phase: compile and run the state's initialisation (one program for every
  step variant of the same XLA flags: the data type and remat do not enter it)."""
  import jax
  from mstkd_jax import parallel
  config = _config(args.smoke)
  mesh = parallel.make_mesh(jax.devices()[:1])
  out = {'cache_entries_at_start': _cache_entries()}
  _initial_state(config, mesh, out)
  return out


def case_step(args, dtype, remat, profile=False):
  """Compile and time the training step (the same function training runs); with ``profile``,
  then one more step under the profiler (``_profile``)."""
  profile_step = _load_profile_step(args.smoke) if profile else None
  import jax
  import numpy as np
  config, mesh, compiled, out = _compiled_step(args, dtype, remat)
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out['xla_gflop'] = round(float(cost.get('flops', 0.0)) / 1e9, 1)
  except Exception:  # pylint: disable=broad-except
    pass
  state, batch, rng = _initial_state(config, mesh, out)
  _progress('stepping')
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
  if profile:
    out['profile'] = _profile(args, profile_step, compiled, state, batch, rng)
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


def _eval_setup(args, dtype):
  """Initialised variables, the compiled evaluation forward pass (run once) and one synthetic
  case's 15 masked copies; ``out`` holds the seconds each took."""
  import jax
  from mstkd_jax import inference as inference_lib
  from mstkd_jax.modalities import ALL_SUBSETS, masked_copies
  from mstkd_jax.models.mstkdnet import network_from_config
  from mstkd_jax.models.build import input_shape
  config = _config(args.smoke, dtype)
  out = {'shape': list(config.data.input_shape), 'dtype': dtype,
         'device': jax.devices()[0].device_kind, 'cache_entries_at_start': _cache_entries()}
  net = network_from_config(config)
  _progress('initialising the network')
  t0 = time.perf_counter()
  variables = jax.jit(lambda k: net.init({'params': k, 'dropout': k},
                                         jax.numpy.zeros(input_shape(config)), train=False))(
                                             jax.random.key(0))
  variables = jax.device_get(variables)
  out['init_s'] = round(time.perf_counter() - t0, 2)
  t0 = time.perf_counter()
  case = _synthetic_eval_case(config)
  out['synthetic_case_s'] = round(time.perf_counter() - t0, 2)
  inference = inference_lib.get_inference(config)
  placed = inference.place(variables)
  images = masked_copies(case.image, ALL_SUBSETS)
  _progress('compiling the evaluation forward pass')
  t0 = time.perf_counter()
  inference.run(placed, images[:1])
  out['compile_and_first_s'] = round(time.perf_counter() - t0, 2)
  _progress(f'compiled and ran once in {out["compile_and_first_s"]} s')
  return config, variables, inference, placed, images, case, out


def case_compile_eval(args, dtype):
  """Cold-compile phase: the evaluation forward pass, compiled and run once."""
  return _eval_setup(args, dtype)[-1]


def case_eval(args, dtype):
  """The 15-subset evaluation of one case (student x 15 subsets + teacher), as evaluation runs,
  and its parts: host <-> device copies, one forward on a device-resident input, the 15
  forwards through ``Inference.run``, the device's and the host's scoring of the 16 outputs;
  then ``evaluate_cases`` on ``EVAL_REPEAT_CASES`` copies of the case against the same
  forwards alone."""
  import jax
  import numpy as np
  from mstkd_jax import evaluate
  config, variables, inference, placed, images, case, out = _eval_setup(args, dtype)
  _progress('host <-> device copies')
  batch = np.ascontiguousarray(images[:1])
  t0 = time.perf_counter()
  on_device = jax.block_until_ready(jax.device_put(batch))
  h2d = time.perf_counter() - t0
  probs = jax.block_until_ready(inference._fn(placed, on_device))  # pylint: disable=protected-access
  t0 = time.perf_counter()
  np.asarray(probs)
  d2h = time.perf_counter() - t0
  out.update(input_mib=round(batch.nbytes / 2**20, 1), h2d_s=round(h2d, 4),
             output_mib=round(probs.nbytes / 2**20, 1), d2h_s=round(d2h, 4))
  t0 = time.perf_counter()
  for _ in range(3):
    probs = inference._fn(placed, on_device)  # pylint: disable=protected-access
  jax.block_until_ready(probs)
  out['forward_device_resident_s'] = round((time.perf_counter() - t0) / 3, 4)
  _progress('15 forwards through Inference.run')
  t0 = time.perf_counter()
  outputs = dict(zip(range(len(images)), inference.run(placed, images)))
  out['forwards_15_subsets_s'] = round(time.perf_counter() - t0, 3)
  out['forwards_per_s'] = round(15 / out['forwards_15_subsets_s'], 2)
  _progress('scoring 16 outputs (masks, counts, surfaces on the device; HD95 on the host)')
  from mstkd_jax import scoring
  truth, reference = scoring.reference_on_device(jax.device_put(case.label))
  one = lambda i: scoring.summarize_on_device(jax.device_put(outputs[i][None]), truth)
  jax.block_until_ready(one(0))   # compiled once
  t0 = time.perf_counter()
  parts = [(one(min(i, len(images) - 1)), 1) for i in range(16)]
  jax.block_until_ready(parts)
  out['scoring_device_16_outputs_s'] = round(time.perf_counter() - t0, 3)
  t0 = time.perf_counter()
  scoring.case_metrics(scoring.Summary.join([(reference, 1)]), scoring.Summary.join(parts),
                       case.spacing)
  out['scoring_host_16_outputs_s'] = round(time.perf_counter() - t0, 3)
  outputs.clear()   # frees the 15 outputs (the lambda above keeps the dict)
  del parts
  cases = [case] * EVAL_REPEAT_CASES
  _progress('evaluate_cases once (its scoring programs compiled), then timed')
  evaluate.evaluate_cases(config, cases[:1], variables, teacher=variables, progress=False)
  _progress(f'evaluate_cases on {len(cases)} copies of the case')
  t0 = time.perf_counter()
  rows = evaluate.evaluate_cases(config, cases, variables, teacher=variables, progress=False)
  total = time.perf_counter() - t0
  batches = -(-15 // inference.batch_size) + 1   # the student's 15 inputs, the teacher's 1
  forwards = len(cases) * batches * out['forward_device_resident_s']
  out.update({'cases': len(cases), 'evaluate_cases_s': round(total, 3),
              'cases_per_minute': round(60 * len(cases) / total, 2),
              'forwards_alone_s': round(forwards, 3),
              'ratio_to_forwards': round(total / max(forwards, 1e-9), 3), 'rows': len(rows),
              'mean_dice': round(float(np.mean([r['dice'] for r in rows])), 4),
              'device_memory_gib': {k: round(v / 2**30, 3)
                                    for k, v in _device_memory().items()}})
  return out


def _load_profile_step(smoke):
  """experiments/profile_step.py as a module. On the CPU it turns XLA:CPU's per-op trace events
  on, so it is imported before the backend starts (and the step compiles anew: the flag is part
  of the program's cache key); elsewhere that flag is taken off again."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'profile_step', os.path.join(ROOT, 'experiments', 'profile_step.py'))
  module = importlib.util.module_from_spec(spec)
  flags = os.environ.get('XLA_FLAGS')
  spec.loader.exec_module(module)
  if not smoke:   # the CPU's trace flag would change the GPU program's cache key: drop it
    if flags is None:
      os.environ.pop('XLA_FLAGS', None)
    else:
      os.environ['XLA_FLAGS'] = flags
  return module


def _trace_file(trace_dir):
  import glob
  files = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  if not files:
    raise FileNotFoundError(f'no *.trace.json.gz written under {trace_dir}')
  return sorted(files)[-1]


def device_kernel_events(path):
  """[(kernel name, XLA instruction or '', microseconds)] of the trace's device events: those on
  a process named like a GPU ('/device:GPU:0'). Empty on the CPU."""
  import gzip
  with gzip.open(path) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  device_pids = {e.get('pid') for e in events
                 if e.get('ph') == 'M' and e.get('name') == 'process_name'
                 and 'GPU' in str(e.get('args', {}).get('name', ''))}
  # Kernels are on the 'Stream #N(...)' threads; other lines of a device (XLA Modules, XLA
  # Ops, derived from the same kernels) would count their time twice.
  threads = {(e.get('pid'), e.get('tid')): str(e.get('args', {}).get('name', ''))
             for e in events if e.get('ph') == 'M' and e.get('name') == 'thread_name'
             and e.get('pid') in device_pids}
  streams = {k for k, v in threads.items() if v.startswith('Stream')}
  out = []
  for e in events:
    if e.get('ph') != 'X' or e.get('pid') not in device_pids:
      continue
    if streams and (e.get('pid'), e.get('tid')) not in streams:
      continue
    args = e.get('args') or {}
    hlo = args.get('hlo_op') or args.get('long_name') or ''
    out.append((e.get('name', ''), str(hlo), float(e.get('dur', 0.0))))
  return out


def _kernel_key(name):
  return name.replace('.', '_').replace('-', '_')


def _instruction_of(name, hlo_op, instructions, by_kernel):
  """The compiled program's instruction a kernel belongs to (XLA names its kernels after the
  fusion, with '.' spelt '_'; ``by_kernel`` maps those spellings back), or None."""
  for candidate in (hlo_op, name):
    if candidate in instructions:
      return candidate
  for candidate in (hlo_op, name):
    if _kernel_key(candidate) in by_kernel:
      return by_kernel[_kernel_key(candidate)]
  return None


def _profile(args, profile_step, compiled, state, batch, rng):
  """One more step under the profiler: device time by kind and the ten slowest kernels."""
  import collections
  import gzip
  import shutil
  import tempfile
  import jax
  hlo_text = compiled.as_text()
  instructions, computations = profile_step.parse_hlo(hlo_text)
  out = {}
  trace_dir = tempfile.mkdtemp(prefix='gpu_check_trace_')
  _progress('tracing one step')
  t0 = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
  out['step_wall_s_under_profiler'] = round(time.perf_counter() - t0, 3)
  path = _trace_file(trace_dir)
  kernels = device_kernel_events(path)
  out['trace_events_on_device'] = len(kernels)
  if kernels:   # a GPU: one event per kernel
    total_ms = sum(us for _, _, us in kernels) / 1e3
    by_kind = collections.Counter()
    by_kernel = collections.defaultdict(lambda: [0.0, 0, '', ''])
    unmatched = 0.0
    spellings = {_kernel_key(k): k for k in instructions}
    for name, hlo, us in kernels:
      instruction = _instruction_of(name, hlo, instructions, spellings)
      kind = (profile_step.classify(instructions, computations, instruction)[0]
              if instruction else 'unmatched')
      unmatched += us / 1e3 if instruction is None else 0.0
      by_kind[kind] += us / 1e3
      entry = by_kernel[name]
      entry[0] += us / 1e3
      entry[1] += 1
      entry[2] = entry[2] or (instruction or hlo)
      entry[3] = entry[3] or kind
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:10]
    out.update(
        kernel_total_ms=round(total_ms, 2), kernels=len(kernels),
        unmatched_ms=round(unmatched, 2),
        by_kind_ms={k: round(v, 2) for k, v in by_kind.most_common()},
        top10_kernels=[{'kernel': name[:160], 'ms': round(ms, 2), 'calls': calls,
                        'instruction': instruction, 'kind': kind,
                        'op': instructions.get(instruction, ('', '', None))[1][-120:]}
                       for name, (ms, calls, instruction, kind) in top])
  else:         # the CPU: the per-op events profile_step reads
    events = profile_step.read_events(trace_dir, instructions)
    summary = profile_step.summarise(events, instructions, computations, 10)
    out.update(kernel_total_ms=summary['op_total_ms'], kernels=len(events),
               by_kind_ms=summary['by_kind_ms'], top10_kernels=summary['top'])
  if args.artifacts_dir:
    os.makedirs(args.artifacts_dir, exist_ok=True)
    name = f'{args.run_case}'
    out['artifacts'] = [f'{name}.hlo.txt.gz', f'{name}.kernels.json.gz']
    with gzip.open(os.path.join(args.artifacts_dir, out['artifacts'][0]), 'wt') as f:
      f.write(hlo_text)
    with gzip.open(os.path.join(args.artifacts_dir, out['artifacts'][1]), 'wt') as f:
      json.dump([{'kernel': k, 'hlo_op': h, 'us': us} for k, h, us in kernels], f)
  shutil.rmtree(trace_dir, ignore_errors=True)
  return out


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
  for case, (dtype, remat, _, profile) in STEP_CASES.items():
    cases[case] = lambda d=dtype, r=remat, p=profile: case_step(args, d, r, p)
    cases['compile_' + case] = lambda d=dtype, r=remat: case_compile_step(args, d, r)
  for case, (dtype, _) in EVAL_CASES.items():
    cases[case] = lambda d=dtype: case_eval(args, d)
    cases['compile_' + case] = lambda d=dtype: case_compile_eval(args, d)
  cases['compile_init'] = cases['compile_init_nhwc'] = lambda: case_compile_init(args)
  if args.smoke:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  result = {'case': name}
  result.update(cases[name]())
  print('RESULT ' + json.dumps(result), flush=True)


def _child_command(args, name):
  cmd = [sys.executable, os.path.abspath(__file__), '--run-case', name,
         '--steps', str(args.steps), '--warmup', str(args.warmup)]
  if args.smoke:
    cmd.append('--smoke')
  if args.torch_ref_dir:
    cmd += ['--torch-ref-dir', args.torch_ref_dir]
  if args.artifacts_dir:
    cmd += ['--artifacts-dir', args.artifacts_dir]
  return cmd


def _child_env(args, name, share_device=False):
  env = dict(os.environ)
  flags = case_xla_flags(name)
  if flags:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + flags).strip()
  # Every case reads and writes one persistent compilation cache.
  env.setdefault('JAX_COMPILATION_CACHE_DIR', args.cache_dir)
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  if share_device:   # several processes on one GPU: none takes 75 % of its memory up front
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  if args.smoke:
    env['JAX_PLATFORMS'] = 'cpu'
  return env


def _result(name, stdout, returncode, wall):
  for line in reversed(stdout.splitlines()):
    if line.startswith('RESULT '):
      result = json.loads(line[len('RESULT '):])
      result['wall_s'] = wall
      return result
  return {'case': name, 'error': f'exit status {returncode} (its stderr is above)',
          'wall_s': wall}


def _child(args, name, timeout):
  t0 = time.perf_counter()
  try:
    # The child's stderr (its progress lines) goes straight to ours.
    proc = subprocess.run(_child_command(args, name), stdout=subprocess.PIPE, text=True,
                          timeout=timeout, env=_child_env(args, name))
  except subprocess.TimeoutExpired:
    return {'case': name, 'error': f'timed out after {timeout:.0f} s'}
  return _result(name, proc.stdout, proc.returncode, round(time.perf_counter() - t0, 2))


def _compile_in_parallel(args, programs, jobs, timeout):
  """The cold-compile phase: ``compile_<program>`` children, ``jobs`` at a time; their lines."""
  import tempfile
  pending, running, results = list(programs), [], []
  start = time.perf_counter()
  while pending or running:
    while pending and len(running) < jobs:
      name = 'compile_' + pending.pop(0)
      log = tempfile.TemporaryFile(mode='w+')
      proc = subprocess.Popen(_child_command(args, name), stdout=log, text=True,
                              env=_child_env(args, name, share_device=True))
      running.append((name, proc, log, time.perf_counter()))
    time.sleep(0.5)
    for item in list(running):
      name, proc, log, t0 = item
      overdue = time.perf_counter() - start > timeout
      if proc.poll() is None and not overdue:
        continue
      if proc.poll() is None:
        proc.kill()
        proc.wait()
        result = {'case': name, 'error': f'timed out: the compile phase ran {timeout:.0f} s'}
      else:
        log.seek(0)
        result = _result(name, log.read(), proc.returncode,
                         round(time.perf_counter() - t0, 2))
      log.close()
      result['concurrent'] = min(jobs, len(programs))
      results.append(result)
      running.remove(item)
  return results


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
  parser.add_argument('--precompile-jobs', type=int, default=9,
                      help='cold-compile phase: programs compiled side by side (0: no phase; '
                      'each measurement then compiles its own program, cold or not)')
  parser.add_argument('--precompile-timeout-s', type=float, default=300.0,
                      help='the most the cold-compile phase may take')
  parser.add_argument('--artifacts-dir', help='keep the profile cases\' trace and HLO text here')
  parser.add_argument('--run-case', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.run_case:
    run_case(args)
    return 0
  cases = args.cases.split(',') if args.cases else (SMOKE_CASES if args.smoke
                                                     else DEFAULT_CASES)
  cases = [c for c in cases if c]
  if args.torch_ref_dir and 'torch_ref' not in cases:
    after = cases.index('eval_f32') + 1 if 'eval_f32' in cases else len(cases)
    cases.insert(after, 'torch_ref')
  start = time.perf_counter()
  failures = 0

  def report(result):
    nonlocal failures
    result['smoke'] = args.smoke
    failures += 'error' in result
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
      with open(args.out, 'a') as f:
        f.write(line + '\n')

  # Each step and evaluation case compiles one program of its own; the step cases share the
  # initialisation program (one per set of XLA flags).
  programs = [c for c in cases if c in STEP_CASES or c in EVAL_CASES]
  flag_sets = {STEP_CASES[c][2] for c in programs if c in STEP_CASES}
  programs = [p for p, flags in (('init', ''), ('init_nhwc', NHWC_FLAG)) if flags in flag_sets] \
      + programs
  if args.precompile_jobs > 0 and programs:
    if 'env' in cases:   # the versions and the device first, whatever happens next
      report(_child(args, 'env', args.case_timeout_s))
      cases = [c for c in cases if c != 'env']
    _progress(f'cold-compile phase: {", ".join(programs)}, {args.precompile_jobs} at a time')
    timeout = min(args.precompile_timeout_s, args.budget_s - (time.perf_counter() - start))
    for result in _compile_in_parallel(args, programs, args.precompile_jobs, timeout):
      report(result)
  for name in cases:
    left = args.budget_s - (time.perf_counter() - start)
    if left < 20:
      result = {'case': name, 'error': 'skipped: budget spent'}
    else:
      result = _child(args, name, min(args.case_timeout_s, left))
    report(result)
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
