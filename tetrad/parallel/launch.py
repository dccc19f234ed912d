"""Launch environment: who am I, how many of us, and which device and backend to use.

Four launchers are recognised, in this order:

* ``torchrun`` (or anything else that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``). It wins
  over everything below, so ``srun torchrun ...`` inside an sbatch allocation is torchrun's;
* MPI (``mpirun``/``mpiexec``): Open MPI sets ``OMPI_COMM_WORLD_*``, MPICH and Intel MPI
  set ``PMI_RANK``/``PMI_SIZE`` (Intel also ``MPI_LOCALRANKID``), PMIx sets ``PMIX_RANK``.
  ``mpirun`` inside an allocation inherits the batch step's SLURM variables, which then
  disagree with MPI's rank and size: MPI's win. When they agree (``srun --mpi=pmi2``), the
  SLURM step is used, for its node list and local ids;
* SLURM's ``srun`` (see :mod:`tetrad.parallel.slurm`): rank 0's address is the first host of
  the step's node list, the port ``MASTER_PORT`` or one derived from the job id;
* a plain single process (with a warning inside a multi-task allocation: srun is missing).

The backend follows the device: NCCL-class backends for accelerators, gloo for the CPU,
chosen by ``torch.distributed`` itself so no device name is hard-coded here.
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tetrad.compat import default_backend
from tetrad.parallel.slurm import LaunchError, SlurmStep, allocation_without_srun, slurm_step

__all__ = ["LaunchEnv", "LaunchError", "detect_launch", "init_distributed", "pick_device"]

_MPI_RANK = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_MPI_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_MPI_LOCAL = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MPICH_LOCAL_RANK", "PALS_LOCAL_RANKID",
              "MV2_COMM_WORLD_LOCAL_RANK")
_MPI_LOCAL_SIZE = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PALS_LOCAL_SIZE",
                   "MV2_COMM_WORLD_LOCAL_SIZE")


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout of this process as the launcher described it."""

    launcher: str  # "torchrun" | "mpi" | "slurm" | "single"
    rank: int
    world_size: int
    local_rank: int
    # Ranks on this node (torchrun's LOCAL_WORLD_SIZE, MPI's local size, srun's tasks on this
    # node). Where the launcher does not say, the whole world is taken to be one node.
    local_world_size: int
    slurm: SlurmStep | None = None  # the srun step, for the rendezvous address


def _first_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        if os.environ.get(name, "").strip().lstrip("-").isdigit():
            return int(os.environ[name])
    return None


def detect_launch() -> LaunchEnv:
    """Read the launcher's environment variables; a bare process is rank 0 of 1.

    Raises LaunchError (naming the variables) when an srun step's variables contradict
    each other, before any process group exists.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return LaunchEnv("torchrun", int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")),
                         int(env.get("LOCAL_WORLD_SIZE", world)))
    mpi = _mpi_launch()
    try:
        step = slurm_step(env)
    except LaunchError:
        if mpi is None:
            raise
        step = None  # mpirun inside an allocation: the inherited SLURM variables are not ours
    if mpi is not None and (step is None or (step.rank, step.world_size) != (mpi.rank, mpi.world_size)):
        return mpi
    if step is not None:
        return LaunchEnv("slurm", step.rank, step.world_size, step.local_rank, step.local_world_size, step)
    ntasks = allocation_without_srun(env)
    if ntasks:
        warnings.warn(f"SLURM_NTASKS={ntasks} in this allocation, but this process was not started by "
                      f"srun (SLURM_STEP_ID is unset): running as a single process; start it with "
                      f"`srun python -m tetrad ...` to use all {ntasks} tasks", stacklevel=2)
    return LaunchEnv("single", 0, 1, 0, 1)


def _mpi_launch() -> LaunchEnv | None:
    rank, size = _first_int(_MPI_RANK), _first_int(_MPI_SIZE)
    if rank is None or size is None:
        return None
    local, local_size = _first_int(_MPI_LOCAL), _first_int(_MPI_LOCAL_SIZE)
    # Without local ids the world is taken to be one node (what mpiexec on one machine does).
    return LaunchEnv("mpi", rank, size, rank if local is None else local,
                     size if local_size is None else local_size)


def pick_device(local_rank: int) -> torch.device:
    """This local rank's device, made the current one: the accelerator of index ``local_rank``
    if there is one, else the CPU. ``TETRAD_DEVICE`` overrides: ``cpu``; an accelerator type
    (``cuda``: index = local rank); or ``cuda:i`` (that index, for a single process)."""
    forced = os.environ.get("TETRAD_DEVICE", "").strip()
    if forced:
        device = torch.device(forced)
        if device.type == "cpu":
            return device
        index = local_rank if device.index is None else device.index
    elif torch.accelerator.is_available():
        device, index = torch.accelerator.current_accelerator(), local_rank
    else:
        return torch.device("cpu")
    count = torch.accelerator.device_count()
    if index >= count:
        raise LaunchError(
            f"local rank {local_rank} would use {device.type}:{index}, but this node has {count} "
            f"{device.type} device(s): NCCL refuses two ranks on one GPU. Launch at most {count} "
            f"ranks per node (torchrun --nproc_per_node {count}), or set TETRAD_DEVICE=cpu")
    torch.accelerator.set_device_index(index)  # before the process group: NCCL uses the current one
    return torch.device(device.type, index)


def nccl_error_handling(backend: str) -> None:
    """On NCCL, a failed or timed-out collective aborts the communicators and surfaces as an
    exception in the training thread (``TORCH_NCCL_ASYNC_ERROR_HANDLING=2``), where the loop
    names the dead ranks from the store (``tetrad.trainer.faults``), instead of the watchdog
    killing the process without a word. A value the user set is kept."""
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


def free_port() -> int:
    """A TCP port that was free a moment ago (only for single-process or MPI rank-0 use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mpi_rendezvous(env: LaunchEnv) -> None:
    """Give MPI ranks a MASTER_ADDR/PORT: from the environment, or broadcast from rank 0 via mpi4py."""
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        return
    try:
        from mpi4py import MPI  # optional extra: pip install tetrad[mpi]
    except ImportError:
        if env.world_size > 1 and "MASTER_ADDR" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        return
    addr = (socket.gethostname(), free_port()) if env.rank == 0 else None
    host, port = MPI.COMM_WORLD.bcast(addr, root=0)
    os.environ.setdefault("MASTER_ADDR", host if env.world_size > 1 else "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


def _slurm_rendezvous(step: SlurmStep) -> None:
    """MASTER_ADDR: the step's first host; MASTER_PORT: derived from the job id. Either one
    already in the environment wins (an sbatch script may export them)."""
    given = "MASTER_ADDR" in os.environ
    os.environ.setdefault("MASTER_ADDR", step.master_addr)
    os.environ.setdefault("MASTER_PORT", str(step.master_port()))
    if step.rank == 0 and not given and step.hosts and step.node_id != 0:
        raise LaunchError(f"SLURM_PROCID=0 runs on node {step.node_id} ({step.hosts[step.node_id]}), not on "
                          f"the step's first host {step.master_addr} where the others look for it "
                          f"(an arbitrary task distribution?): export MASTER_ADDR=<rank 0's host>")


def init_distributed(timeout_s: float = 600.0) -> tuple[LaunchEnv, torch.device]:
    """Create the default process group (once) and return the launch env and this rank's device.

    A single process still gets a world-size-1 group (on an in-memory store) so that every
    code path can call collectives unconditionally.
    """
    env = detect_launch()
    device = pick_device(env.local_rank)
    if dist.is_initialized():
        return env, device
    backend = default_backend(device)
    nccl_error_handling(backend)
    timeout = datetime.timedelta(seconds=timeout_s)
    # device_id: the communicator is made now on this device (not lazily, guessing it)
    bound = {"device_id": device} if device.type != "cpu" else {}
    if env.launcher == "single" or (env.launcher == "slurm" and env.world_size == 1):
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                **bound)
        return env, device
    if env.launcher == "mpi":
        _mpi_rendezvous(env)
    if env.launcher == "slurm":
        _slurm_rendezvous(env.slurm)
    prefix = _restart_prefix()
    if prefix is None:
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timeout, **bound)
        return env, device
    store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=env.rank,
                            world_size=env.world_size, timeout=timeout, **bound)
    return env, device


def _restart_prefix() -> str | None:
    """A store prefix per torchrun restart on a single node.

    torchrun's agent keeps one store across ``--max-restarts`` attempts, so a restarted rank
    could read a dead predecessor's gloo address and fail to connect. On one node every worker
    shares the agent's restart count; across nodes the counts can differ (a membership
    change restarts without counting), so there torch's own behaviour is kept.
    """
    count = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if count in (None, "0") or os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        return None
    return f"tetrad/attempt_{count}/"
