"""The executable cache: a warm start loads the programs it compiled before, with the same
results; another config, library version or source is another key; an unreadable entry is
removed and the program compiled again."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mstkd_jax import compile_cache, executable_cache, parallel, programs, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from mstkd_jax.models import build


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  """The executable cache in a folder of this test's own."""
  folder = str(tmp_path / 'executables')
  os.makedirs(folder)
  monkeypatch.setattr(executable_cache, 'folder', lambda: folder)
  return folder


def _program():
  """A small program of its own (a constant unique to this call: the compilation cache never
  has it, and only programs compiled here are kept)."""
  salt = float(time.time_ns() % 1000003) / 1000003
  fn = jax.jit(lambda x, y: {'sum': jnp.sin(x) @ y + salt, 'max': jnp.max(x)})
  x = jnp.arange(12.0).reshape(3, 4) / 7
  y = jnp.ones((4, 2))
  return (lambda: fn.lower(x, y)), (x, y)


def _entries(folder):
  return sorted(n for n in os.listdir(folder) if n.endswith('.pkl'))


def test_a_stored_program_is_loaded_and_gives_the_same_results(cache_dir):
  lower, args = _program()
  devices = jax.devices()[:1]
  key = executable_cache.key('demo', {'a': 1}, devices)
  with compile_cache.timed('demo', log=False) as first:
    compiled = executable_cache.obtain(key, devices, lower)
  assert first.compiled + first.loaded == 1 and first.restored == 0
  assert _entries(cache_dir) == [key + '.pkl']

  def no_lowering():
    raise AssertionError('a stored program was lowered again')
  with compile_cache.timed('demo', log=False) as second:
    loaded = executable_cache.obtain(key, devices, no_lowering)
  assert second.restored == 1 and 'executable cache' in second.text
  for a, b in zip(jax.tree.leaves(compiled(*args)), jax.tree.leaves(loaded(*args))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_key_changes_with_what_makes_the_program(cache_dir, monkeypatch):
  devices = jax.devices()[:1]
  base = executable_cache.key('demo', {'config': {'lr': 1e-4}}, devices)
  assert base == executable_cache.key('demo', {'config': {'lr': 1e-4}}, devices)
  assert base != executable_cache.key('demo', {'config': {'lr': 1e-3}}, devices)
  assert base != executable_cache.key('other', {'config': {'lr': 1e-4}}, devices)
  monkeypatch.setattr(jax, '__version__', '0.0.1')
  assert base != executable_cache.key('demo', {'config': {'lr': 1e-4}}, devices)
  monkeypatch.undo()
  monkeypatch.setattr(executable_cache, 'folder', lambda: cache_dir)
  monkeypatch.setattr(executable_cache, '_source', ['another source'])
  assert base != executable_cache.key('demo', {'config': {'lr': 1e-4}}, devices)
  monkeypatch.setattr(executable_cache, '_source', [])
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false')
  assert base != executable_cache.key('demo', {'config': {'lr': 1e-4}}, devices)
  monkeypatch.setattr(executable_cache, 'folder', lambda: None)
  assert executable_cache.key('demo', {'config': {'lr': 1e-4}}, devices) is None


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'other format', 'bad executable'])
def test_a_damaged_entry_is_removed_and_the_program_compiled(cache_dir, damage):
  lower, args = _program()
  devices = jax.devices()[:1]
  key = executable_cache.key('demo', {'damage': damage}, devices)
  expected = executable_cache.obtain(key, devices, lower)(*args)
  path = os.path.join(cache_dir, key + '.pkl')
  with open(path, 'rb') as f:
    data = f.read()
  if damage == 'truncated':
    data = data[:len(data) // 2]
  elif damage == 'garbage':
    data = b'not a pickle at all'
  elif damage == 'other format':
    executable_cache.store_value(key, 'x')
    data = open(path, 'rb').read().replace(b'format', b'formax')
  with open(path, 'wb') as f:
    f.write(data)
  if damage == 'bad executable':
    import pickle  # pylint: disable=import-outside-toplevel
    with open(path, 'rb') as f:
      entry = pickle.load(f)
    entry['executable'] = entry['executable'][:100] + b'x' * 100
    with open(path, 'wb') as f:
      pickle.dump(entry, f)
  assert executable_cache.load(key, devices) is None
  assert not os.path.exists(path)
  result = executable_cache.obtain(key, devices, lower)(*args)   # compiled, stored again
  assert os.path.exists(path)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(result)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_old_entries_are_pruned(cache_dir, monkeypatch):
  monkeypatch.setattr(executable_cache, 'MAX_ENTRIES', 3)
  for i in range(5):
    executable_cache.store_value(f'value-{i}', i)
    os.utime(os.path.join(cache_dir, f'value-{i}.pkl'), (i, i))
  executable_cache.store_value('value-last', 'last')
  assert _entries(cache_dir) == ['value-3.pkl', 'value-4.pkl', 'value-last.pkl']
  assert executable_cache.load_value('value-4') == 4


def _train(workdir, cache_root):
  """One step of :tiny in a fresh process with its own caches; (log, first metrics record)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAX_COMPILATION_CACHE', 'MSTKD_COMPILE_CACHE'))}
  env.update(MSTKD_CACHE_DIR=cache_root, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  command = [sys.executable, '-m', 'mstkd_jax.main', '--config=configs/brats.py:tiny',
             f'--workdir={workdir}', '--max_steps=1']
  proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return proc.stderr, json.loads(f.readline())


@pytest.mark.slow
def test_a_warm_training_start_loads_both_programs_and_steps_identically(tmp_path):
  """Fresh runs of :tiny: the first compiles and keeps the initialisation, the step and the
  initial state, the second reads them (no tracing) and its first step's numbers equal the
  first run's; so do runs that fill the cache from the compilation cache and load the
  initialisation program from it."""
  cache = str(tmp_path / 'cache')
  cold_log, cold = _train(str(tmp_path / 'cold'), cache)
  assert 'the initialisation program: compiled' in cold_log
  folder = os.path.join(cache, 'xla', compile_cache.machine_tag(), executable_cache.FOLDER)
  kinds = {'init', 'state_shapes', 'initial_state', 'train_step'}
  assert {n.split('-')[0] for n in _entries(folder)} == kinds
  warm_log, warm = _train(str(tmp_path / 'warm'), cache)
  assert 'the initialisation program: not run (the initial state read from the' in warm_log
  assert 'devices): loaded from the executable cache' in warm_log
  assert 'with tracing and lowering' not in warm_log.split('devices): loaded')[1].split('\n')[0]
  numbers = lambda r: {k: v for k, v in r.items() if k not in ('time', 'steps_per_s',
                                                                'volumes_per_s', 'eta_s')}
  assert numbers(warm) == numbers(cold)
  # A compilation cache that has the programs and an executable cache that has not (a machine
  # that trained before this cache existed): the programs are kept from the former's bytes.
  shutil.rmtree(folder)
  log, again = _train(str(tmp_path / 'again'), cache)
  assert 'the initialisation program: loaded from the compilation cache' in log
  assert {n.split('-')[0] for n in _entries(folder)} == kinds
  os.remove(os.path.join(folder, next(n for n in _entries(folder)
                                      if n.startswith('initial_state'))))
  log, last = _train(str(tmp_path / 'last'), cache)
  assert 'the initialisation program: loaded from the executable cache' in log
  assert 'devices): loaded from the executable cache' in log
  assert numbers(again) == numbers(last) == numbers(cold)


def test_the_state_shapes_are_kept(cache_dir, tiny_config):
  mesh = parallel.make_mesh(jax.devices()[:1])
  first = programs.abstract_state(tiny_config, mesh, 5)
  assert any(n.startswith('state_shapes') for n in _entries(cache_dir))
  assert programs.abstract_state(tiny_config, mesh, 5) == first == build.abstract_state(
      tiny_config, 5)


def test_a_small_initial_state_is_kept_and_read_back_bit_for_bit(cache_dir, tiny_config,
                                                                    monkeypatch):
  mesh = parallel.make_mesh(jax.devices()[:1])
  first = programs.create_state(tiny_config, mesh, 3)
  assert any(n.startswith('initial_state') for n in _entries(cache_dir))

  def no_program(*args, **kwargs):
    raise AssertionError('the initialisation program was built although its state is kept')
  monkeypatch.setattr(build, 'init_function', no_program)
  loaded = []
  second = programs.create_state(tiny_config, mesh, 3, after_load=lambda: loaded.append(1))
  assert loaded == [1]
  assert jax.tree.structure(first) == jax.tree.structure(second)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding
  monkeypatch.undo()
  monkeypatch.setattr(executable_cache, 'folder', lambda: cache_dir)
  monkeypatch.setattr(programs, 'STATE_LIMIT_BYTES', 1)
  programs.create_state(tiny_config, mesh, 4)    # too large to keep
  assert not programs.has_initial_state(tiny_config, mesh, 4)
