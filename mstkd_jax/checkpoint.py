"""Orbax checkpoints of training runs.

Layout of a workdir:
  <workdir>/checkpoints/<step>/state     the TrainState (teacher, student, discriminator,
                                         optimiser states, batch statistics, step)
  <workdir>/checkpoints/<step>/data      the input pipeline's iterator state, one JSON file per
                                         process (``process_<i>-of-<n>.json``): every process
                                         reads its own share of the data
  <workdir>/checkpoints/<step>/meta      JSON: config, epoch, step, best validation Dice
  <workdir>/checkpoints/<step>/metrics   JSON: the validation Dice of that step, if any
The manager keeps the last ``config.train.keep_checkpoints`` steps plus the one with the best
validation Dice. Saves are asynchronous and atomic: Orbax writes into a temporary folder and
renames it when complete, so a crash (even kill -9) mid-save leaves the previous checkpoint as
the latest usable one; the leftover temporary folder is removed when a manager next opens the
directory. Every process calls ``save`` and ``restore``; Orbax writes each array shard once.
"""

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

VAL_METRIC = 'val_dice'


# ---- the data-iterator state: one JSON file per process ----

class ProcessJsonHandler(ocp.CheckpointHandler):
  """Saves a JSON-able value per process (``process_<i>-of-<n>.json``) and restores this
  process's own value: data-iterator states differ between processes, which read different
  cases. Restoring with another process count returns None (the file is not there)."""

  @staticmethod
  def _filename(directory):
    return epath.Path(directory) / f'process_{jax.process_index()}-of-{jax.process_count()}.json'

  def save(self, directory, args: 'ProcessJsonSave'):
    self._filename(directory).write_text(json.dumps(args.item))

  def restore(self, directory, args: Optional['ProcessJsonRestore'] = None):
    path = self._filename(directory)
    if not path.exists():
      return None
    return json.loads(path.read_text())

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


def _best_metric(metrics):
  return metrics[VAL_METRIC]


def make_manager(directory, keep=3, read_only=False) -> ocp.CheckpointManager:
  """A CheckpointManager over ``directory`` keeping the last ``keep`` steps and the best
  (highest validation Dice: ``manager.best_step()``)."""
  policy = ocm.AnyPreservationPolicy([
      ocm.LatestN(n=keep),
      ocm.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                keep_checkpoints_without_metrics=False),
  ])
  # best_fn makes Orbax write each step's metrics to disk and rank steps by it (best_step);
  # the preservation policy above decides what is deleted.
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=_best_metric, best_mode='max',
      create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('state', 'data', 'meta'))


def save(manager, step, state, data_state: Any, meta: dict,
         val_dice: Optional[float] = None, force=False):
  """Saves state + this process's iterator state + metadata at ``step`` (asynchronously:
  ``manager.wait_until_finished()`` waits for it). Call it on every process."""
  metrics = {VAL_METRIC: float(val_dice)} if val_dice is not None else None
  return manager.save(
      int(step),
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ProcessJsonSave(data_state),
          meta=ocp.args.JsonSave(meta)),
      metrics=metrics, force=force)


def restore(manager, step, abstract_state, with_data=True):
  """Restores (state, data_state, meta) at ``step`` into the shapes, dtypes and shardings of
  ``abstract_state`` (a pytree of jax.ShapeDtypeStruct, e.g. ``abstract_like``).

  data_state is this process's saved iterator state, or None when there is none (another
  process count, or ``with_data=False``)."""
  items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
  if with_data:
    items['data'] = ProcessJsonRestore()
  restored = manager.restore(int(step), args=ocp.args.Composite(**items))
  data = restored['data'] if with_data else None
  return restored['state'], data, restored['meta']


def best_step(manager) -> Optional[int]:
  """The step with the highest validation Dice, or None when no step has one."""
  scored = [s for s in manager.all_steps() if _scored(manager, s)]
  return manager.best_step() if scored else None


def _scored(manager, step):
  try:
    metrics = manager.metrics(step)
  except Exception:  # pylint: disable=broad-except
    return False
  return bool(metrics) and VAL_METRIC in metrics


def resolve_step(manager, which: Optional[str]) -> int:
  """'latest' (default), 'best' or a step number -> an existing step, or a clear error."""
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}')
  if which in (None, '', 'latest'):
    return manager.latest_step()
  if which == 'best':
    best = best_step(manager)
    if best is None:
      raise FileNotFoundError(f'no checkpoint with a validation score in {manager.directory}')
    return best
  step = int(which)
  if step not in steps:
    raise FileNotFoundError(f'no checkpoint at step {step} in {manager.directory}; '
                            f'available: {sorted(steps)}')
  return step


def abstract_like(tree, sharding=None) -> Any:
  """ShapeDtypeStructs of ``tree`` as an Orbax restore target, with ``sharding`` (one
  sharding, a matching pytree of shardings, or None to keep each leaf's own)."""
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    def to_struct(x):
      return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                  sharding=sharding or getattr(x, 'sharding', None))
    return jax.tree.map(to_struct, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, sharding)


# ---- single-network exports (the student for evaluation and prediction) ----

EXPORT_MANIFEST = 'manifest.json'


def save_network(directory, variables, config, network='student', source='', overwrite=True):
  """Writes one network's {'params', 'batch_stats'} as an Orbax checkpoint in
  ``directory/variables`` with ``config.json`` and ``manifest.json`` beside it."""
  directory = os.path.abspath(os.fspath(directory))
  target = os.path.join(directory, 'variables')
  if os.path.exists(target) and not overwrite:
    raise FileExistsError(f'{target} exists; pass --overwrite (overwrite=True) to replace it')
  os.makedirs(directory, exist_ok=True)
  tree = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(target, tree, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(directory, EXPORT_MANIFEST), 'w') as f:
    json.dump({'kind': 'network', 'network': network, 'source': str(source)}, f, indent=2)
  return directory


def network_variables_struct(config):
  """Shapes of one network's {'params', 'batch_stats'} for ``config`` (no compute)."""
  from mstkd_jax import step as step_lib
  from mstkd_jax.models.mstkdnet import network_from_config
  import jax.numpy as jnp
  net = network_from_config(config)
  x = jnp.zeros(step_lib.input_shape(config))
  return jax.eval_shape(lambda: net.init({'params': jax.random.key(0),
                                          'dropout': jax.random.key(0)}, x, train=False))


def is_network_export(directory):
  return os.path.exists(os.path.join(directory, EXPORT_MANIFEST))


def load_config(directory):
  """The config saved beside a checkpoint (``config.json`` of a workdir or an export)."""
  from ml_collections import config_dict
  path = os.path.join(directory, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {directory} a workdir or an exported '
                            'network?')
  with open(path) as f:
    return config_dict.ConfigDict(_lists_to_tuples(json.load(f)))


def _lists_to_tuples(d):
  if isinstance(d, dict):
    return {k: _lists_to_tuples(v) for k, v in d.items()}
  if isinstance(d, list):
    return tuple(_lists_to_tuples(v) for v in d)
  return d


def load_network(config, location, which=None, network='student'):
  """One network's {'params', 'batch_stats'} from an export folder (``manifest.json``) or
  from a training workdir's checkpoints (``which``: 'latest', 'best' or a step).

  Shapes are checked against ``config``: a checkpoint of another model size is refused with
  a message naming both.
  """
  target = network_variables_struct(config)
  if is_network_export(location):
    target = abstract_like(target, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    try:
      return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(location),
                                                             'variables'), target)
    except (ValueError, KeyError) as e:
      raise ValueError(f'{location} does not hold a network of this config '
                       f'(model {dict(config.model)}): {e}') from e
  directory = os.path.join(location, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{location} is neither an exported network (no {EXPORT_MANIFEST})'
                            ' nor a training workdir (no checkpoints/ folder)')
  from mstkd_jax import step as step_lib
  manager = make_manager(directory, read_only=True)
  step = resolve_step(manager, which)
  abstract = step_lib.abstract_state(config, spe=1)
  try:
    state, _, _ = restore(manager, step, abstract, with_data=False)
  except (ValueError, KeyError) as e:
    raise ValueError(f'checkpoint {directory}/{step} does not match this config '
                     f'(model {dict(config.model)}): {e}') from e
  return {'params': state.params[network], 'batch_stats': state.batch_stats[network]}
