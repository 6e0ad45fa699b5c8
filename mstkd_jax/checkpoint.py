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

import contextlib
import dataclasses
import json
import logging as py_logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization
from ml_collections import config_dict
from orbax.checkpoint import checkpoint_managers as ocm

from mstkd_jax.cli import InputError
from mstkd_jax.fileio import BadJsonFile, read_json, write_json_atomic, write_text_atomic
from mstkd_jax.models import build

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
      enable_async_checkpointing=not read_only,
      # Read-only managers save nothing; saying so keeps Orbax from warning about it.
      save_interval_steps=0 if read_only else 1)
  with _without_read_only_notice() if read_only else contextlib.nullcontext():
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=('state', 'data', 'meta'))


class _ReadOnlyNoticeFilter(py_logging.Filter):
  """Drops Orbax's 'Given directory is read only' warning: a manager opened to read a
  checkpoint says so on every evaluation, export and prediction, though nothing is wrong."""

  def filter(self, record):
    return not str(record.msg).startswith('Given directory is read only')


@contextlib.contextmanager
def _without_read_only_notice():
  logger = py_logging.getLogger('absl')   # Orbax logs through absl.logging
  notice_filter = _ReadOnlyNoticeFilter()
  logger.addFilter(notice_filter)
  try:
    yield
  finally:
    logger.removeFilter(notice_filter)


def saved_steps(directory):
  """The complete checkpoint steps under ``directory`` (a workdir's checkpoints/), from the
  folder names alone (no Orbax manager: nothing is logged or created)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


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
  write_text_atomic(os.path.join(directory, 'config.json'), config.to_json_best_effort(indent=2))
  write_json_atomic(os.path.join(directory, EXPORT_MANIFEST),
                    {'kind': 'network', 'network': network, 'source': str(source)}, indent=2)
  return directory


def add_network(directory, name, variables):
  """Adds a further network (the teacher) to an export written by ``save_network``: its
  {'params', 'batch_stats'} as ``directory/<name>_variables`` and its name in the manifest's
  ``extra_networks``. A second network of the same config only."""
  directory = os.path.abspath(os.fspath(directory))
  folder = f'{name}_variables'
  tree = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, folder), tree, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  path = os.path.join(directory, EXPORT_MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  manifest.setdefault('extra_networks', {})[name] = folder
  write_json_atomic(path, manifest, indent=2)


def is_network_export(directory):
  return os.path.exists(os.path.join(directory, EXPORT_MANIFEST))


def _restore_network(config, directory, location):
  """One network's {'params', 'batch_stats'} from an export's Orbax folder."""
  target = build.network_struct(config)
  _check_stored(directory, target)
  target = abstract_like(target, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  try:
    variables = ocp.StandardCheckpointer().restore(directory, target)
  except (ValueError, KeyError) as e:
    raise CheckpointError(f'{location} does not hold a network of this config '
                          f'(model {dict(config.model)}): {e}') from e
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def _replicated_everywhere():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(-1), ('devices',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def load_config(directory):
  """The config saved beside a checkpoint (``config.json`` of a workdir or an export)."""
  path = os.path.join(directory, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {directory} a workdir or an exported '
                            'network?')
  saved = read_json(path)
  if not isinstance(saved, dict):
    raise BadJsonFile(f'{path} holds a JSON {type(saved).__name__}, not a config (an object)')
  return config_dict.ConfigDict(_lists_to_tuples(saved))


def _lists_to_tuples(d):
  if isinstance(d, dict):
    return {k: _lists_to_tuples(v) for k, v in d.items()}
  if isinstance(d, list):
    return tuple(_lists_to_tuples(v) for v in d)
  return d


# ---- the one network loader: exports, converted weights and training workdirs ----

# Fields that must agree between the config a network was trained with and the one it is used
# with: everything that shapes the parameters or the input the network expects.
COMPATIBLE_FIELDS = (
    ('model', None),                   # every model field
    ('data', 'input_shape'),
    ('data', 'normalization'),
    ('data', 'spacing'),
    ('dtype', None),
)


def _field(config, section, name):
  node = config.get(section) if hasattr(config, 'get') else None
  if name is None:
    return node.to_dict() if hasattr(node, 'to_dict') else node
  return node.get(name) if node is not None and hasattr(node, 'get') else None


def _normalise(value):
  return json.loads(json.dumps(value, default=str))


class CheckpointError(InputError, ValueError):
  """A checkpoint that cannot be used with this config or command (one line for the user)."""


def check_compatible(config, saved_config, location=''):
  """Raises ValueError naming every differing field when ``config`` cannot use a network
  trained with ``saved_config`` (model size, input shape, normalisation, spacing, dtype)."""
  diffs = []
  for section, name in COMPATIBLE_FIELDS:
    a = _normalise(_field(config, section, name))
    b = _normalise(_field(saved_config, section, name))
    if a == b:
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
          diffs.append(f'{section}.{key}: config {a.get(key)!r}, checkpoint {b.get(key)!r}')
    else:
      where = f'{section}.{name}' if name else section
      diffs.append(f'{where}: config {a!r}, checkpoint {b!r}')
  if diffs:
    raise CheckpointError(f'the checkpoint {location} was trained with another config: '
                     + '; '.join(diffs) + '. Use the config it was trained with (its '
                     'config.json), or no --config at all where the command allows it.')


class NetworkMismatchError(InputError, ValueError):
  """Stored weights that do not fit the network: every missing, unknown, mis-shaped entry."""

  def __init__(self, missing=(), unexpected=(), misshaped=(), hint='',
               what='the stored weights do not match the network built from the config:'):
    self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
    lines = [what]
    if self.missing:
      lines.append(f'  missing ({len(self.missing)}): ' + ', '.join(self.missing))
    if self.unexpected:
      lines.append(f'  unexpected ({len(self.unexpected)}): ' + ', '.join(self.unexpected))
    if self.misshaped:
      lines.append(f'  wrong shape ({len(self.misshaped)}): ' + ', '.join(
          f'{n} {tuple(got)} (expected {tuple(want)})' for n, got, want in self.misshaped))
    if hint:
      lines.append('  ' + hint)
    super().__init__('\n'.join(lines))


def _flat_shapes(tree, prefix=()):
  """{(key, ...): shape} of a nested mapping whose leaves have a ``shape``."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat_shapes(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = tuple(value.shape)
  return out


def _stored_tree(directory, handler=None):
  """The tree metadata (nested dicts of leaves with a ``shape``) of the Orbax checkpoint in
  ``directory``: a whole checkpoint, or with ``handler`` one item of a managed step."""
  reader = handler or ocp.StandardCheckpointer()
  try:
    stored = reader.metadata(epath.Path(directory) if handler else directory)
  finally:
    reader.close()
  stored = getattr(stored, 'item_metadata', stored)
  return getattr(stored, 'tree', stored)


def _differences(stored, target):
  """(missing, unexpected, misshaped) entries of ``target`` against ``stored``, or None when
  the metadata is in an unknown format (the checks are then left to Orbax)."""
  try:
    have = _flat_shapes(dict(stored))
  except (AttributeError, TypeError):
    return None
  want = _flat_shapes(dict(target))
  missing = sorted('/'.join(k) for k in want if k not in have)
  unexpected = sorted('/'.join(k) for k in have if k not in want)
  misshaped = sorted(('/'.join(k), have[k], want[k]) for k in want
                     if k in have and have[k] != want[k])
  return missing, unexpected, misshaped


def _check_stored(directory, target):
  """Every leaf of ``target`` is stored in the export with the same shape, nothing else is."""
  found = _differences(_stored_tree(directory), target)
  if found and any(found):
    raise NetworkMismatchError(*found, hint='the export was written for another network '
                               'configuration')


def _check_stored_state(directory, abstract_state):
  """The networks of a training checkpoint's state (``<step>/state``) have the shapes of
  ``abstract_state``'s: else one line naming the first differences. Checked before Orbax
  starts reading, so that a restore never fails half-way."""
  tree = _stored_tree(directory, ocp.StandardCheckpointHandler())
  want = serialization.to_state_dict(abstract_state)
  found = _differences({k: tree.get(k, {}) for k in ('params', 'batch_stats')},
                       {k: want[k] for k in ('params', 'batch_stats')})
  if not found or not any(found):
    return
  missing, unexpected, misshaped = found
  examples = [f'{n} stored {tuple(got)}, expected {tuple(exp)}' for n, got, exp in misshaped]
  examples += [f'{n} missing' for n in missing] + [f'{n} not expected' for n in unexpected]
  raise CheckpointError(
      f'checkpoint {os.path.dirname(directory)} holds networks of another config: '
      f'{len(misshaped)} entries of another shape, {len(missing)} missing, {len(unexpected)} '
      f'unexpected (e.g. {"; ".join(examples[:2])}). Use the config it was trained with (its '
      'config.json), or no --config at all where the command allows it.')


@dataclasses.dataclass
class LoadedNetworks:
  """Networks read from a checkpoint: ``networks`` maps 'student' / 'teacher' to
  {'params', 'batch_stats'}; ``config`` is the config they are used with; ``source`` says
  where they came from (for logs and reports)."""
  networks: dict
  config: Any
  source: str
  is_export: bool = False

  def primary(self):
    """The student when present, else the one network an export holds."""
    return self.networks.get('student') or next(iter(self.networks.values()))


def resolve_location(workdir, checkpoint=None):
  """(location, which) of a ``--checkpoint`` value: a folder (an export or another workdir)
  stands for itself; anything else ('latest', 'best', a step) is a step of ``workdir``."""
  if checkpoint and os.path.isdir(checkpoint):
    return checkpoint, None
  return workdir, checkpoint


def load_networks(config, location, which=None, names=('student',)) -> LoadedNetworks:
  """The one way to load networks, from any of:

    * an exported or converted network folder (``manifest.json``): the network it holds
      (``variables/``), and those of ``names`` among its ``extra_networks`` (an export's
      teacher); ``which`` must be None or 'latest';
    * a training workdir's checkpoints: ``which`` is None / 'latest', 'best' or a step; every
      network of ``names`` ('student', 'teacher').

  ``config`` None uses the config saved beside the weights; otherwise it must be compatible
  with it (``check_compatible``). Weights that do not fit the network raise ValueError (an
  export: ``NetworkMismatchError`` listing the differences).
  """
  if not os.path.isdir(location):
    raise FileNotFoundError(f'{location} is not a folder (an exported network or a training '
                            'workdir)')
  saved = load_config(location) if os.path.exists(os.path.join(location, 'config.json')) else None
  if config is None:
    if saved is None:
      raise FileNotFoundError(f'{os.path.join(location, "config.json")} not found: is '
                              f'{location} a workdir or an exported network?')
    config = saved
  elif saved is not None:
    check_compatible(config, saved, location)
  if is_network_export(location):
    if which not in (None, '', 'latest'):
      raise CheckpointError(f'{location} is an exported network: a checkpoint step ({which}) does '
                       'not apply')
    with open(os.path.join(location, EXPORT_MANIFEST)) as f:
      manifest = json.load(f)
    if manifest.get('kind') != 'network':
      raise CheckpointError(f'{location}/{EXPORT_MANIFEST}: kind {manifest.get("kind")!r}, '
                       'expected "network"')
    location = os.path.abspath(location)
    networks = {manifest.get('network', 'student'): _restore_network(
        config, os.path.join(location, 'variables'), location)}
    for name, folder in (manifest.get('extra_networks') or {}).items():
      if name in names and name not in networks:
        networks[name] = _restore_network(config, os.path.join(location, folder), location)
    return LoadedNetworks(networks, config, f'export {location}', is_export=True)
  directory = os.path.join(location, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{location} is neither an exported network (no {EXPORT_MANIFEST})'
                            ' nor a training workdir (no checkpoints/ folder)')
  manager = make_manager(directory, read_only=True)
  try:
    step = resolve_step(manager, which)
    # Replicated on every device of every process: each process of a multi-process job reads
    # a whole copy (the shardings the checkpoint was saved with may name another process's
    # devices, or devices this job does not have).
    abstract = abstract_like(build.abstract_state(config), _replicated_everywhere())
    _check_stored_state(os.path.join(directory, str(step), 'state'), abstract)
    try:
      state, _, _ = restore(manager, step, abstract, with_data=False)
    except (ValueError, KeyError) as e:
      raise CheckpointError(f'checkpoint {directory}/{step} does not match this config '
                            f'(model {dict(config.model)}): {e}') from e
  finally:
    manager.close()
  label = f'step {step}' + (' (best validation Dice)' if which == 'best' else '')
  return LoadedNetworks({name: build.network_variables(state, name) for name in names},
                        config, label)
