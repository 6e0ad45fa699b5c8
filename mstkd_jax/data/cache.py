"""The preprocessing cache: one folder per case of uncompressed, memory-mappable arrays.

Layout::

  <cache_dir>/<fingerprint>/settings.json          what the fingerprint stands for
  <cache_dir>/<fingerprint>/<case_id>/image.npy    float32 [bx, by, bz, 4] (the box, see preprocess)
  <cache_dir>/<fingerprint>/<case_id>/label.npy    uint8 canonical label codes [bx, by, bz]
  <cache_dir>/<fingerprint>/<case_id>/meta.json    preprocess metadata + the source files' stats

The fingerprint hashes the preprocessing settings (input shape, normalisation, spacing, code
version) and the data root, so changing any of them uses a new folder. Within it, an entry is
valid only if the source files still have the size and mtime recorded in meta.json.

Nothing is written half: an entry is assembled in a temporary folder (``.tmp-*``) and renamed
into place in one step, so an interrupted build leaves at most a temporary folder, which is
never read and is removed by the next build.
"""

import concurrent.futures
import json
import multiprocessing
import os
import shutil
import time
import uuid

from absl import logging
import numpy as np

from mstkd_jax.data import preprocess
from mstkd_jax.fileio import write_json_atomic
from mstkd_jax.logging_utils import Progress
from mstkd_jax.data.layouts import BadCaseError

ENTRY_FILES = ('image.npy', 'label.npy', 'meta.json')


def cache_folder(cache_dir, settings, root):
  fp = settings.fingerprint(extra={'root': os.path.realpath(root)})
  return os.path.join(cache_dir, fp)


def entry_is_valid(folder, case):
  """True when `folder` holds a complete entry built from the current files of `case`."""
  meta_path = os.path.join(folder, 'meta.json')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return False
  if not meta.get('complete') or meta.get('case_id') != case.case_id:
    return False
  try:
    if meta.get('sources') != preprocess.case_sources(case):
      return False
  except OSError:
    return False
  for name, shape in (('image.npy', meta['box_size'] + [4]), ('label.npy', meta['box_size'])):
    try:
      arr = np.load(os.path.join(folder, name), mmap_mode='r')
    except (OSError, ValueError):
      return False
    if list(arr.shape) != list(shape):
      return False
  return True


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
  entries, todo, skipped = {}, [], []
  for case in cases:
    entry = os.path.join(folder, case.case_id)
    if entry_is_valid(entry, case):
      entries[case.case_id] = entry
    elif case.problems:
      skipped.append(case.problems)
    else:
      todo.append(case)
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


def load_meta(entry):
  with open(os.path.join(entry, 'meta.json')) as f:
    return json.load(f)


def load_arrays(entry, mmap=True):
  """(image [bx,by,bz,4] float32, codes [bx,by,bz] uint8), memory-mapped by default."""
  mode = 'r' if mmap else None
  return (np.load(os.path.join(entry, 'image.npy'), mmap_mode=mode),
          np.load(os.path.join(entry, 'label.npy'), mmap_mode=mode))
