"""Devices, mesh and shardings: data parallelism over every device of every process.

One 1-D mesh axis, 'data'. Batches are split along it; parameters, optimizer state and BatchNorm
statistics are replicated. The train step is a single jax.jit over the mesh (no pmap): XLA
inserts the gradient all-reduce, and BatchNorm's batch statistics, computed over the global
batch, are the same on every device.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cxflax.errors import ConfigError, CxflaxError

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
  _watch_for_failures()
  return True


# --- one process fails, all stop ------------------------------------------------------------------
# A process that fails mid-run leaves the others waiting in a collective: gloo (and NCCL) wait on a
# peer that is alive but will never send (measured: hung until killed), and jax's own health
# checks only act once a process has died and missed its heartbeats (100 s), and then abort with
# no word of the cause. So the first process to fail publishes why in the coordination service's
# key-value store before it exits and wakes a thread in every other process, which reports the
# failure and ends its process, after jax's shutdown barrier (which the failing process also
# passes on its way out: none is left waiting for another). Measured with two processes on a busy
# 2-core machine: both gone 3 s after the failure. A process that never reaches the barrier
# holds the others there for jax's shutdown timeout (300 s) at most.
#
# Each process's thread waits on its own wake key, which the process sets itself when it ends
# (successfully or not), and the thread is joined before the interpreter exits: a thread still
# blocked in the client's C++ call when Python finalises is unwound by pthread_exit through C++
# frames, and the process aborts ("FATAL: exception not rethrown") after a successful run.

_FAILURE_KEY = "cxflax/failure"


def _wake_key(process: int) -> str:
  return f"cxflax/wake/{process}"


@dataclasses.dataclass
class _Watch:
  client: Any  # jax's coordination-service client
  thread: threading.Thread | None = None
  # Taken by whichever path ends this process first: the main thread (its own failure, or the
  # end of the run) or the watch thread (another process's failure); the other stands down.
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


_watch: _Watch | None = None


def _watch_for_failures() -> None:
  global _watch
  from jax._src.distributed import global_state
  _watch = _Watch(global_state.client)
  _watch.thread = threading.Thread(target=_wait_for_failure, args=(_watch,),
                                   name="cxflax-failure-watch", daemon=True)
  _watch.thread.start()


def _wait_for_failure(watch: _Watch) -> None:
  """The watch thread: blocks on this process's wake key (no polling: one call per hour); once
  another process publishes a failure there, reports it and ends this process (its main thread
  may be stuck in a collective that will never finish). Returns when this process sets the key
  itself (its run ended) or the client shuts down."""
  while True:
    try:
      failure = watch.client.blocking_key_value_get(_wake_key(jax.process_index()), 3600 * 1000)
      break
    except Exception as e:  # jax's runtime error: a timeout (wait again), or the client shut down
      if "DEADLINE_EXCEEDED" not in str(e):
        return
  if not watch.lock.acquire(blocking=False):  # the main thread is ending this process itself
    return
  message = f"{failure}; process {jax.process_index()} stopped too"
  logging.error("%s", message)
  print(f"error: {message}", file=sys.stderr)
  logging.flush()
  sys.stderr.flush()
  sys.stdout.flush()
  jax.distributed.shutdown()  # the barrier the failing process waits at on its way out
  os._exit(2)


def _wake(process: int, message: str) -> None:
  try:  # refused when the key is set already: that process has ended, or was woken before
    _watch.client.key_value_set(_wake_key(process), message)
  except Exception:  # jax's runtime error
    pass


def _end_watch() -> None:
  """Wakes this process's own watch thread (the caller holds the lock, so it returns) and waits
  for it, so that no thread is inside the client when the interpreter finalises."""
  _wake(jax.process_index(), "")
  if _watch.thread is not None:
    _watch.thread.join(timeout=30)


def share_failure(error: Exception) -> str | None:
  """The message this process reports for `error`, after publishing it for the other processes
  (which stop). A CxflaxError's own message, named by the process in a multi-process run; for
  another exception, the failure another process published first (a collective that lost its
  peer), else None: a bug, which the caller re-raises for its traceback."""
  if _watch is None:
    return str(error) if isinstance(error, CxflaxError) else None
  _watch.lock.acquire()  # held by the watch thread only when it is already ending this process
  own = (f"process {jax.process_index()} of {jax.process_count()} failed: "
         + (str(error) if isinstance(error, CxflaxError) else f"{type(error).__name__}: {error}"))
  first = own
  try:
    _watch.client.key_value_set(_FAILURE_KEY, own)
  except Exception:  # jax's runtime error: another process published first (or the service is gone)
    try:
      first = _watch.client.key_value_try_get(_FAILURE_KEY)
    except Exception:
      pass
  for process in range(jax.process_count()):
    if process != jax.process_index():
      _wake(process, first)
  _end_watch()
  if isinstance(error, CxflaxError):
    return own
  return None if first == own else f"{first}; process {jax.process_index()} stopped too"


def stop_watching() -> None:
  """At the end of a run: another process's later failure no longer ends this one, and the watch
  thread is gone before the interpreter exits. If the watch thread is already ending this process
  for another's failure (which came before this run's end), waits for it to do so: an interpreter
  finalising while that thread is inside jax's shutdown aborts the process."""
  if _watch is None:
    return
  if _watch.lock.acquire(blocking=False):
    _end_watch()
  elif _watch.thread is not None:
    _watch.thread.join()  # it ends the process (os._exit)


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
