"""The initialisation as training runs it (train.create_state: one trace shared with the
abstract state, the program compiled with build.INIT_COMPILER_OPTIONS) gives the same weights
as a plain ``jax.jit(build.init_state)``, bit for bit."""

import jax
import numpy as np

from mstkd_jax import parallel, train
from mstkd_jax.models import build


def test_create_state_gives_bit_identical_weights(tiny_config, tiny_state):
  assert tiny_config.seed == 0   # tiny_state (conftest) is jit(init_state)(key(0))
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = train.create_state(tiny_config, mesh, steps_per_epoch=10)
  ours = jax.tree_util.tree_leaves_with_path(state)
  reference = jax.tree_util.tree_leaves_with_path(tiny_state)
  assert [p for p, _ in ours] == [p for p, _ in reference]
  differing = [jax.tree_util.keystr(p) for (p, a), (_, b) in zip(ours, reference)
               if not np.array_equal(np.asarray(a), np.asarray(b))]
  assert not differing, differing[:10]


def test_abstract_state_and_the_initialisation_trace_the_networks_once(tiny_config, monkeypatch):
  config = tiny_config.copy_and_resolve_references()
  config.train.epochs = 7          # a config of its own: nothing traced for it yet
  calls = []
  real = build.init_state

  def counting(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)
  monkeypatch.setattr(build, 'init_state', counting)
  assert build.init_function(config, 3) is build.init_function(config, 3)
  assert build.init_function(config, 3) is not build.init_function(config, 4)
  abstract = build.abstract_state(config, 3)
  traced = jax.jit(build.init_function(config, 3)).trace(jax.random.key(1))
  assert len(calls) == 1
  assert jax.tree.structure(traced.out_info) == jax.tree.structure(abstract)


def test_resuming_restores_the_checkpoint_without_initialising(tmp_path, tiny_config,
                                                                 monkeypatch):
  workdir = str(tmp_path / 'run')
  train.train_loop(tiny_config, workdir, train.RandomBatches(tiny_config, 1), 2, max_steps=1)

  def no_initialisation(*args, **kwargs):
    raise AssertionError('a resumed run initialised a fresh state')
  monkeypatch.setattr(train, 'create_state', no_initialisation)
  state = train.train_loop(tiny_config, workdir, train.RandomBatches(tiny_config, 1), 2,
                           max_steps=2)
  assert int(state.step) == 2
