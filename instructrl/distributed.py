"""Multi-host start-up: one JAX process per host (TPU VM worker, GPU node), one global mesh.

Every process runs the same command. `initialize` connects them before any device is touched:
  - TPU pods (Cloud TPU VMs, GKE/xpk) and SLURM / Open MPI jobs: JAX detects the cluster from its
    environment (`jax.distributed.initialize()` with no arguments);
  - elsewhere (a GPU cluster without a scheduler, a test on one machine): an explicit coordinator,
    `--coordinator_address=host:port --num_processes=N --process_id=i`, or the same values in the
    environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
After it, `jax.devices()` lists every device of every process and the mesh in parallel.py spans
them all; each process feeds only the batch rows its devices hold (train_state.process_batch),
only process 0 writes metrics, config.json and logs below WARNING, and every process writes its
own shards of each Orbax checkpoint (so the workdir must be a filesystem all hosts share).
"""

from __future__ import annotations

import logging
import os

import jax

MODES = ("auto", "on", "off")


def detected_cluster() -> str | None:
  """The multi-process launcher we are running under, if any (only cases JAX auto-detects)."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu-pod"
  if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and env.get("SLURM_JOB_ID"):
    return "slurm"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "openmpi"
  return None


def _int_env(name: str) -> int | None:
  v = os.environ.get(name)
  if v is None or v == "":
    return None
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"environment variable {name}={v!r}: expected an integer") from None


def initialize(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> bool:
  """Connect this process to the others; returns whether JAX runs multi-process.

  mode "auto": only when a coordinator is given (flag or environment) or a cluster is detected, so a
  single-host run needs nothing; "on": always (fails clearly if nothing says where the coordinator
  is); "off": never.
  """
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}: expected one of {MODES}")
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _int_env("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _int_env("JAX_PROCESS_ID")
  if mode == "off" or (mode == "auto" and coordinator_address is None and detected_cluster() is None):
    return False
  if coordinator_address is not None and (num_processes is None or process_id is None):
    raise ValueError(f"--coordinator_address={coordinator_address}: also give --num_processes and --process_id "
                     f"(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id}: expected 0 <= process_id < --num_processes={num_processes}")
  kwargs = {}
  host = (coordinator_address or "").rsplit(":", 1)[0]
  if host in ("127.0.0.1", "localhost"):
    # A one-machine run (the tests): listen on loopback only, not on every interface.
    kwargs["coordinator_bind_address"] = coordinator_address
  jax.distributed.initialize(coordinator_address, num_processes, process_id, initialization_timeout=timeout_s,
                             **kwargs)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  if jax.process_index() != 0:
    # One log for the whole job: other processes only report warnings and errors.
    logging.getLogger().setLevel(logging.WARNING)
    try:
      from absl import logging as absl_logging
      absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
      pass
  return jax.process_count() > 1


def is_primary() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def primary_first(name: str, fn):
  """Run fn on process 0, then on the others (which find its output on a shared workdir and skip,
  or build their own copy on a host-local one); nobody continues until all are done."""
  out = fn() if is_primary() else None
  barrier(f"{name}:primary")
  if not is_primary():
    out = fn()
  barrier(f"{name}:all")
  return out


def to_host(x):
  """A (possibly multi-host sharded) array as one NumPy array on every process.

  np.asarray fails on an array whose shards live partly on other hosts (sampled tokens, scores
  sharded over 'batch'); those are all-gathered first. On one host this is np.asarray.
  """
  import numpy as np
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
