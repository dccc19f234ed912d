"""Launch environment: who am I, how many of us, and which device and backend to use.

Three launchers are recognised, in this order:

* ``torchrun`` (or anything else that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``);
* MPI (``mpirun``/``mpiexec``): Open MPI sets ``OMPI_COMM_WORLD_*``, MPICH and Intel MPI
  set ``PMI_RANK``/``PMI_SIZE`` (Intel also ``MPI_LOCALRANKID``), PMIx sets ``PMIX_RANK``;
* a plain single process.

The backend follows the device: NCCL-class backends for accelerators, gloo for the CPU,
chosen by ``torch.distributed`` itself so no device name is hard-coded here.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

_MPI_RANK = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_MPI_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_MPI_LOCAL = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MPICH_LOCAL_RANK", "PALS_LOCAL_RANKID")


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout of this process as the launcher described it."""

    launcher: str  # "torchrun" | "mpi" | "single"
    rank: int
    world_size: int
    local_rank: int


def _first_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        if os.environ.get(name, "").strip().lstrip("-").isdigit():
            return int(os.environ[name])
    return None


def detect_launch() -> LaunchEnv:
    """Read the launcher's environment variables; a bare process is rank 0 of 1."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return LaunchEnv("torchrun", int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                         int(os.environ.get("LOCAL_RANK", "0")))
    rank, size = _first_int(_MPI_RANK), _first_int(_MPI_SIZE)
    if rank is not None and size is not None:
        local = _first_int(_MPI_LOCAL)
        return LaunchEnv("mpi", rank, size, rank if local is None else local)
    return LaunchEnv("single", 0, 1, 0)


def pick_device(local_rank: int) -> torch.device:
    """The accelerator for this local rank if there is one (and TETRAD_DEVICE does not say cpu)."""
    forced = os.environ.get("TETRAD_DEVICE", "").strip()
    if forced:
        return torch.device(forced)
    if torch.accelerator.is_available():
        kind = torch.accelerator.current_accelerator().type
        index = local_rank % torch.accelerator.device_count()
        torch.accelerator.set_device_index(index)
        return torch.device(kind, index)
    return torch.device("cpu")


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


def init_distributed(timeout_s: float = 600.0) -> tuple[LaunchEnv, torch.device]:
    """Create the default process group (once) and return the launch env and this rank's device.

    A single process still gets a world-size-1 group (on an in-memory store) so that every
    code path can call collectives unconditionally.
    """
    env = detect_launch()
    device = pick_device(env.local_rank)
    if dist.is_initialized():
        return env, device
    backend = dist.get_default_backend_for_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.launcher == "single":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return env, device
    if env.launcher == "mpi":
        _mpi_rendezvous(env)
    prefix = _restart_prefix()
    if prefix is None:
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timeout)
        return env, device
    store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=env.rank,
                            world_size=env.world_size, timeout=timeout)
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
