"""From a folder of cases to training batches and evaluation cases (the data API).

Everything takes the project config; docs/data.md describes layouts, preprocessing and the
cache. A run's data is one object, built once:

``prepare(config, workdir, splits=('train', 'val', 'test')) -> Dataset``
    Finds the cases under the data root (``resolve_root``: ``config.data.root``, or
    ``config.data.synthetic_cases`` synthetic cases written once into ``<workdir>/synthetic``),
    reads or draws the split (``make_split``: ``config.data.split_file``, else
    ``<workdir>/split.json``, else drawn with ``data.split_seed`` and ``data.split`` and written
    there) and builds the preprocessing cache of the cases of ``splits`` where needed,
    applying ``config.data.on_bad_case``. ``Dataset`` holds ``root``, ``cases``, ``split``,
    ``entries`` {case id: cache folder} and ``skipped``; ``ids(split)`` lists a split's usable
    cases.
``make_train_loader(dataset, batch_size, seed, process_index=0, process_count=1,
                    worker_count=None, threads=None) -> TrainIterator``
    An infinite iterator of ``{'image': float32 [B,H,W,D,4], 'label': uint8 [B,H,W,D,4]}``
    (H, W, D = ``config.data.input_shape``; one-hot label channels NETC/NCR, SNFH/ED, ET,
    background; uint8 to save bytes, the training step computes in float32).
    This process reads the training cases ``process_index::process_count``; epochs repeat with a
    new shuffle. ``get_state() -> bytes`` / ``set_state(bytes)`` save and restore the position
    (a step count: the batches are a pure function of (seed, step), independent of the worker
    count, which may change between save and restore). Also ``case_ids``, ``skipped_cases``,
    ``close()``. Parallelism: ``config.data.workers`` builders, threads of this process
    (``config.data.worker_kind='threads'``, the default: numpy releases the GIL, so batches
    cost no copy) or grain worker processes ('processes', batches built straight into shared
    memory); ``worker_count`` (processes) and ``threads`` override the config.
``load_eval_cases(dataset, split='test', full_box=False) -> EvalCases``
    A sequence of ``EvalCase`` in sorted case-id order: ``case_id``, ``image`` [H,W,D,4]
    float32 and ``label`` [H,W,D,4] float32 (the centre window of input_shape of the box around
    the brain; with ``full_box=True`` the whole box, each side >= input_shape, for sliding-
    window inference), ``codes`` (uint8 canonical labels, layouts module), ``spacing`` (mm per
    voxel of the model space, for HD95) and ``meta`` (for ``restore_geometry``).
``preprocess_patient(paths, config, case_id='patient') -> (image, meta)``
    A new patient: ``paths`` maps modality names (any of ``modalities.ALIASES``; any non-empty
    subset) to NIfTI files; absent modalities are zero channels (``meta['present']``).
    ``image`` is the whole box around the brain, float32 [bx,by,bz,4] with every side >=
    input_shape (slide windows over it, or take ``centre_crop(image, meta, input_shape)``).
``restore_geometry(volume, meta, order=None)``, ``write_nifti(volume, meta, path)``
    A model-space array back in the original voxel grid, and saved with the original affine.

To add a dataset layout: a ``Layout`` in layouts.py. The data package imports nothing from
models, training or evaluation.
"""

import collections
import dataclasses
import hashlib
import json
import mmap
import os
import sys
import threading
from typing import Any, Sequence

from absl import flags
from absl import logging
import grain
import numpy as np

from mstkd_jax.data import augment
from mstkd_jax.data import cache
from mstkd_jax.data import layouts
from mstkd_jax.data import preprocess
from mstkd_jax.data import synthetic
from mstkd_jax.data.layouts import BadCaseError, DataError
from mstkd_jax.data.preprocess import (  # pylint: disable=unused-import
    header_from_meta, restore_geometry, write_nifti)
from mstkd_jax.fileio import write_json_atomic

SPLITS = ('train', 'val', 'test')


# ----------------------------------------------------------------------------------------------
# Root, discovery, split


def resolve_root(config, workdir):
  """config.data.root, or synthetic cases generated once into <workdir>/synthetic."""
  data_cfg = config.data
  if data_cfg.root:
    return os.fspath(data_cfg.root)
  out = os.path.join(workdir, 'synthetic')
  synthetic.generate_dataset(out, data_cfg.synthetic_cases, tuple(data_cfg.synthetic_shape),
                             data_cfg.synthetic_layout, seed=config.seed,
                             spacing=data_cfg.synthetic_spacing)
  return out


def discover(config, workdir):
  return layouts.discover_cases(resolve_root(config, workdir), config.data.layout)


def split_counts(n, fractions):
  """(train, val, test) counts: every positive fraction gets at least one case as long as
  training keeps one (with too few cases validation gives way first, then test)."""
  fractions = [float(f) for f in fractions]
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
    raise ValueError(f'data.split must be 3 non-negative fractions summing to 1, '
                     f'got {tuple(fractions)}')
  counts = [0, 0, 0]
  for i in (1, 2):
    if fractions[i] > 0:
      counts[i] = max(1, int(round(fractions[i] * n)))
  while sum(counts[1:]) > max(n - 1, 0):
    # Too few cases: validation gives way first, then test.
    counts[1 if counts[1] > 0 else 2] -= 1
  counts[0] = n - counts[1] - counts[2]
  return tuple(counts)


def _read_split(path, known_ids):
  try:
    with open(path) as f:
      split = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f'cannot read split file {path}: {e}') from e
  if not all(isinstance(split.get(k), list) for k in SPLITS):
    raise DataError(f'split file {path} must hold lists "train", "val" and "test"')
  ids = [i for k in SPLITS for i in split[k]]
  if len(ids) != len(set(ids)):
    raise DataError(f'split file {path} lists a case more than once')
  unknown = sorted(set(ids) - set(known_ids))
  if unknown:
    raise DataError(f'split file {path} names {len(unknown)} case(s) not found under the data '
                    f'root: {", ".join(unknown[:5])}{" ..." if len(unknown) > 5 else ""} '
                    '(wrong root, or a split.json of another data set in the workdir)')
  missing = sorted(set(known_ids) - set(ids))
  if missing:
    logging.warning('%d case(s) under the data root are in no split of %s (unused): %s',
                    len(missing), path, ', '.join(missing[:5]))
  return {k: list(split[k]) for k in SPLITS}


def make_split(config, workdir, cases=None):
  """The train/val/test case ids (see module doc); writes <workdir>/split.json once."""
  data_cfg = config.data
  cases = discover(config, workdir) if cases is None else cases
  ids = [c.case_id for c in cases]
  if data_cfg.split_file:
    return _read_split(data_cfg.split_file, ids)
  path = os.path.join(workdir, 'split.json')
  if os.path.exists(path):
    return _read_split(path, ids)
  counts = split_counts(len(ids), data_cfg.split)
  order = np.random.default_rng(int(data_cfg.split_seed)).permutation(len(ids))
  shuffled = [ids[i] for i in order]
  split = {'train': sorted(shuffled[:counts[0]]),
           'val': sorted(shuffled[counts[0]:counts[0] + counts[1]]),
           'test': sorted(shuffled[counts[0] + counts[1]:])}
  write_json_atomic(path, {**split, 'seed': int(data_cfg.split_seed),
                           'fractions': list(data_cfg.split),
                           'root': os.path.realpath(resolve_root(config, workdir))})
  logging.info('Split %d cases into train %d / val %d / test %d (seed %d): %s', len(ids),
               *counts, data_cfg.split_seed, path)
  return split


# ----------------------------------------------------------------------------------------------
# Cache


def cache_dir(config, workdir):
  return config.data.cache_dir or os.path.join(workdir, 'cache')


@dataclasses.dataclass
class Dataset:
  """The data of one run, found, split and prepared once (``prepare``); the training loader
  (``make_train_loader``) and the evaluation cases (``load_eval_cases``) take it.

  ``cases``: every case found under ``root`` (``layouts.Case``); ``split``: {'train', 'val',
  'test': [ids]}; ``entries``: {case id: preprocessing-cache folder} of the prepared cases;
  ``skipped``: the problems of the cases left out (``data.on_bad_case='skip'``).
  """
  config: Any
  workdir: str
  root: str
  cases: list
  split: dict
  cache_folder: str
  entries: dict
  skipped: list

  @property
  def skipped_ids(self):
    return sorted({ps[0].case for ps in self.skipped})

  def ids(self, split):
    """Sorted ids of ``split`` whose cache entry is ready (bad cases left out)."""
    if split not in SPLITS:
      raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    return [i for i in sorted(self.split[split]) if i in self.entries]


def prepare(config, workdir, splits=SPLITS, progress=True, workers=None) -> Dataset:
  """Finds the cases, reads or draws the split, and builds the preprocessing cache of the
  cases of ``splits`` where needed (see cache.build_cache); the one walk over the data root
  of a run."""
  data_cfg = config.data
  root = resolve_root(config, workdir)
  cases = layouts.discover_cases(root, data_cfg.layout)
  split = make_split(config, workdir, cases)
  wanted = {i for k in splits for i in split[k]}
  chosen = [c for c in cases if c.case_id in wanted]
  workers = data_cfg.workers if workers is None else workers
  folder, entries, skipped = cache.build_cache(
      chosen, preprocess.Settings.from_config(config), root, cache_dir(config, workdir),
      workers=workers, on_bad_case=data_cfg.on_bad_case, progress=progress)
  if skipped:
    report = {'skipped': [[str(p) for p in ps] for ps in skipped],
              'count': len(skipped)}
    write_json_atomic(os.path.join(workdir, 'bad_cases.json'), report)
  record_label_convention(workdir, root, cases)
  return Dataset(config, workdir, root, cases, split, folder, entries, skipped)


LABEL_CONVENTION_FILE = 'label_convention.json'


def record_label_convention(workdir, root, cases):
  """Writes ``<workdir>/label_convention.json``: the label convention the run's cases follow
  ({'convention': 'brats2021' | 'brats2024' | 'mixed', 'cases': {layout: count}, 'root'}), so
  that an export and prediction write what the training data used. Returns the record."""
  convention, counts = layouts.label_convention(cases)
  record = {'convention': convention, 'cases': counts, 'root': os.path.abspath(root)}
  if convention == layouts.MIXED:
    logging.warning('the training cases mix label conventions (%s); each case is read with '
                    'its own, and prediction from this run needs --labels',
                    ', '.join(f'{n} {k}' for k, n in counts.items()))
  path = os.path.join(workdir, LABEL_CONVENTION_FILE)
  try:
    with open(path) as f:
      if json.load(f) == record:
        return record
  except (OSError, ValueError):
    pass
  write_json_atomic(path, record, indent=2)
  return record


def read_label_convention(workdir):
  """The record of ``record_label_convention`` in ``workdir``, or None (runs made before it
  existed)."""
  try:
    with open(os.path.join(workdir, LABEL_CONVENTION_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# ----------------------------------------------------------------------------------------------
# Training pipeline

# Set in grain worker processes (worker_init_fn): batches are then built directly in shared
# memory, which grain hands to the main process without a copy.
_IN_WORKER = [False]


def _mark_worker(worker_index, worker_count):
  del worker_index, worker_count
  _IN_WORKER[0] = True


def _ensure_flags_parsed():
  """grain's worker processes read absl flags; outside app.run (scripts, tests, notebooks)
  nobody parsed them, so parse the defaults (a no-op under app.run)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1], known_only=True)


class CaseSource:
  """grain random-access source: one small record per cached case (the heavy data stays on disk).

  Its repr is stable (it names the entries), as grain checks sources by repr.
  """

  def __init__(self, entries, boxes):
    self._entries = list(entries)
    self._boxes = [list(b) for b in boxes]

  def __len__(self):
    return len(self._entries)

  def __getitem__(self, index):
    return {'entry': self._entries[index], 'box': self._boxes[index]}

  def __repr__(self):
    digest = hashlib.sha256('\n'.join(self._entries).encode()).hexdigest()[:12]
    return f'CaseSource(n={len(self._entries)}, entries={digest})'


class DrawAugmentation:
  """grain random_map: adds the random choices of one sample (augment.draw)."""

  def __init__(self, opts):
    self.opts = opts

  def __call__(self, record, rng):
    return {**record, 'params': augment.draw(record['box'], self.opts, rng)}


_MADV_POPULATE_WRITE = getattr(mmap, 'MADV_POPULATE_WRITE', 23)
_OPEN = collections.OrderedDict()
_OPEN_MAX = 64
_OPEN_LOCK = threading.Lock()


def _open_entry(entry):
  """Memory-mapped arrays of a cache entry, kept open for the most recent _OPEN_MAX entries.

  Re-mapping a file costs a page fault per 4 KiB on every access; a mapping kept open is
  already populated (about 20 ms per 160x192x128x4 sample saved when the data fits in RAM).
  """
  st = os.stat(os.path.join(entry, 'image.npy'))
  key = (entry, st.st_ino, st.st_mtime_ns)   # a rebuilt entry is a new file
  with _OPEN_LOCK:   # builder threads share the table
    arrays = _OPEN.get(key)
    if arrays is not None:
      _OPEN.move_to_end(key)
      return arrays
  arrays = cache.load_arrays(entry)
  with _OPEN_LOCK:
    _OPEN[key] = arrays
    while len(_OPEN) > _OPEN_MAX:
      _OPEN.popitem(last=False)
  return arrays


class AssembleBatch:
  """grain batch_fn: reads and augments every sample of a batch into the output arrays."""

  def __init__(self, opts):
    self.opts = opts

  def _empty(self, shape, dtype):
    if not _IN_WORKER[0]:
      return np.empty(shape, dtype)
    arr = grain.multiprocessing.SharedMemoryArray(shape, dtype)
    try:
      # Fault in all pages with one call (Linux >= 5.14): fresh shared memory costs a page
      # fault per 4 KiB otherwise.
      arr.shm._mmap.madvise(_MADV_POPULATE_WRITE)  # pylint: disable=protected-access
    except (AttributeError, OSError, ValueError):
      pass
    return arr

  def __call__(self, records):
    shape = (len(records),) + tuple(self.opts.input_shape) + (4,)
    image, label = self._empty(shape, np.float32), self._empty(shape, layouts.TRAIN_LABEL_DTYPE)
    for b, rec in enumerate(records):
      img, codes = _open_entry(rec['entry'])
      augment.assemble(img, codes, rec['params'], self.opts, image[b], label[b])
      cache.check_finite(image[b], rec['entry'], 'its training sample')
    return {'image': image, 'label': label}


def _derived_seed(seed, purpose):
  return int(np.random.SeedSequence([int(seed) % 2**32, purpose]).generate_state(1)[0])


def build_train_dataset(entries, boxes, opts, batch_size, seed):
  """The grain MapDataset of batches: element i is batch i (a pure function of seed and i)."""
  ds = grain.MapDataset.source(CaseSource(entries, boxes))
  ds = ds.shuffle(seed=_derived_seed(seed, 1)).repeat()
  ds = ds.random_map(DrawAugmentation(opts), seed=_derived_seed(seed, 2))
  return ds.batch(batch_size, drop_remainder=True, batch_fn=AssembleBatch(opts))


class TrainIterator:
  """Infinite iterator of training batches with get_state()/set_state() (JSON bytes).

  The state is the number of batches already delivered plus a signature of the pipeline;
  restoring into a pipeline with another signature (other cases, seed, batch size, shapes)
  raises ValueError. The worker count is not part of it.
  """

  def __init__(self, dataset, *, worker_count, threads, signature, case_ids, skipped_cases,
               batch_size):
    self._dataset = dataset
    self._workers = int(worker_count)
    self._threads = int(threads)
    self._signature = signature
    self.case_ids = list(case_ids)
    self.skipped_cases = list(skipped_cases)
    self.batch_size = batch_size
    self._step = 0
    self._it = None

  def _start(self):
    ds = self._dataset[self._step:] if self._step else self._dataset
    if self._workers > 0:
      # Each worker builds its batches synchronously (a thread prefetch buffer inside a worker
      # would hold shared-memory batches that nobody unlinks when the worker stops); the
      # workers' output queues do the prefetching.
      read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    else:
      # `threads` batches are built at once, in order, and as many wait ready.
      read = grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=self._threads)
    ids = ds.to_iter_dataset(read)
    if self._workers > 0:
      _ensure_flags_parsed()
      ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers,
                                                         per_worker_buffer_size=2),
                            worker_init_fn=_mark_worker)
    self._it = iter(ids)

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      self._start()
    batch = next(self._it)
    self._step += 1
    return batch

  def get_state(self):
    return json.dumps({'step': self._step, 'pipeline': self._signature}).encode()

  def set_state(self, state):
    if isinstance(state, (bytes, bytearray)):
      state = state.decode()
    if isinstance(state, str):
      state = json.loads(state)
    if state.get('pipeline') != self._signature:
      raise ValueError('the saved data-iterator state belongs to another input pipeline '
                       f'(saved: {state.get("pipeline")}, now: {self._signature}); the '
                       'training cases, seed, batch size or input shape changed')
    self.close()
    self._step = int(state['step'])

  def close(self):
    if self._it is not None and hasattr(self._it, 'close'):
      self._it.close()
    self._it = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def make_train_loader(dataset: Dataset, batch_size, seed, process_index=0, process_count=1,
                      worker_count=None, threads=None):
  """The training input pipeline over ``dataset``'s training cases (see module doc)."""
  config = dataset.config
  data_cfg = config.data
  ids = dataset.ids('train')
  if not ids:
    raise DataError('no usable training case (all skipped or the train split is empty)')
  ids = ids[process_index::process_count]
  if not ids:
    raise DataError(f'process {process_index} of {process_count} has no training case: '
                    f'{len(dataset.split["train"])} cases for {process_count} processes')
  entries = [dataset.entries[i] for i in ids]
  boxes = [cache.load_meta(e)['box_size'] for e in entries]
  opts = augment.AugmentOptions.from_config(config)
  if data_cfg.worker_kind not in ('threads', 'processes'):
    raise ValueError("data.worker_kind must be 'threads' or 'processes', got "
                     f'{data_cfg.worker_kind!r}')
  if worker_count is None:
    worker_count = data_cfg.workers if data_cfg.worker_kind == 'processes' else 0
  if threads is None:
    threads = data_cfg.workers if data_cfg.worker_kind == 'threads' else 0
  workers = int(worker_count)
  signature = {
      'cases': hashlib.sha256('\n'.join(ids).encode()).hexdigest()[:12],
      'cache': os.path.basename(dataset.cache_folder), 'seed': int(seed),
      'batch_size': int(batch_size),
      'process': [int(process_index), int(process_count)],
      'augment': dataclasses.asdict(opts)}
  signature['augment']['input_shape'] = list(opts.input_shape)
  if dataset.skipped:
    logging.warning('Training without %d bad case(s): %s', len(dataset.skipped),
                    ', '.join(dataset.skipped_ids))
  logging.info('Training input: %d cases (process %d of %d), batch %d, %d worker processes, '
               '%d threads', len(ids), process_index, process_count, batch_size, workers,
               threads)
  batches = build_train_dataset(entries, boxes, opts, batch_size, seed)
  return TrainIterator(batches, worker_count=workers, threads=threads, signature=signature,
                       case_ids=ids, skipped_cases=dataset.skipped_ids, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass
class EvalCase:
  case_id: str
  image: np.ndarray         # float32 [H, W, D, 4]
  label: np.ndarray         # float32 [H, W, D, 4] one-hot output channels
  codes: np.ndarray         # uint8 [H, W, D] canonical label codes
  meta: dict                # for restore_geometry / write_nifti
  spacing: tuple            # mm per voxel along H, W, D (model space)


def centre_crop(image, meta, size):
  """The centred `size` window of a box array (and its meta); padded with 0 if smaller."""
  new_meta, offset = preprocess.centre_window(meta, size)
  return preprocess.crop_or_pad(np.asarray(image), offset, tuple(size)), new_meta


class EvalCases(Sequence):
  """Evaluation cases in sorted id order, read lazily from the cache."""

  def __init__(self, entries, input_shape, full_box, skipped_cases=()):
    self._entries = list(entries)     # [(case id, folder)]
    self._input_shape = tuple(input_shape)
    self._full_box = full_box
    self.skipped_cases = list(skipped_cases)

  @property
  def case_ids(self):
    return [cid for cid, _ in self._entries]

  def __len__(self):
    return len(self._entries)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    cid, folder = self._entries[index]
    meta = cache.load_meta(folder)
    image, codes = cache.load_arrays(folder, mmap=True)
    if self._full_box:
      image, codes = np.array(image), np.array(codes)
    else:
      image, new_meta = centre_crop(image, meta, self._input_shape)
      codes, _ = centre_crop(codes, meta, self._input_shape)
      meta = new_meta
    cache.check_finite(image, folder, 'its evaluation input')
    return EvalCase(case_id=cid, image=image, label=layouts.codes_to_onehot(codes), codes=codes,
                    meta=meta, spacing=tuple(float(s) for s in meta['spacing']))


def load_eval_cases(dataset: Dataset, split='test', full_box=False):
  """The cases of ``split`` ('test' or 'val', also 'train') for evaluation (see module doc)."""
  ids = dataset.ids(split)
  return EvalCases([(i, dataset.entries[i]) for i in ids], dataset.config.data.input_shape,
                   full_box, dataset.skipped_ids)


# ----------------------------------------------------------------------------------------------
# New patients


def preprocess_patient(paths, config, case_id='patient'):
  """Modality name -> NIfTI path (any non-empty subset) -> (image box, meta); see module doc."""
  return preprocess.preprocess_files(paths, preprocess.Settings.from_config(config),
                                     case_id=case_id)


def settings(config) -> preprocess.Settings:
  return preprocess.Settings.from_config(config)


__all__ = ['resolve_root', 'discover', 'make_split', 'prepare', 'make_train_loader',
           'load_eval_cases', 'preprocess_patient', 'restore_geometry', 'write_nifti',
           'header_from_meta', 'centre_crop', 'TrainIterator', 'EvalCase', 'EvalCases',
           'BadCaseError', 'DataError', 'settings']
