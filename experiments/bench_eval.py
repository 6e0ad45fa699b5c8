r"""Where the time of the 15-subset evaluation goes, and the evaluation against its forward passes.

  python experiments/bench_eval.py --config=configs/brats.py --root data/brats2018 --cases 1
  python experiments/bench_eval.py --config=configs/cpu_real.py --root data/brats2018 \
      --cases 4 --repeats 3
  python experiments/bench_eval.py --config=configs/brats.py:tiny --cases 2 --repeats 1  # synthetic

The first ``--cases`` cases of ``--root`` (sorted; synthetic cases without it) form a test split,
preprocessed into ``--workdir``. The networks have random weights (``--checkpoint``: a trained
export or workdir instead); the teacher row is scored too unless ``--no_teacher``. Random weights
give noisy masks over most of the volume, the costliest input for HD95; the ``tumour_like``
record scores masks shaped like a trained network's (the reference, shifted and grown, with a
small false positive far away) to show the host's share for those. JSON lines:

  parts         one case, each part timed alone (``block_until_ready``), for both paths:
                ``before`` (the evaluation before device-side scoring: the 15 masked copies
                made on the host, each batch copied to the device, its probabilities copied
                back, ``metrics.region_masks`` / ``dice`` / ``hd95`` on the host) and ``after``
                (``evaluate.evaluate_cases`` now: image and label copied once, masked copies,
                forwards and ``scoring.summarize_on_device`` on the device, counts and surfaces
                fetched, ``scoring.case_metrics`` on the host, serially and in threads)
  tumour_like   the host's scoring of tumour-like masks, both paths
  end_to_end    per repeat and path, interleaved (forwards, before, after, forwards, ...): the
                seconds for all cases, the process's CPU seconds (``cpu_s``: all its threads;
                less sensitive to other jobs than the wall time), cases per minute, and the
                ratio to ``forwards`` (the same forward passes alone, on inputs already on
                the device)
  summary       medians over the repeats; whether both paths gave the same rows

Each line holds the 1-minute load average before and after (``load``): on a shared machine
every time stretches.
"""

# pylint: disable=protected-access  (the benchmark times Inference's compiled parts alone)
import concurrent.futures
import functools
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mstkd_jax import checkpoint as ckpt  # noqa: E402
from mstkd_jax import compile_cache, evaluate, metrics, report, scoring  # noqa: E402
from mstkd_jax import inference as inference_lib  # noqa: E402
from mstkd_jax.data import pipeline  # noqa: E402
from mstkd_jax.modalities import ALL_SUBSETS, FULL, masked_copies, subset_masks  # noqa: E402
from mstkd_jax.models import build  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'config file[:variant]', lock_config=True)
flags.DEFINE_string('root', os.environ.get('MSTKD_BRATS2018'),
                    'folder of case folders (default $MSTKD_BRATS2018; none: synthetic cases)')
flags.DEFINE_integer('cases', 1, 'cases in the test split')
flags.DEFINE_integer('repeats', 1, 'end-to-end repeats of each path')
flags.DEFINE_string('workdir', None, 'preprocessing cache (default: a temporary folder)')
flags.DEFINE_string('checkpoint', None, 'an exported network or a training workdir')
flags.DEFINE_bool('teacher', True, 'also score the teacher on the full input (16 outputs)')
flags.DEFINE_bool('parts', True, 'time each part of one case (both paths)')
flags.DEFINE_string('out', None, 'also append the JSON lines to this file')
flags.mark_flag_as_required('config')


def load():
  return round(os.getloadavg()[0], 2)


def emit(record):
  line = json.dumps(record)
  print(line, flush=True)
  if FLAGS.out:
    with open(FLAGS.out, 'a') as f:
      f.write(line + '\n')


def timed(fn):
  """(seconds, result) of ``fn()``, its device work finished."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - t0, out


def random_network(config, seed):
  """{'params', 'batch_stats'} with random values (NumPy; nothing to compile)."""
  rs = np.random.RandomState(seed)

  def value(path, x):
    name = jax.tree_util.keystr(path)
    if 'var' in name or 'scale' in name:
      return np.ones(x.shape, x.dtype)
    if x.ndim < 2:
      return np.zeros(x.shape, x.dtype)
    return (rs.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(value, build.network_struct(config))


def networks(config):
  if not FLAGS.checkpoint:
    return random_network(config, 0), random_network(config, 1) if FLAGS.teacher else None
  loaded = ckpt.load_networks(config, FLAGS.checkpoint, None, names=('student', 'teacher'))
  teacher = None if loaded.is_export else loaded.networks.get('teacher')
  return loaded.primary(), teacher if FLAGS.teacher else None


def test_cases(config, workdir):
  if FLAGS.root:
    config.data.root = FLAGS.root
  else:
    config.data.synthetic_cases = max(FLAGS.cases, 2)
  root = pipeline.resolve_root(config, workdir)
  ids = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
  ids = ids[:FLAGS.cases]
  split = os.path.join(workdir, 'bench_split.json')
  with open(split, 'w') as f:
    json.dump({'train': [], 'val': [], 'test': ids}, f)
  config.data.split_file = split
  dataset = pipeline.prepare(config, workdir, splits=('test',), progress=False, workers=0)
  return pipeline.load_eval_cases(dataset, 'test')


# ---- the evaluation before device-side scoring (the reference path) ----

def _rows_before(case, outputs, convention):
  truth = metrics.region_masks(case.label)
  rows = []
  for subset, probs in outputs.items():
    rows += report.metric_rows(case.case_id, subset, metrics.case_metrics(
        metrics.region_masks(probs), truth, case.spacing, convention))
  return rows


def evaluate_before(config, cases, student, teacher):
  """``evaluate.evaluate_cases`` as it was: host masked copies and probabilities, the metrics
  of one case in a thread while the next case's forwards run."""
  inference = inference_lib.get_inference(config)
  student = inference.place(student)
  teacher = inference.place(teacher) if teacher is not None else None
  rows, pending = [], []
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    for case in cases:
      outputs = dict(zip(ALL_SUBSETS, inference.run(student, masked_copies(case.image,
                                                                             ALL_SUBSETS))))
      if teacher is not None:
        outputs[report.TEACHER_SUBSET] = inference.run(teacher, case.image[None])[0]
      pending.append(pool.submit(_rows_before, case, outputs, 'brats'))
      del outputs
      while pending and (pending[0].done() or len(pending) > 1):
        rows += pending.pop(0).result()
    for future in pending:
      rows += future.result()
  return rows


def _runs(inference, student, teacher):
  """[(placed variables, subsets)]: the student on the 15 subsets, the teacher on all four."""
  runs = [(inference.place(student), ALL_SUBSETS)]
  if teacher is not None:
    runs.append((inference.place(teacher), (FULL,)))
  return runs


def forwards_alone(config, cases, student, teacher):
  """The evaluation's forward passes alone, on batches already on the device."""
  inference = inference_lib.get_inference(config)
  runs = _runs(inference, student, teacher)
  seconds = 0.0
  for case in cases:
    for variables, subsets in runs:
      copies = masked_copies(case.image, subsets)
      for start in range(0, len(copies), inference.batch_size):
        batch = np.zeros((inference.batch_size,) + copies.shape[1:], np.float32)
        rows = copies[start:start + inference.batch_size]
        batch[:len(rows)] = rows
        batch = jax.block_until_ready(jax.device_put(batch, inference._batch_sharding))
        seconds += timed(lambda b=batch, v=variables: inference._fn(v, b))[0]
  return seconds


# ---- one case, part by part ----

def parts_before(config, case, student, teacher):
  inference = inference_lib.get_inference(config)
  runs = _runs(inference, student, teacher)
  out = dict(host_masked_copies_s=0.0, to_device_s=0.0, forward_s=0.0, to_host_s=0.0)
  probs = []
  for variables, subsets in runs:
    t, copies = timed(lambda s=subsets: masked_copies(case.image, s))
    out['host_masked_copies_s'] += t
    for start in range(0, len(copies), inference.batch_size):
      batch = np.zeros((inference.batch_size,) + copies.shape[1:], np.float32)
      batch[:len(copies[start:start + inference.batch_size])] = \
          copies[start:start + inference.batch_size]
      t, on_device = timed(lambda b=batch: jax.device_put(b, inference._batch_sharding))
      out['to_device_s'] += t
      t, result = timed(lambda v=variables, b=on_device: inference._fn(v, b))
      out['forward_s'] += t
      t, host = timed(lambda r=result: np.asarray(r))
      out['to_host_s'] += t
      probs += list(host[:len(copies) - start])
  t, truth = timed(lambda: metrics.region_masks(case.label))
  t_masks, preds = timed(lambda: [metrics.region_masks(p) for p in probs])
  out['region_masks_s'] = t + t_masks
  out['dice_s'] = timed(lambda: [metrics.dice(p[r], truth[r]) for p in preds
                                 for r in metrics.REGIONS])[0]
  out['hd95_s'] = timed(lambda: [metrics.hd95(p[r], truth[r], case.spacing) for p in preds
                                 for r in metrics.REGIONS])[0]
  return out, probs


def parts_after(config, case, student, teacher, pool):
  inference = inference_lib.get_inference(config)
  runs = _runs(inference, student, teacher)
  out = dict(device_masked_copies_s=0.0, forward_s=0.0, device_scoring_s=0.0)
  t, (image, label) = timed(lambda: (inference.put(case.image), inference.put(case.label)))
  out['to_device_s'] = t
  t, (truth, reference) = timed(lambda: scoring.reference_on_device(label))
  out['device_scoring_s'] += t
  parts = []
  for variables, subsets in runs:
    masks = subset_masks(subsets)
    for start in range(0, len(masks), inference.batch_size):
      padded = np.zeros((inference.batch_size, 4), np.float32)
      padded[:len(masks[start:start + inference.batch_size])] = \
          masks[start:start + inference.batch_size]
      t, batch = timed(lambda p=padded: inference._masked(image, p))
      out['device_masked_copies_s'] += t
      t, probs = timed(lambda v=variables, b=batch: inference._fn(v, b))
      out['forward_s'] += t
      t, summary = timed(lambda p=probs: scoring.summarize_on_device(p, truth))
      out['device_scoring_s'] += t
      parts.append((summary, min(inference.batch_size, len(masks) - start)))
  t, (ref, output) = timed(lambda: (scoring.Summary.join([(reference, 1)]),
                                    scoring.Summary.join(parts)))
  out['to_host_s'] = t
  out['host_hd95_serial_s'] = timed(lambda: scoring.case_metrics(ref, output, case.spacing))[0]
  out['host_hd95_threads_s'] = timed(lambda: scoring.case_metrics(ref, output, case.spacing,
                                                                  pool=pool))[0]
  return out


def tumour_like(label, n, seed=0):
  """``n`` probability volumes shaped like a trained network's: the reference's channels shifted
  by a few voxels and grown or shrunk, with a small false positive far from the tumour."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(seed)
  out = np.zeros((n,) + label.shape, np.float32)
  corner = tuple(slice(4, 8) for _ in range(3))
  for k in range(n):
    for c in range(3):
      mask = np.roll(label[..., c] > 0.5, tuple(rs.randint(-3, 4, size=3)), axis=(0, 1, 2))
      grow = rs.randint(-1, 3)
      if grow > 0:
        mask = ndimage.binary_dilation(mask, iterations=grow)
      elif grow < 0:
        mask = ndimage.binary_erosion(mask)
      out[k, ..., c] = mask
    out[(k,) + corner + (slice(0, 3),)] = 1.0
  return out


def score_tumour_like(case, pool, n=len(ALL_SUBSETS)):
  probs = tumour_like(case.label, n)
  before = timed(lambda: _rows_before(case, dict(zip(ALL_SUBSETS, probs)), 'brats'))[0]
  truth, reference = scoring.reference(case.label)
  t_summary, output = timed(lambda: scoring.Summary.join([(scoring.summarize(probs, truth),
                                                           n)]))
  serial = timed(lambda: scoring.case_metrics(reference, output, case.spacing))[0]
  threads = timed(lambda: scoring.case_metrics(reference, output, case.spacing, pool=pool))[0]
  return {'outputs': n, 'before_host_s': round(before, 3),
          'after_host_summary_numpy_s': round(t_summary, 3),
          'after_host_hd95_serial_s': round(serial, 3),
          'after_host_hd95_threads_s': round(threads, 3)}


def main(argv):
  del argv
  config = FLAGS.config
  compile_cache.enable()
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='bench_eval_')
  os.makedirs(workdir, exist_ok=True)
  cases = test_cases(config, workdir)
  cases = [cases[i] for i in range(len(cases))]
  student, teacher = networks(config)
  inference = inference_lib.get_inference(config)
  common = {'shape': list(config.data.input_shape), 'batch': inference.batch_size,
            'outputs_per_case': 15 + (teacher is not None), 'cases': len(cases),
            'device': jax.devices()[0].device_kind, 'cpus': os.cpu_count(),
            'host_threads': evaluate.HOST_THREADS, 'weights': FLAGS.checkpoint or 'random'}
  # Compile (or load) every program once before anything is timed.
  evaluate.evaluate_cases(config, cases[:1], student, teacher, progress=False)
  pool = concurrent.futures.ThreadPoolExecutor(evaluate.HOST_THREADS)
  if FLAGS.parts:
    before_load = load()
    t_load, case = timed(lambda: pipeline.load_eval_cases(
        pipeline.prepare(config, workdir, splits=('test',), progress=False, workers=0),
        'test')[0])
    before, _ = parts_before(config, case, student, teacher)
    emit({'record': 'parts', 'path': 'before', 'load_case_s': round(t_load, 3), **common,
          **{k: round(v, 3) for k, v in before.items()},
          'total_s': round(sum(before.values()), 2), 'load': [before_load, load()]})
    before_load = load()
    after = parts_after(config, case, student, teacher, pool)
    emit({'record': 'parts', 'path': 'after', **common,
          **{k: round(v, 3) for k, v in after.items()},
          'total_s': round(sum(v for k, v in after.items() if k != 'host_hd95_serial_s'), 2),
          'load': [before_load, load()]})
    before_load = load()
    emit({'record': 'tumour_like', **common, **score_tumour_like(case, pool),
          'load': [before_load, load()]})
  times = {'forwards': [], 'before': [], 'after': []}
  cpu = {'forwards': [], 'before': [], 'after': []}
  rows = {}
  for repeat in range(FLAGS.repeats):
    for path in ('forwards', 'before', 'after'):
      before_load = load()
      t0, cpu0 = time.perf_counter(), time.process_time()
      if path == 'forwards':
        seconds = forwards_alone(config, cases, student, teacher)
      else:
        fn = evaluate_before if path == 'before' else functools.partial(
            evaluate.evaluate_cases, progress=False)
        rows[path] = fn(config, cases, student, teacher)
        seconds = time.perf_counter() - t0
      times[path].append(seconds)
      cpu[path].append(time.process_time() - cpu0)
      emit({'record': 'end_to_end', 'path': path, 'repeat': repeat, **common,
            'seconds': round(seconds, 2), 'cpu_s': round(cpu[path][-1], 2),
            'cases_per_minute': round(60 * len(cases) / seconds, 3),
            'ratio_to_forwards': round(seconds / times['forwards'][-1], 3),
            'load': [before_load, load()]})
  pool.shutdown()
  median = {k: float(np.median(v)) for k, v in times.items()}
  emit({'record': 'summary', **common, 'repeats': FLAGS.repeats,
        **{f'{k}_median_s': round(v, 2) for k, v in median.items()},
        **{f'{k}_cases_per_minute': round(60 * len(cases) / v, 3) for k, v in median.items()},
        'before_ratio_to_forwards': round(median['before'] / median['forwards'], 3),
        'after_ratio_to_forwards': round(median['after'] / median['forwards'], 3),
        **{f'{k}_cpu_median_s': round(float(np.median(v)), 2) for k, v in cpu.items()},
        'same_rows': rows['before'] == rows['after'],
        'peak_rss_gib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})


if __name__ == '__main__':
  app.run(main)
