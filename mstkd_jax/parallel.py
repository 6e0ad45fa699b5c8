"""Devices, meshes and shardings for data-parallel training on one or many hosts.

The mesh has one axis, ``data``, over every device of every process. Batches are sharded
along it (``P('data')``); parameters and optimiser states are replicated (``P()``). The
compiler inserts the gradient all-reduce, and every mean over the batch (BatchNorm statistics,
losses) is a mean over the global batch, so results do not depend on the device count.
"""

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def maybe_initialize_distributed(coordinator=None, num_processes=None, process_id=None):
  """Starts JAX's multi-controller runtime when asked to, by arguments or environment.

  Arguments win; else ``MSTKD_COORDINATOR``, ``MSTKD_NUM_PROCESSES``, ``MSTKD_PROCESS_ID``;
  else, on a cluster JAX recognises (SLURM, ...), ``jax.distributed.initialize()`` with no
  arguments detects everything. Single-process runs do nothing.
  """
  coordinator = coordinator or os.environ.get('MSTKD_COORDINATOR')
  num_processes = num_processes or os.environ.get('MSTKD_NUM_PROCESSES')
  process_id = process_id if process_id is not None else os.environ.get('MSTKD_PROCESS_ID')
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(num_processes), process_id=int(process_id))
  elif 'SLURM_NTASKS' in os.environ and int(os.environ['SLURM_NTASKS']) > 1:
    jax.distributed.initialize()
  logging.info('process %d of %d; %d local / %d global devices: %s', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices())


def make_mesh(devices=None) -> Mesh:
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(-1), ('data',))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def global_batch(batch, mesh):
  """Assembles this process's share of a batch (dict of NumPy arrays, leading axis = local
  batch) into global jax.Arrays sharded over the mesh's ``data`` axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
