"""The persistent compilation cache (mstkd_jax/compile_cache.py): where it goes, its off
switches, what it logs, and that an entry is written whole or not at all."""

import json
import os
import subprocess
import sys

import pytest

from mstkd_jax import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process: turn the cache on, compile one small program inside ``timed``, report.
PROBE = r'''
import json, os, sys
from absl import logging
logging.set_verbosity(logging.INFO)
from mstkd_jax import compile_cache
folder = compile_cache.enable()
import jax, jax.numpy as jnp
with compile_cache.timed('the probe') as tally:
  jax.jit(lambda x: jnp.tanh(x @ x.T).sum()).lower(jax.ShapeDtypeStruct((32, 32), jnp.float32)).compile()
print(json.dumps({'folder': folder, 'compiled': tally.compiled, 'loaded': tally.loaded,
                  'text': tally.text, 'jax_dir': jax.config.jax_compilation_cache_dir}))
'''


def _probe(**env):
  environ = {k: v for k, v in os.environ.items()
             if not k.startswith(('JAX_COMPILATION_CACHE', 'JAX_ENABLE_COMPILATION_CACHE',
                                  'MSTKD_COMPILE_CACHE', 'MSTKD_CACHE_DIR'))}
  # Every program is written, however fast it compiled (the default skips those under 0.5 s).
  environ.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                 **env)
  proc = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True, cwd=ROOT,
                        env=environ, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _entries(folder):
  return sorted(n for n in os.listdir(folder) if n.endswith('-cache'))


def test_on_by_default_under_mstkd_cache_dir_then_loaded_in_a_fresh_process(tmp_path):
  first, log = _probe(MSTKD_CACHE_DIR=str(tmp_path))
  folder = os.path.join(str(tmp_path), 'xla', compile_cache.machine_tag())
  assert first['folder'] == folder == first['jax_dir']
  assert first['compiled'] >= 1 and first['loaded'] == 0
  assert first['text'].startswith('compiled in ')
  assert f'compilation cache: {folder}' in log and 'the probe: compiled in' in log
  written = _entries(folder)
  assert any(name.startswith('jit__lambda') for name in written)
  assert not [n for n in os.listdir(folder) if n.endswith('.tmp')]

  second, log = _probe(MSTKD_CACHE_DIR=str(tmp_path))
  assert second['loaded'] == first['compiled'] and second['compiled'] == 0
  assert second['text'].startswith('loaded from the compilation cache in ')
  assert 'the probe: loaded from the compilation cache in' in log
  assert _entries(folder) == written


def test_mstkd_compile_cache_0_turns_it_off(tmp_path):
  result, log = _probe(MSTKD_CACHE_DIR=str(tmp_path), MSTKD_COMPILE_CACHE='0')
  assert result['folder'] is None and result['jax_dir'] is None
  assert result['loaded'] == 0 and result['compiled'] >= 1
  assert 'compilation cache: off' in log
  assert not os.path.exists(os.path.join(str(tmp_path), 'xla'))


def test_an_explicit_jax_compilation_cache_dir_is_used_as_is(tmp_path):
  explicit = str(tmp_path / 'jax_own')
  result, _ = _probe(MSTKD_CACHE_DIR=str(tmp_path / 'ours'), JAX_COMPILATION_CACHE_DIR=explicit)
  assert result['folder'] == explicit == result['jax_dir']
  assert _entries(explicit)
  assert not os.path.exists(str(tmp_path / 'ours'))


def test_an_entry_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
  path = str(tmp_path / 'key-cache')
  real_replace = os.replace

  def dies_before_rename(src, dst):
    assert open(src, 'rb').read() == b'complete entry'   # the whole value, in a temporary file
    raise OSError('killed')
  monkeypatch.setattr(os, 'replace', dies_before_rename)
  with pytest.raises(OSError):
    compile_cache.write_atomic(path, b'complete entry')
  assert os.listdir(str(tmp_path)) == []                 # no partial entry, no temporary file

  monkeypatch.setattr(os, 'replace', real_replace)
  compile_cache.write_atomic(path, b'first')
  compile_cache.write_atomic(path, b'second')            # JAX writes only what it could not read
  assert open(path, 'rb').read() == b'second'
  assert os.listdir(str(tmp_path)) == ['key-cache']


def test_an_entry_that_cannot_be_read_is_compiled_again_and_replaced(tmp_path):
  first, _ = _probe(MSTKD_CACHE_DIR=str(tmp_path))
  folder = first['folder']
  probe = [n for n in _entries(folder) if n.startswith('jit__lambda')]
  assert len(probe) == 1, _entries(folder)
  path = os.path.join(folder, probe[0])
  with open(path, 'wb') as f:
    f.write(b'not an executable')                        # a damaged entry
  second, _ = _probe(MSTKD_CACHE_DIR=str(tmp_path))
  assert second['compiled'] >= 1
  with open(path, 'rb') as f:
    assert f.read() != b'not an executable'               # rewritten
  third, log = _probe(MSTKD_CACHE_DIR=str(tmp_path))
  assert third['loaded'] >= 1 and third['compiled'] == 0, log[-2000:]


def test_jax_file_cache_writes_through_the_atomic_put(tmp_path, monkeypatch):
  cls = compile_cache._atomic_cache_class()   # pylint: disable=protected-access
  assert cls is not None, 'jax._src.lru_cache.LRUCache is not where it was (jax 0.10 / 0.11)'
  cache = cls(str(tmp_path), max_size=-1)
  calls = []
  real = compile_cache.write_atomic
  monkeypatch.setattr(compile_cache, 'write_atomic', lambda p, v: (calls.append(p), real(p, v)))
  cache.put('abc', b'value')
  assert calls == [os.path.join(str(tmp_path), 'abc-cache')]
  assert cache.get('abc') == b'value'


def test_describe():
  tally = compile_cache._Tally()   # pylint: disable=protected-access
  assert compile_cache.describe(tally) == 'already compiled in this process'
  tally.compiled, tally.compiled_s = 1, 41.23
  assert compile_cache.describe(tally) == 'compiled in 41.2 s'
  assert compile_cache.describe(tally, wall_s=50.0) == 'compiled in 41.2 s (50.0 s with ' \
      'tracing and lowering)'
  tally.loaded, tally.loaded_s = 2, 0.8
  assert compile_cache.describe(tally) == ('loaded from the compilation cache in 0.80 s, '
                                           'compiled in 41.2 s')
  tally.compiled = 3
  assert compile_cache.describe(tally).endswith('compiled in 41.2 s (3 programs)')
  tally.compiled, tally.compiled_s = 0, 0.0
  assert compile_cache.describe(tally) == 'loaded from the compilation cache in 0.80 s'


def test_machine_tag_names_the_architecture_and_a_feature_hash():
  arch, digest = compile_cache.machine_tag().rsplit('-', 1)
  assert arch and len(digest) == 8 and int(digest, 16) >= 0
