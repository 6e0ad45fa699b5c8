"""Compiled programs kept between runs under a key known before tracing: warm starts that
neither trace nor lower.

JAX's persistent compilation cache (``compile_cache``) is keyed by the lowered program, so a
start still traces and lowers each program (7-14 s for the training step on a CPU) before it
can look it up. This cache keys an executable by what produces it:

  * the caller's name and fingerprint (the config as JSON, steps per epoch, batch size, ...);
  * the package's source (every .py and .cc file of ``mstkd_jax``) and the versions of jax,
    jaxlib, flax and optax;
  * the backend, its version, the devices the program runs on, ``XLA_FLAGS``, the route of the
    3D convolutions (``MSTKD_CONV`` and the data types oneDNN serves) and the machine
    (``compile_cache.machine_tag``).

A change to any of them gives another key. Entries are files in ``executables/`` inside the
folder of the compilation cache (none when that cache is off or JAX's default folder is not
ours; one process only: multi-process jobs use the compilation cache alone), written
atomically; the ``MAX_ENTRIES`` most recently used are kept. A program that the compilation
cache supplied is kept from that cache's own bytes (see ``obtain``). An entry that cannot be
read or loaded (truncated, corrupted, from another library build) is logged, deleted, and the
program is compiled again. Besides executables an entry can hold a picklable value
(``store_value``): the shapes of the train state, which would otherwise take a trace to know,
and a small initial state.

``prefetch(key)`` starts loading an entry in a thread (XLA deserialises it without holding
Python's lock): the training step loads while the state is initialised or restored.
"""

import concurrent.futures
import hashlib
import io
import json
import os
import pickle
import platform
import threading
import time

import jax
import numpy as np
from absl import logging

from mstkd_jax import compile_cache
from mstkd_jax import fileio

FORMAT = 1
MAX_ENTRIES = 16
FOLDER = 'executables'
_PACKAGE = os.path.dirname(os.path.abspath(__file__))

_lock = threading.Lock()
_prefetched = {}
_source = []


def source_digest():
  """SHA-256 of the package's .py and .cc files (paths and contents), computed once."""
  with _lock:
    if not _source:
      digest = hashlib.sha256()
      for folder, dirs, files in os.walk(_PACKAGE):
        dirs.sort()
        for name in sorted(files):
          if name.endswith(('.py', '.cc')):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, _PACKAGE).encode() + b'\0')
            with open(path, 'rb') as f:
              digest.update(f.read() + b'\0')
      _source.append(digest.hexdigest())
    return _source[0]


def _versions():
  import flax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  return {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
          'optax': optax.__version__, 'python': platform.python_version()}


def _convolutions():
  """How 3D convolutions are traced here: ``MSTKD_CONV`` and the dtypes oneDNN serves (this
  loads oneDNN's handlers, which a loaded executable calls)."""
  from mstkd_jax.native import onednn  # pylint: disable=import-outside-toplevel
  if onednn.mode() == 'xla' or jax.default_backend() != 'cpu':
    return [onednn.mode(), []]
  return [onednn.mode(), sorted(np.dtype(d).name for d in onednn.load())]


def folder():
  """``<compilation cache>/executables``, or None when there is no cache of ours."""
  base = compile_cache.directory()
  if base is None or jax.process_count() > 1:
    return None
  return os.path.join(base, FOLDER)


def key(name, fingerprint, devices):
  """The entry's key (hex), or None when the cache is off. ``fingerprint``: any JSON-able
  value that, with the package's source, determines the program; ``devices``: those it runs
  on."""
  if folder() is None:
    return None
  backend = jax.devices()[0].client
  parts = {'format': FORMAT, 'name': name, 'fingerprint': fingerprint,
           'source': source_digest(), 'versions': _versions(),
           'backend': [backend.platform, backend.platform_version],
           'devices': [[d.id, d.device_kind] for d in devices],
           'xla_flags': os.environ.get('XLA_FLAGS', ''), 'convolutions': _convolutions(),
           'machine': compile_cache.machine_tag()}
  text = json.dumps(parts, sort_keys=True, default=str)
  return f'{name}-{hashlib.sha256(text.encode()).hexdigest()[:32]}'


def _path(entry_key):
  return os.path.join(folder(), entry_key + '.pkl')


def _read(entry_key):
  """The unpickled entry, or None (absent; unreadable ones are deleted)."""
  path = _path(entry_key)
  if not os.path.exists(path):
    return None
  try:
    with open(path, 'rb') as f:
      entry = pickle.load(f)
    if not isinstance(entry, dict) or entry.get('format') != FORMAT:
      raise ValueError('not an entry of this format')
    os.utime(path)
    return entry
  except Exception as e:  # pylint: disable=broad-except
    _discard(path, e)
    return None


def _discard(path, error):
  logging.warning('executable cache: %s unusable (%s: %s); removed, the program is compiled',
                  os.path.basename(path), type(error).__name__, str(error)[:200])
  try:
    os.remove(path)
  except OSError:
    pass


def _write(entry_key, entry):
  entry = dict(entry, format=FORMAT)
  try:
    fileio.write_bytes_atomic(_path(entry_key), pickle.dumps(entry, protocol=4))
    _prune()
  except OSError as e:
    logging.warning('executable cache: cannot write %s (%s)', entry_key, e)


def _prune():
  paths = [os.path.join(folder(), n) for n in os.listdir(folder()) if n.endswith('.pkl')]
  paths.sort(key=os.path.getmtime, reverse=True)
  for path in paths[MAX_ENTRIES:]:
    try:
      os.remove(path)
    except OSError:
      pass


def _load_now(entry_key, devices):
  from jax.experimental import serialize_executable  # pylint: disable=import-outside-toplevel
  entry = _read(entry_key)
  if entry is None:
    return None
  try:
    return serialize_executable.deserialize_and_load(
        entry['executable'], entry['in_tree'], entry['out_tree'],
        execution_devices=list(devices))
  except Exception as e:  # pylint: disable=broad-except
    _discard(_path(entry_key), e)
    return None


def prefetch(entry_key, devices):
  """Starts loading the executable ``entry_key`` in a thread (``load`` then waits for it);
  nothing when the key is None or no entry exists."""
  if entry_key is None or not os.path.exists(_path(entry_key)):
    return
  with _lock:
    if entry_key not in _prefetched:
      pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='mstkd-load')
      _prefetched[entry_key] = pool.submit(_load_now, entry_key, tuple(devices))
      pool.shutdown(wait=False)


def load(entry_key, devices):
  """The executable of ``entry_key`` (``jax.stages.Compiled``), or None (no key, no entry,
  or an entry that failed to load: it is deleted)."""
  if entry_key is None:
    return None
  with _lock:
    future = _prefetched.pop(entry_key, None)
  return future.result() if future is not None else _load_now(entry_key, devices)


def _serialize(compiled, executable_bytes=None):
  """(bytes, in_tree, out_tree) of ``jax.experimental.serialize_executable.serialize``, with
  ``executable_bytes`` (XLA's serialised executable) in place of the program's own when
  given."""
  from jax.experimental import serialize_executable  # pylint: disable=import-outside-toplevel
  if executable_bytes is None:
    return serialize_executable.serialize(compiled)
  from jax._src.lib import xla_client  # pylint: disable=import-outside-toplevel

  class Pickler(serialize_executable._JaxPjrtPickler):  # pylint: disable=protected-access
    def persistent_id(self, obj):
      if isinstance(obj, xla_client.LoadedExecutable):
        return ('exec', executable_bytes)
      return super().persistent_id(obj)

  # pylint: disable=protected-access  (what serialize_executable.serialize pickles)
  if compiled._params.const_args:
    raise ValueError('a program with constant arguments')
  args_info, in_tree = jax.tree_util.tree_flatten(compiled.args_info)
  unloaded = compiled._executable._unloaded_executable
  with io.BytesIO() as f:
    Pickler(f).dump((unloaded, args_info, compiled._no_kwargs))
    return f.getvalue(), in_tree, compiled.out_tree


def _cached_executable(raw):
  """XLA's serialised executable inside a compilation-cache entry (compressed, its compile
  time in front: jax._src.compilation_cache's format)."""
  from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel
  executable, _ = compilation_cache.extract_executable_and_time(
      compilation_cache.decompress_executable(raw))
  return executable


def store(entry_key, compiled, cache_entry=None):
  """Writes ``compiled`` under ``entry_key`` (nothing when the key is None or the program
  cannot be serialised). ``cache_entry``: the compilation-cache entry it was loaded from,
  whose bytes are kept instead of the program's own (see ``obtain``)."""
  if entry_key is None:
    return
  try:
    executable = None if cache_entry is None else _cached_executable(cache_entry)
    data, in_tree, out_tree = _serialize(compiled, executable)
  except Exception as e:  # pylint: disable=broad-except
    logging.info('executable cache: %s not kept (%s: %s)', entry_key, type(e).__name__, e)
    return
  _write(entry_key, {'executable': data, 'in_tree': in_tree, 'out_tree': out_tree})


def has(entry_key):
  """Whether an entry exists under ``entry_key`` (False when the key is None)."""
  return entry_key is not None and os.path.exists(_path(entry_key))


def load_value(entry_key):
  """The value stored under ``entry_key`` by ``store_value``, or None."""
  if entry_key is None:
    return None
  entry = _read(entry_key)
  return None if entry is None else entry.get('value')


def store_value(entry_key, value):
  """Keeps a small picklable ``value`` under ``entry_key`` (nothing when the key is None)."""
  if entry_key is not None:
    _write(entry_key, {'value': value})


def obtain(entry_key, devices, lower, compiler_options=None):
  """The executable of ``entry_key`` from this cache, else ``lower().compile(...)`` (through
  the compilation cache) and stored here. Inside ``compile_cache.timed`` blocks a load is
  reported as 'loaded from the executable cache'.

  A program the compilation cache supplied is stored from that cache's bytes: with jax 0.10
  an executable loaded from there serialises again without its kernels (running the copy
  fails with 'Function ... not found')."""
  t0 = time.perf_counter()
  compiled = load(entry_key, devices)
  if compiled is not None:
    compile_cache.note_restored(time.perf_counter() - t0)
    return compiled
  compile_cache.take_last_read()
  with compile_cache.timed('', log=False) as tally:
    compiled = lower().compile(compiler_options)
  entry = compile_cache.take_last_read()
  if not tally.loaded:
    store(entry_key, compiled)
  elif entry is not None:
    store(entry_key, compiled, cache_entry=entry)
  elif entry_key is not None:
    logging.info('executable cache: %s not kept (loaded from a compilation cache it cannot '
                 'read)', entry_key.split('-')[0])
  return compiled
