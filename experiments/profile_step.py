"""Where the training step spends its time: per-op timings of one step, grouped by kind.

  python experiments/profile_step.py --config=configs/brats.py:cube64
  python experiments/profile_step.py --config=configs/brats.py:tiny --top 20

Compiles the real step, runs it once untimed, then once under ``jax.profiler.trace`` with
XLA:CPU's per-op trace events on (``--xla_cpu_enable_xprof_traceme``; on a GPU the events are
the kernels). Each event is the HLO instruction of that name in the compiled program; its
metadata (the JAX op and the ``named_scope`` path: teacher / student / discriminator / losses,
``transpose(jvp(...))`` for the backward pass) gives its group:

  kind     conv (3x3x3 and 1x1 convolutions), deconv (transposed, k2 s2), matmul (dense layers,
           attention products), norm (GroupNorm, BatchNorm, LayerNorm), attention (softmax,
           masks), elementwise, reduce, copy / layout (copies, transposes, pads, slices,
           concatenations), rng, optimizer, losses, other;
  pass     forward, backward (``transpose(`` in the op path), optimizer (outside both);
  network  teacher, student, discriminator, losses, optimizer.

Prints one JSON object (totals in ms by kind, by pass, by network, by kind x pass, the top
instructions) as its last line, with ``coverage``: the traced op time over the step's wall
time. Well below 1 the trace lost events (seen with XLA:CPU's own convolutions) and the shares
are not to be trusted. Timings of one step on a loaded machine are noisy: compare shares, and
repeat with ``--repeats``.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if 'xla_cpu_enable_xprof_traceme' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_cpu_enable_xprof_traceme=true').strip()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mstkd_jax import compile_cache, parallel, train  # noqa: E402
from mstkd_jax.models import build  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'config file[:variant]', lock_config=True)
flags.DEFINE_integer('top', 15, 'how many of the slowest instructions to list')
flags.DEFINE_integer('repeats', 1, 'profiled steps (times are summed over them)')
flags.DEFINE_string('trace_dir', None, 'keep the trace here (default: a temporary folder)')
flags.mark_flag_as_required('config')

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*? ([\w\-]+)\(')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) ')


def parse_hlo(text):
  """{instruction name: (opcode, op_name path, called computation)} and
  {computation: [(opcode, op_name)] of its instructions} from compiled HLO text."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      m = _COMPUTATION.match(line)
      current = m.group(1) if m else None
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, opcode = m.group(1), m.group(2)
    op = _OP_NAME.search(line)
    calls = _CALLS.search(line)
    target = _TARGET.search(line)
    if target:   # a custom call is known by its target (e.g. the oneDNN convolutions)
      opcode = target.group(1)
    entry = (opcode, op.group(1) if op else '', calls.group(1) if calls else None)
    instructions[name] = entry
    if current:
      computations[current].append(entry[:2])
  return instructions, computations


def _body(instructions, computations, name):
  """The opcodes and op paths inside a fusion (or the instruction itself)."""
  opcode, path, calls = instructions.get(name, ('?', '', None))
  inner = computations.get(calls, []) if calls else []
  return opcode, path, inner


def classify(instructions, computations, name):
  """(kind, pass, network) of one executed instruction."""
  opcode, path, inner = _body(instructions, computations, name)
  paths = [path] + [p for _, p in inner if p]
  opcodes = {opcode} | {o for o, _ in inner}
  joined = ' '.join(paths)
  main = next((p for p in paths if p), '')
  scope = re.search(r'\b(teacher|student|discriminator(?:_on_student)?|losses)\b', main)
  if 'transpose(' in main:
    phase = 'backward'
  elif scope:
    phase = 'forward'
  else:
    phase = 'optimizer'
  network = scope.group(1) if scope else 'optimizer'
  # Convolutions: XLA's own, the oneDNN custom calls (CPU), cuDNN's (GPU: __cudnn$conv...).
  if 'convolution' in opcodes or any(o.startswith(('mstkd_conv3d', '__cudnn$conv'))
                                     for o in opcodes):
    kind = 'deconv' if re.search(r'deconv|ConvTranspose|conv_transpose', joined) else 'conv'
  elif 'dot' in opcodes or any(o.startswith('__cublas') for o in opcodes):
    kind = 'matmul'
  elif 'rng-bit-generator' in opcodes or 'threefry' in joined or 'random_bits' in joined:
    kind = 'rng'
  elif re.search(r'GroupNorm|BatchNorm|LayerNorm|/gn\d|/bn/|_norm/', joined):
    kind = 'norm'
  elif re.search(r'softmax|attention', joined, re.I):
    kind = 'attention'
  elif network == 'losses' or '/losses' in joined:
    kind = 'losses'
  elif phase == 'optimizer' and opcodes & {'add', 'multiply', 'sqrt', 'divide', 'fusion'}:
    kind = 'optimizer'
  elif opcodes <= {'copy', 'transpose', 'bitcast', 'pad', 'slice', 'concatenate',
                   'dynamic-slice', 'dynamic-update-slice', 'reshape', 'broadcast',
                   'parameter', 'tuple', 'get-tuple-element', 'constant'} and opcode != '?':
    kind = 'copy/layout'
  elif 'reduce' in opcodes or 'reduce-window' in opcodes or 'select-and-scatter' in opcodes:
    kind = 'reduce/pool'
  elif opcode in ('fusion', 'add', 'multiply', 'maximum', 'select', 'compare', 'convert'):
    kind = 'elementwise'
  else:
    kind = 'other'
  return kind, phase, network


def read_events(trace_dir, instructions):
  """[(name, microseconds)] of the trace's events that name an instruction of the program."""
  files = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)
  if not files:
    raise FileNotFoundError(f'no *.trace.json.gz written under {trace_dir}')
  with gzip.open(sorted(files)[-1]) as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  out = []
  for e in events:
    name = e.get('name', '')
    if e.get('ph') == 'X' and name in instructions:
      out.append((name, float(e.get('dur', 0.0))))
  return out


def summarise(events, instructions, computations, top):
  by = {k: collections.Counter() for k in ('kind', 'pass', 'network', 'kind_pass')}
  per_instruction = collections.Counter()
  for name, us in events:
    kind, phase, network = classify(instructions, computations, name)
    ms = us / 1e3
    by['kind'][kind] += ms
    by['pass'][phase] += ms
    by['network'][network] += ms
    by['kind_pass'][f'{kind}/{phase}'] += ms
    per_instruction[name] += ms
  total = sum(by['kind'].values())
  result = {'op_total_ms': round(total, 1)}
  for key, counter in by.items():
    result[f'by_{key}_ms'] = {k: round(v, 1) for k, v in counter.most_common()}
  result['by_kind_share'] = {k: round(v / total, 3) for k, v in by['kind'].most_common()}
  result['top'] = []
  for name, ms in per_instruction.most_common(top):
    opcode, path, _ = instructions[name]
    result['top'].append({'instruction': name, 'ms': round(ms, 1), 'opcode': opcode,
                          'kind': classify(instructions, computations, name)[0],
                          'op': path.replace('jit(train_step)/', '')[-110:]})
  return result


def main(argv):
  del argv
  config = FLAGS.config
  compile_cache.enable()
  steps_per_epoch = 100
  mesh = parallel.make_mesh(jax.devices()[:1])
  abstract = build.abstract_state(config, steps_per_epoch)
  compiled = train.compile_train_step(config, mesh, steps_per_epoch, abstract, 1)
  instructions, computations = parse_hlo(compiled.as_text())
  state = train.create_state(config, mesh, steps_per_epoch)
  batch = parallel.global_batch(next(train.random_batches(config, 1)), mesh)
  rng = parallel.replicated_key(0, mesh)
  state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix='mstkd_profile_')
  t0 = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    for _ in range(FLAGS.repeats):
      state, metrics = compiled(state, batch, rng)
      jax.block_until_ready(metrics)
  wall = (time.perf_counter() - t0) / FLAGS.repeats
  result = {'shape': list(config.data.input_shape), 'dtype': config.dtype,
            'backend': jax.default_backend(), 'jax': jax.__version__,
            'step_wall_s_under_profiler': round(wall, 3), 'repeats': FLAGS.repeats}
  result.update(summarise(read_events(trace_dir, instructions), instructions, computations,
                          FLAGS.top))
  # Share of the step's wall time that the traced op events account for (ops on several
  # threads can overlap). Well below 1, the trace lost events and the shares are unreliable.
  result['coverage'] = round(result['op_total_ms'] / 1e3 / wall, 3)
  result['trace_dir'] = trace_dir
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
