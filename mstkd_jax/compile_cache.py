"""The persistent XLA compilation cache of every command: a program compiles once per machine.

Every command (training, evaluation, export, predict, visualize, the benchmarks) calls
``enable()`` before it builds anything. Compiled programs are then written to, and on later
starts read from, ``<cache root>/xla/<machine>``:

  cache root   ``$MSTKD_CACHE_DIR``, default ``~/.cache/mstkd_jax`` (the oneDNN binding of
               mstkd_jax/native lives there too, in ``native/``)
  <machine>    the processor architecture and a hash of its instruction-set features: XLA's CPU
               code is built for the host's features, and a cache shared over a cluster's home
               directory must not hand one node's code to another kind of node
  off          ``MSTKD_COMPILE_CACHE=0`` (or JAX's own ``JAX_ENABLE_COMPILATION_CACHE=false``)
  JAX's own    an explicitly set ``JAX_COMPILATION_CACHE_DIR`` (or ``jax_compilation_cache_dir``)
               is used as it is

Programs that compile in under ``MIN_COMPILE_SECONDS`` are not written (JAX's
``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` overrides it). The key of an entry is the lowered
program with the jaxlib version, the device kind and the XLA flags, so a changed network,
config or library simply compiles anew; old entries stay until the folder is deleted.

Several processes and hosts may share the folder (a cluster's shared filesystem): in a
multi-process job only process 0 writes (JAX's rule), and entries are written to a temporary
file and renamed into place, so a reader never sees half an entry and a process killed while
writing leaves none behind (JAX itself writes in place). An entry that cannot be read (a damaged
file) is compiled again and replaced, so only one start pays for it.

``timed(what)`` reports how a program was obtained, one log line each:
``the training step: compiled in 41.2 s`` or ``... loaded from the compilation cache in 0.8 s``
(from ``jax.monitoring``'s compile and cache-hit events).
"""

import contextlib
import hashlib
import os
import platform
import threading
import time

import jax
from absl import logging

from mstkd_jax import fileio

DEFAULT_ROOT = os.path.join('~', '.cache', 'mstkd_jax')
OFF_VALUES = ('0', 'false', 'no', 'off')
MIN_COMPILE_SECONDS = 0.5

_BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'
_CACHE_HIT = '/jax/compilation_cache/cache_hits'

_state = {'enabled': None, 'directory': None}
_lock = threading.Lock()
_last_read = threading.local()


def cache_root():
  """``$MSTKD_CACHE_DIR`` or ``~/.cache/mstkd_jax``: the project's caches live under it."""
  return os.path.expanduser(os.environ.get('MSTKD_CACHE_DIR') or DEFAULT_ROOT)


def machine_tag():
  """``<architecture>-<8 hex digits>``: the processor architecture and a hash of its feature
  flags (``/proc/cpuinfo``; the processor name elsewhere)."""
  features = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(('flags', 'Features')):
          features = ' '.join(sorted(line.split(':', 1)[1].split()))
          break
  except OSError:
    pass
  digest = hashlib.sha256(features.encode()).hexdigest()[:8]
  return f'{platform.machine() or "unknown"}-{digest}'


def default_directory():
  return os.path.join(cache_root(), 'xla', machine_tag())


def is_off():
  """True when ``MSTKD_COMPILE_CACHE`` or JAX's ``jax_enable_compilation_cache`` turn it off."""
  if os.environ.get('MSTKD_COMPILE_CACHE', '').strip().lower() in OFF_VALUES:
    return True
  return not jax.config.jax_enable_compilation_cache


def enable(directory=None):
  """Turns the persistent compilation cache on (once per process; call it before anything is
  compiled). ``directory`` overrides the default folder, not an explicit
  ``JAX_COMPILATION_CACHE_DIR``. Returns the folder in use, or None when the cache is off.
  Logs the choice once."""
  with _lock:
    if _state['enabled'] is not None:
      return _state['directory']
    _state['enabled'] = False
    if is_off():
      logging.info('compilation cache: off (MSTKD_COMPILE_CACHE=0 or JAX_ENABLE_COMPILATION_CACHE'
                   '=false): every program compiles on every start')
      return None
    explicit = jax.config.jax_compilation_cache_dir
    path = explicit or directory or default_directory()
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      logging.warning('compilation cache: cannot create %s (%s); programs compile on every start',
                      path, e)
      return None
    if not explicit:
      jax.config.update('jax_compilation_cache_dir', path)
    if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
      jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
    _use_atomic_writes()
    _listen()
    _state.update(enabled=True, directory=path)
  logging.info('compilation cache: %s (programs compiled once are loaded on later starts; '
               'MSTKD_COMPILE_CACHE=0 turns it off)', path)
  return path


def directory():
  """The folder in use, or None (off, or ``enable`` not called)."""
  return _state['directory']


# ---- writing entries atomically ----

def _atomic_cache_class():
  """A subclass of JAX's file cache (jax._src.lru_cache.LRUCache, the same in jax 0.10 and
  0.11) whose ``put`` writes a temporary file and renames it into place; None if JAX's
  internals differ from what it expects."""
  try:
    from jax._src import lru_cache  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  base = getattr(lru_cache, 'LRUCache', None)
  suffix = getattr(lru_cache, '_CACHE_SUFFIX', None)
  if base is None or suffix is None:
    return None

  class AtomicLRUCache(base):
    """JAX's cache with writes that are all-or-nothing (without a size limit; with one, JAX's
    own locked write is kept), remembering the last entry each thread read."""

    def get(self, key):
      value = super().get(key)
      _last_read.value = value
      return value

    def put(self, key, value):
      folder = str(self.path)
      if getattr(self, 'eviction_enabled', True) or '://' in folder:
        return super().put(key, value)
      if not key:
        raise ValueError('key cannot be empty')
      write_atomic(os.path.join(folder, f'{key}{suffix}'), value)

  return AtomicLRUCache


def take_last_read():
  """The raw bytes of the entry this thread last read from the cache (JAX's format), or None;
  forgotten once taken. ``executable_cache`` keeps a program the cache supplied from them."""
  value = getattr(_last_read, 'value', None)
  _last_read.value = None
  return value


def write_atomic(path, value):
  """Writes ``value`` to ``path`` through a temporary file in the same folder and a rename.

  An existing ``path`` is replaced: JAX writes a key only after it found no usable entry for
  it, so an existing one could not be read (damaged, or written by an incompatible version)
  and would otherwise make every later start recompile. Readers see the old entry or the new
  one, never a mix; two processes that compiled the same program write equal entries."""
  fileio.write_bytes_atomic(path, value)


def _use_atomic_writes():
  try:
    from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  cls = _atomic_cache_class()
  if cls is not None and hasattr(compilation_cache, 'LRUCache'):
    compilation_cache.LRUCache = cls


# ---- what was compiled and what was loaded ----

class _Tally:
  """Compiles seen while a ``timed`` block runs: programs compiled / loaded and their seconds."""

  def __init__(self):
    self.compiled, self.compiled_s = 0, 0.0
    self.loaded, self.loaded_s = 0, 0.0
    self.restored, self.restored_s = 0, 0.0   # from the executable cache (no compile event)


_active = []                       # the tallies of the open ``timed`` blocks
_pending_hit = threading.local()   # a cache hit announced, its compile event still to come
_listening = []


def _on_event(event, *args, **kwargs):
  del args, kwargs
  if event == _CACHE_HIT:
    _pending_hit.value = True


def _on_duration(event, seconds, *args, **kwargs):
  del args, kwargs
  if event != _BACKEND_COMPILE:
    return
  hit = getattr(_pending_hit, 'value', False)
  _pending_hit.value = False
  for tally in list(_active):
    if hit:
      tally.loaded += 1
      tally.loaded_s += seconds
    else:
      tally.compiled += 1
      tally.compiled_s += seconds


def note_restored(seconds):
  """Counts a program loaded from ``executable_cache`` (neither traced nor looked up here) in
  the open ``timed`` blocks."""
  for tally in list(_active):
    tally.restored += 1
    tally.restored_s += seconds


def _listen():
  """Registers the jax.monitoring listeners once per process."""
  if _listening:
    return
  jax.monitoring.register_event_listener(_on_event)
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  _listening.append(True)


def _seconds(value):
  return f'{value:.2f} s' if value < 1 else f'{value:.1f} s'


def describe(tally, wall_s=None):
  """One phrase: 'compiled in 41.2 s', 'loaded from the compilation cache in 0.80 s', 'loaded
  from the executable cache in 2.1 s', several of them, or 'already compiled in this
  process'; with ``wall_s`` (the block's wall time) it adds how long tracing and lowering
  took beyond that when it was more than a second."""
  parts = []
  if tally.restored:
    parts.append(f'loaded from the executable cache in {_seconds(tally.restored_s)}')
  if tally.loaded:
    parts.append(f'loaded from the compilation cache in {_seconds(tally.loaded_s)}')
  if tally.compiled:
    many = f' ({tally.compiled} programs)' if tally.compiled > 1 and tally.loaded else ''
    parts.append(f'compiled in {_seconds(tally.compiled_s)}{many}')
  if not parts:
    return 'already compiled in this process'
  text = ', '.join(parts)
  spent = tally.loaded_s + tally.compiled_s + tally.restored_s
  if wall_s is not None and wall_s - spent > 1.0:
    text += f' ({_seconds(wall_s)} with tracing and lowering)'
  return text


@contextlib.contextmanager
def timed(what, log=True):
  """Tallies the programs compiled or loaded inside the block and logs one line
  ``<what>: <describe(...)>``. Yields the tally: ``compiled``, ``loaded`` (programs) and their
  seconds, and after the block ``wall_s`` and ``text`` (the phrase, with the wall time)."""
  _listen()
  tally = _Tally()
  _active.append(tally)
  start = time.perf_counter()
  try:
    yield tally
  finally:
    _active.remove(tally)
    tally.wall_s = time.perf_counter() - start
    tally.text = describe(tally, tally.wall_s)
    if log:
      logging.info('%s: %s', what, tally.text)
