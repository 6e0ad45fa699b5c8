"""Devices, meshes and shardings for data-parallel training on one or many hosts.

The mesh has one axis, ``data``, over every device of every process. Batches are sharded
along it (``P('data')``); the train state is replicated (``P()``) or, with
``config.train.shard_state``, each large array is split along one of its axes over the same
``data`` axis (ZeRO-3 / FSDP style: the compiler gathers parameters where they are used and
reduce-scatters their gradients). The compiler inserts the collectives, and every mean over
the batch (BatchNorm statistics, losses) is a mean over the global batch, so results do not
depend on the device count.

Multi-host: ``maybe_initialize_distributed`` starts JAX's multi-controller runtime; each
process then feeds its own share of every batch (``global_batch``) and the arrays span all
processes' devices.
"""

import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'

# Arrays with fewer elements than this stay replicated when the state is sharded: splitting
# biases and norms saves nothing and costs a collective each.
MIN_SHARDED_SIZE = 2 ** 14


def maybe_initialize_distributed(coordinator=None, num_processes=None, process_id=None):
  """Starts JAX's multi-controller runtime when asked to, by arguments or environment.

  In order: arguments (``--coordinator``, ``--num_processes``, ``--process_id``); else the
  variables ``MSTKD_COORDINATOR``, ``MSTKD_NUM_PROCESSES``, ``MSTKD_PROCESS_ID``; else JAX's
  own ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` or cluster
  detection); else, inside a SLURM job step of several tasks (``srun``), JAX's SLURM
  detection (one process per GPU: coordinator, process count and id, and the local GPU from
  SLURM's variables). ``MSTKD_DISTRIBUTED=0`` turns all of this off. Single-process runs do
  nothing. Returns True when the runtime was started.
  """
  coordinator = coordinator or os.environ.get('MSTKD_COORDINATOR')
  num_processes = num_processes or os.environ.get('MSTKD_NUM_PROCESSES')
  if process_id is None:
    process_id = os.environ.get('MSTKD_PROCESS_ID')
  started = False
  if os.environ.get('MSTKD_DISTRIBUTED', '1') == '0':
    pass
  elif coordinator:
    if num_processes is None or process_id is None:
      raise ValueError('a coordinator address needs the number of processes and this '
                       "process's id too (--num_processes, --process_id or MSTKD_NUM_PROCESSES,"
                       ' MSTKD_PROCESS_ID)')
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(num_processes), process_id=int(process_id))
    started = True
  elif os.environ.get('JAX_COORDINATOR_ADDRESS'):
    num = os.environ.get('JAX_NUM_PROCESSES')
    pid = os.environ.get('JAX_PROCESS_ID')
    jax.distributed.initialize(num_processes=int(num) if num else None,
                               process_id=int(pid) if pid else None)
    started = True
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_STEP_ID' in os.environ:
    jax.distributed.initialize()
    started = True
  if jax.process_index() != 0:
    # Only process 0 reports progress; the others speak up for warnings and errors.
    logging.set_verbosity(logging.WARNING)
  logging.info('process %d of %d; %d local / %d global devices: %s', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices())
  return started


def is_main_process():
  return jax.process_index() == 0


def make_mesh(devices=None) -> Mesh:
  """A one-axis (``data``) mesh over ``devices`` (default: every device of every process)."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def leaf_sharding(shape, mesh, shard=False) -> NamedSharding:
  """Sharding of one state array: replicated, or (``shard``) split along its largest axis
  that the device count divides, when it has at least ``MIN_SHARDED_SIZE`` elements."""
  n = mesh.shape[DATA_AXIS]
  if not shard or n == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
    return replicated(mesh)
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return NamedSharding(mesh, P(*spec))
  return replicated(mesh)


def state_shardings(abstract_state, mesh, shard=False):
  """A pytree of shardings matching ``abstract_state`` (replicated unless ``shard``)."""
  return jax.tree.map(lambda x: leaf_sharding(x.shape, mesh, shard), abstract_state)


def host_to_global(tree, shardings):
  """Places host (NumPy) values, identical on every process, into global arrays with
  ``shardings`` (one sharding or a matching pytree). Each process copies only the pieces its
  devices hold. Never aliases device buffers, so the result can be donated."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def place(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(place, tree, shardings)


def replicated_key(seed, mesh):
  """A PRNG key replicated on every device of the mesh (also across processes, where
  ``jax.device_put`` of a local key onto a global sharding is refused)."""
  return jax.jit(lambda: jax.random.key(seed), out_shardings=replicated(mesh))()


def global_batch(batch, mesh):
  """Assembles this process's share of a batch (dict of NumPy arrays, leading axis = local
  batch) into global jax.Arrays sharded over the mesh's ``data`` axis."""
  sharding = batch_sharding(mesh)
  local_devices = len(mesh.local_devices)

  def assemble(x):
    x = np.asarray(x)
    if x.shape[0] % local_devices:
      raise ValueError(f'the local batch ({x.shape[0]}) must be a multiple of the number of '
                       f'local devices ({local_devices})')
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(assemble, batch)


def any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is true on any (a collective: call it everywhere)."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))
  return bool(np.any(flags))


def sync(name):
  """A barrier across processes (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
