"""The preprocessing cache: one folder per case of uncompressed, memory-mappable arrays.

Layout::

  <cache_dir>/<fingerprint>/settings.json          what the fingerprint stands for
  <cache_dir>/<fingerprint>/<case_id>/image.npy    float32 [bx, by, bz, 4] (the box, see preprocess)
  <cache_dir>/<fingerprint>/<case_id>/label.npy    uint8 canonical label codes [bx, by, bz]
  <cache_dir>/<fingerprint>/<case_id>/meta.json    preprocess metadata + the source files' stats

The fingerprint hashes the preprocessing settings (input shape, normalisation, spacing, code
version) and the data root, so changing any of them uses a new folder. Within it, an entry is
valid only if the source files still have the size and mtime recorded in meta.json and its
arrays still have the CRC-32 checksums recorded there when they were written (``checksums``;
verified once per process and entry by ``build_cache``, in threads). An entry whose file no
longer matches its checksum (bit rot, a half-synced shared filesystem, an incomplete copy) is
rebuilt with a warning naming the case; an entry written without checksums (by an older
version) is rebuilt too.

Nothing is written half: an entry is assembled in a temporary folder (``.tmp-*``) and renamed
into place in one step, so an interrupted build leaves at most a temporary folder, which is
never read and is removed by the next build.
"""

import concurrent.futures
import json
import multiprocessing
import os
import shutil
import threading
import time
import uuid
import zlib

from absl import logging
import numpy as np

from mstkd_jax.data import preprocess
from mstkd_jax.fileio import write_json_atomic
from mstkd_jax.logging_utils import Progress
from mstkd_jax.data.layouts import BadCaseError, DataError

ENTRY_FILES = ('image.npy', 'label.npy', 'meta.json')
ARRAY_FILES = ('image.npy', 'label.npy')
CHECKSUM = 'crc32'
_CHUNK = 8 << 20
_VERIFY_THREADS = 4
_VERIFIED = set()           # (entry, stats of its arrays) verified by this process
_VERIFIED_LOCK = threading.Lock()


def cache_folder(cache_dir, settings, root):
  fp = settings.fingerprint(extra={'root': os.path.realpath(root)})
  return os.path.join(cache_dir, fp)


def file_checksum(path):
  """The CRC-32 of a file's bytes, as 8 hex digits (read in chunks of 8 MiB)."""
  crc = 0
  buffer = bytearray(_CHUNK)
  view = memoryview(buffer)
  with open(path, 'rb', buffering=0) as f:
    while True:
      n = f.readinto(buffer)
      if not n:
        break
      crc = zlib.crc32(view[:n], crc)
  return f'{crc:08x}'


def entry_problem(folder, case):
  """Why ``folder`` is not a complete entry built from the current files of ``case`` (missing,
  incomplete, stale, written without checksums, arrays of the wrong shape), or None. The
  checksums themselves are compared by ``checksum_problem``."""
  meta_path = os.path.join(folder, 'meta.json')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except FileNotFoundError:
    return 'not built yet'
  except (OSError, ValueError):
    return 'meta.json cannot be read'
  if not meta.get('complete') or meta.get('case_id') != case.case_id:
    return 'incomplete'
  try:
    if meta.get('sources') != preprocess.case_sources(case):
      return 'its source files changed'
  except OSError:
    return 'its source files cannot be read'
  if meta.get('checksum') != CHECKSUM or set(meta.get('checksums') or ()) != set(ARRAY_FILES):
    return 'written without checksums (by an older version)'
  for name, shape in (('image.npy', meta['box_size'] + [4]), ('label.npy', meta['box_size'])):
    try:
      arr = np.load(os.path.join(folder, name), mmap_mode='r')
    except (OSError, ValueError):
      return f'{name} cannot be read'
    if list(arr.shape) != list(shape):
      return f'{name} has the wrong shape'
  return None


def entry_is_valid(folder, case):
  """True when `folder` holds a complete entry built from the current files of `case`."""
  return entry_problem(folder, case) is None


def _array_stats(folder):
  out = []
  for name in ARRAY_FILES:
    st = os.stat(os.path.join(folder, name))
    out.append((st.st_ino, st.st_size, st.st_mtime_ns))
  return tuple(out)


def checksum_problem(folder):
  """None when the arrays of the entry ``folder`` have the checksums recorded in its
  meta.json, else what differs. Each entry is read once per process (until it is rebuilt)."""
  try:
    key = (os.path.realpath(folder), _array_stats(folder))
  except OSError as e:
    return f'cannot be read ({e.strerror})'
  with _VERIFIED_LOCK:
    if key in _VERIFIED:
      return None
  recorded = load_meta(folder).get('checksums', {})
  for name in ARRAY_FILES:
    try:
      now = file_checksum(os.path.join(folder, name))
    except OSError as e:
      return f'{name} cannot be read ({e.strerror})'
    if now != recorded.get(name):
      return (f'{name} does not match the checksum recorded when it was written ({CHECKSUM} '
              f'{recorded.get(name)}, now {now}): the file changed since (a disk error, an '
              'incomplete copy or sync)')
  with _VERIFIED_LOCK:
    _VERIFIED.add(key)
  return None


def verify_entries(entries, threads=_VERIFY_THREADS):
  """{case id: problem} of the entries ({case id: folder}) whose checksums do not match."""
  items = sorted(entries.items())
  if not items:
    return {}
  with concurrent.futures.ThreadPoolExecutor(min(threads, len(items))) as pool:
    problems = pool.map(checksum_problem, [folder for _, folder in items])
    return {case_id: p for (case_id, _), p in zip(items, problems) if p}


def build_entry(case, settings, folder):
  """Preprocesses one case into `folder` atomically. Returns its meta; raises BadCaseError."""
  sources = preprocess.case_sources(case)
  raw = preprocess.read_case(case, require_label=True)
  image, codes, meta = preprocess.preprocess(raw, settings)
  del raw
  meta['sources'] = sources
  meta['complete'] = True
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.tmp-{case.case_id}-{uuid.uuid4().hex[:8]}')
  os.makedirs(tmp)
  try:
    np.save(os.path.join(tmp, 'image.npy'), np.ascontiguousarray(image, np.float32))
    np.save(os.path.join(tmp, 'label.npy'), np.ascontiguousarray(codes, np.uint8))
    meta['checksum'] = CHECKSUM
    meta['checksums'] = {name: file_checksum(os.path.join(tmp, name)) for name in ARRAY_FILES}
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump(meta, f, indent=1)
    if os.path.exists(folder):
      # A stale entry (changed source files): move it away, then put the new one in place.
      trash = os.path.join(parent, f'.tmp-old-{case.case_id}-{uuid.uuid4().hex[:8]}')
      try:
        os.rename(folder, trash)
      except OSError:
        trash = None
      if trash:
        shutil.rmtree(trash, ignore_errors=True)
    try:
      os.rename(tmp, folder)
      with _VERIFIED_LOCK:
        _VERIFIED.add((os.path.realpath(folder), _array_stats(folder)))
    except OSError:
      # Another process put a complete entry in place meanwhile: keep that one.
      if not entry_is_valid(folder, case):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return meta


def _build_one(case, settings, folder):
  """Worker function: ('ok', case_id, None) or ('bad', case_id, problems)."""
  try:
    build_entry(case, settings, folder)
    return 'ok', case.case_id, None
  except BadCaseError as e:
    return 'bad', case.case_id, e.problems


def _remove_stale_temporaries(folder, max_age_s=3600):
  """Removes temporary folders of interrupted builds (older than an hour: not in progress)."""
  if not os.path.isdir(folder):
    return
  now = time.time()
  for name in os.listdir(folder):
    path = os.path.join(folder, name)
    if name.startswith('.tmp-'):
      try:
        if now - os.path.getmtime(path) > max_age_s:
          shutil.rmtree(path, ignore_errors=True)
      except OSError:
        pass


def build_cache(cases, settings, root, cache_dir, *, workers=0, on_bad_case='error',
                progress=True):
  """Makes sure every case has a valid cache entry, building the missing ones in parallel.

  Entries that look complete have their checksums verified (once per process, in threads);
  one that fails is rebuilt with a warning naming the case.

  Returns (folder of this fingerprint, {case_id: entry folder}, [problems of skipped cases]).
  With on_bad_case='error' the first bad case raises BadCaseError (after the others finished);
  with 'skip' bad cases are left out, each logged as a warning.
  """
  if on_bad_case not in ('error', 'skip'):
    raise ValueError(f"data.on_bad_case must be 'error' or 'skip', got {on_bad_case!r}")
  folder = cache_folder(cache_dir, settings, root)
  os.makedirs(folder, exist_ok=True)
  settings_path = os.path.join(folder, 'settings.json')
  if not os.path.exists(settings_path):
    write_json_atomic(settings_path, {**settings.as_dict(), 'root': os.path.realpath(root)})
  _remove_stale_temporaries(folder)
  entries, todo, skipped, old = {}, [], [], 0
  for case in cases:
    entry = os.path.join(folder, case.case_id)
    problem = entry_problem(entry, case)
    if problem is None:
      entries[case.case_id] = entry
    elif case.problems:
      skipped.append(case.problems)
    else:
      old += problem.startswith('written without checksums')
      todo.append(case)
  if old:
    logging.info('%d cache entries of %s were written without checksums (by an older version):'
                 ' rebuilding them', old, folder)
  by_id = {case.case_id: case for case in cases}
  for case_id, problem in verify_entries(entries).items():
    logging.warning('preprocessing cache of case %s (%s): %s; rebuilding it', case_id,
                    entries.pop(case_id), problem)
    todo.append(by_id[case_id])
  if todo:
    logging.info('Preprocessing %d of %d cases into %s (%d workers)', len(todo), len(cases),
                 folder, workers)
    bar = Progress(len(todo), 'preprocessing', unit='case', enabled=progress)
    jobs = [(c, settings, os.path.join(folder, c.case_id)) for c in todo]
    try:
      if workers and workers > 0 and len(todo) > 1:
        # 'spawn': safe when the parent already runs JAX threads (fork would not be).
        ctx = multiprocessing.get_context('spawn')
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)),
                                                    mp_context=ctx) as pool:
          futures = [pool.submit(_build_one, *job) for job in jobs]
          for fut in concurrent.futures.as_completed(futures):
            _collect(fut.result(), folder, entries, skipped)
            bar.update(1)
      else:
        for job in jobs:
          _collect(_build_one(*job), folder, entries, skipped)
          bar.update(1)
    finally:
      bar.close()
  for problems in skipped:
    for p in problems:
      logging.warning('bad case %s', p)
  if skipped and on_bad_case == 'error':
    raise BadCaseError([p for problems in skipped for p in problems],
                       hint=f'{len(skipped)} of {len(cases)} cases unusable; '
                       '--config.data.on_bad_case=skip leaves them out')
  if skipped:
    logging.warning('Skipping %d bad case(s) of %d (data.on_bad_case=skip): %s', len(skipped),
                    len(cases), ', '.join(sorted({ps[0].case for ps in skipped})))
  return folder, entries, skipped


def _collect(result, folder, entries, skipped):
  status, case_id, problems = result
  if status == 'ok':
    entries[case_id] = os.path.join(folder, case_id)
  else:
    skipped.append(problems)


def check_finite(array, entry, what):
  """Raises DataError naming the case of the cache ``entry`` when ``array`` (``what``: its
  training sample, its evaluation input) holds NaN or infinite values."""
  if np.isfinite(array).all():
    return
  nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
  raise DataError(f'case {os.path.basename(entry)}: {what} holds {nan} NaN and {inf} infinite '
                  f'values (cache entry {entry}); delete that folder to rebuild it from the '
                  'source files, and check them with python -m mstkd_jax.data.check')


def load_meta(entry):
  with open(os.path.join(entry, 'meta.json')) as f:
    return json.load(f)


def load_arrays(entry, mmap=True):
  """(image [bx,by,bz,4] float32, codes [bx,by,bz] uint8), memory-mapped by default."""
  mode = 'r' if mmap else None
  return (np.load(os.path.join(entry, 'image.npy'), mmap_mode=mode),
          np.load(os.path.join(entry, 'label.npy'), mmap_mode=mode))
