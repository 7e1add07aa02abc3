"""Devices, mesh and shardings: data parallelism over every device of every process.

One 1-D mesh axis, 'data'. Batches are split along it; parameters, optimizer state and BatchNorm
statistics are replicated. The train step is a single jax.jit over the mesh (no pmap): XLA
inserts the gradient all-reduce, and BatchNorm's batch statistics, computed over the global
batch, are the same on every device.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cxflax.errors import ConfigError

DATA_AXIS = "data"

# Environment variables that announce a multi-process job, by launcher.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES")


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Calls jax.distributed.initialize when flags or the environment ask for a multi-process run.

  Explicit arguments (the --coordinator_address/--num_processes/--process_id flags) win; else
  JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID; else jax's own cluster
  detection (SLURM, Open MPI, TPU pods). On CPU the collectives go through gloo.
  """
  env = os.environ
  if coordinator_address is None and env.get("JAX_COORDINATOR_ADDRESS"):
    coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
    num_processes = num_processes if num_processes is not None else int(env.get("JAX_NUM_PROCESSES", "0")) or None
    process_id = process_id if process_id is not None else (
        int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
  wanted = coordinator_address is not None or any(
      env.get(k) not in (None, "", "1") for k in _CLUSTER_ENV[1:])
  if not wanted:
    return False
  # Only affects the CPU backend (GPU runs use NCCL); without it, CPU processes cannot reduce.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def check_batch_sizes(config) -> None:
  """Raises ConfigError unless config's batch sizes split evenly over this run's devices and
  processes (every device gets the same share)."""
  for key in ("batch_size", "eval_batch_size"):
    n, d, p = config[key], jax.device_count(), jax.process_count()
    if n % d:
      raise ConfigError(f"config.{key}={n} must be a positive multiple of the device count ({d}) "
                        "so that every device gets the same share")
    if n % p:
      raise ConfigError(f"config.{key}={n} must divide among {p} processes")


def make_mesh(devices=None) -> Mesh:
  """A 1-D 'data' mesh over all devices (of all processes), or the given ones."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """This process's part of a global batch (numpy) → global jax.Arrays split on 'data'."""
  sharding = data_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def replicate(tree, mesh: Mesh):
  """Places a copy of a pytree of host or device values on every device of the mesh (a copy:
  train steps donate their state, which must not delete the caller's arrays)."""
  sharding = replicated(mesh)
  copy = lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x
  return jax.tree.map(lambda x: jax.device_put(copy(x), sharding), tree)


def gather(x) -> np.ndarray:
  """A global (possibly multi-process) array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
