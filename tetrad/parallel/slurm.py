"""SLURM's view of a process started by ``srun``: rank, world, node, and where rank 0 listens.

``srun`` starts every task itself and describes the step in environment variables
(``env_array_for_step`` and ``setup_env`` in Slurm's ``src/common/env.c``):

* ``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_NODEID`` -- this task's rank in the step,
  on its node, and its node's index in the step's node list;
* ``SLURM_STEP_NUM_TASKS`` (and ``SLURM_NTASKS``, which ``srun --preserve-env`` leaves at the
  allocation's value) -- the world;
* ``SLURM_STEP_NODELIST`` -- the step's hosts, compressed (``gpu[01-04,07],cpu3``);
* ``SLURM_STEP_TASKS_PER_NODE`` (``SLURM_TASKS_PER_NODE``) -- ``2(x3),1`` = 2,2,2,1 tasks;
* ``SLURM_STEP_ID`` -- set for srun steps only: the batch script itself (and an ``salloc``
  shell) also carries ``SLURM_PROCID=0`` and the allocation's ``SLURM_NTASKS``, and a plain
  ``python`` there must stay one process rather than wait forever for peers.

The host list is parsed here rather than by calling ``scontrol show hostnames``: compute
nodes do not always have the Slurm client tools, and the syntax is small.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Iterator, Mapping

_HOST_LIMIT = 1 << 20  # hosts in one list; more is a typo (node[0-99999999]), not a cluster
_GROUP = re.compile(r"\[([^\[\]]*)\]")
_TASKS = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")
# Rendezvous ports derived from the job id stay below Linux's ephemeral range (32768+), so
# they do not collide with the outgoing connections of other jobs on the node.
PORT_BASE, PORT_SPAN = 15000, 15000


class LaunchError(ValueError):
    """The launcher's environment variables contradict each other; the message names them."""


# ---------------------------------------------------------------------------- host lists
def _split_items(text: str) -> list[str]:
    """Split on the commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"host list {text!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"host list {text!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"host list {text!r}: '[' is never closed")
    items.append(text[start:])
    for item in items:
        if not item.strip():
            raise LaunchError(f"host list {text!r}: an empty host name")
    return [item.strip() for item in items]


def _numbers(text: str, group: str) -> list[str]:
    """``01-04,07`` -> ['01', '02', '03', '04', '07']: zero padding follows the lower bound."""
    out = []
    for part in group.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LaunchError(f"host list {text!r}: [{group}] has {part!r}, expected N or N-M")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise LaunchError(f"host list {text!r}: range {part!r} runs backwards")
        if last - first >= _HOST_LIMIT:
            raise LaunchError(f"host list {text!r}: range {part!r} has more than {_HOST_LIMIT} hosts")
        out.extend(str(n).zfill(len(lo)) for n in range(first, last + 1))
    return out


def _expand_item(text: str, item: str) -> Iterator[str]:
    """One host pattern: literal parts and bracket groups, the rightmost group varying fastest."""
    literals = _GROUP.split(item)  # literal, group, literal, group, ..., literal
    groups = [_numbers(text, g) for g in literals[1::2]]
    if any(ch in "[]" for ch in "".join(literals[0::2])):
        raise LaunchError(f"host list {text!r}: stray bracket in {item!r}")
    for combo in itertools.product(*groups):
        parts = [literals[0]]
        for number, literal in zip(combo, literals[2::2]):
            parts += [number, literal]
        yield "".join(parts)


def iter_hosts(text: str) -> Iterator[str]:
    """The hosts of a Slurm host list (``node[01-04,07],gpu[1-2]-ib,login``), in order."""
    for item in _split_items(text.strip()):
        yield from _expand_item(text, item)


def expand_hostlist(text: str) -> list[str]:
    """All hosts of a Slurm host list; a clear error for a malformed or absurdly long one."""
    hosts = list(itertools.islice(iter_hosts(text), _HOST_LIMIT + 1))
    if len(hosts) > _HOST_LIMIT:
        raise LaunchError(f"host list {text[:80]!r}: more than {_HOST_LIMIT} hosts")
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """``2(x3),1`` -> [2, 2, 2, 1] (SLURM_TASKS_PER_NODE's compressed counts)."""
    counts = []
    for part in text.split(","):
        m = _TASKS.match(part.strip())
        if m is None:
            raise LaunchError(f"tasks per node {text!r}: {part!r} is not N or N(xM)")
        reps = int(m.group(2) or 1)
        if reps > _HOST_LIMIT:
            raise LaunchError(f"tasks per node {text!r}: {part!r} repeats more than {_HOST_LIMIT} times")
        counts += [int(m.group(1))] * reps
    return counts


# ---------------------------------------------------------------------------- the step
@dataclass(frozen=True)
class SlurmStep:
    """One srun task's place in its step."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_id: int
    hosts: tuple[str, ...]
    job_id: int | None
    step_id: int

    @property
    def master_addr(self) -> str:
        """The first host of the step: where rank 0 runs under srun's block and cyclic
        distributions (rank 0 checks this; set MASTER_ADDR for anything else)."""
        return self.hosts[0] if self.hosts else "127.0.0.1"

    def master_port(self) -> int:
        """A port every task derives alike from the job and step ids."""
        return derived_port(self.job_id or 0, self.step_id)


def derived_port(job_id: int, step_id: int = 0) -> int:
    """``PORT_BASE + (job_id * 31 + step_id) % PORT_SPAN``: the same on every task of a step,
    different for two steps of one job that run at once (and for most neighbouring jobs)."""
    return PORT_BASE + (job_id * 31 + step_id) % PORT_SPAN


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None:
        return None
    if not value.strip().isdigit():
        raise LaunchError(f"{name}={value!r} is not a non-negative integer")
    return int(value)


def _first(env: Mapping[str, str], *names: str) -> tuple[str, int] | tuple[None, None]:
    for name in names:
        value = _int(env, name)
        if value is not None:
            return name, value
    return None, None


def allocation_without_srun(env: Mapping[str, str]) -> int | None:
    """SLURM_NTASKS when this is a batch script or salloc shell with several tasks, not an
    srun task (so the caller can say that srun is missing); else None."""
    if "SLURM_JOB_ID" not in env or "SLURM_STEP_ID" in env or "SLURM_STEPID" in env:
        return None
    try:
        ntasks = _int(env, "SLURM_NTASKS")
    except LaunchError:
        return None
    return ntasks if ntasks and ntasks > 1 else None


def slurm_step(env: Mapping[str, str]) -> SlurmStep | None:
    """This task's SlurmStep when srun started it, else None; LaunchError when inconsistent."""
    if "SLURM_PROCID" not in env or not ({"SLURM_STEP_ID", "SLURM_STEPID"} & env.keys()):
        return None
    rank = _int(env, "SLURM_PROCID")
    world_name, world = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if world is None or world < 1:
        raise LaunchError(f"SLURM_PROCID={rank} but no SLURM_STEP_NUM_TASKS or SLURM_NTASKS >= 1 "
                          f"says how many tasks the step has")
    if rank >= world:
        raise LaunchError(f"SLURM_PROCID={rank} is not below {world_name}={world}")
    _, step_id = _first(env, "SLURM_STEP_ID", "SLURM_STEPID")
    node_id = _int(env, "SLURM_NODEID") or 0
    hosts = _hosts(env, world)  # empty: no node list, MASTER_ADDR given instead
    if hosts and node_id >= len(hosts):
        raise LaunchError(f"SLURM_NODEID={node_id} but the step's node list has {len(hosts)} host(s): "
                          f"{', '.join(hosts[:8])}")
    local_world = _local_world(env, world, node_id, len(hosts) or None)
    local_rank = _int(env, "SLURM_LOCALID")
    local_rank = rank if local_rank is None and local_world == world else local_rank
    if local_rank is None or local_rank >= local_world:
        raise LaunchError(f"SLURM_LOCALID={env.get('SLURM_LOCALID')!r}: expected 0..{local_world - 1} "
                          f"({local_world} task(s) on node {node_id})")
    return SlurmStep(rank, world, local_rank, local_world, node_id, tuple(hosts),
                     _int(env, "SLURM_JOB_ID") or _int(env, "SLURM_JOBID"), step_id)


def _hosts(env: Mapping[str, str], world: int) -> list[str]:
    name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                 if env.get(n, "").strip()), None)
    if name is None:
        if world > 1 and "MASTER_ADDR" not in env:
            raise LaunchError(f"srun step of {world} tasks without SLURM_STEP_NODELIST (or "
                              f"SLURM_JOB_NODELIST): set MASTER_ADDR to the host of rank 0")
        return []
    hosts = expand_hostlist(env[name])
    _, nodes = _first(env, "SLURM_STEP_NUM_NODES") if name == "SLURM_STEP_NODELIST" else (None, None)
    if nodes is not None and nodes != len(hosts):
        raise LaunchError(f"SLURM_STEP_NUM_NODES={nodes} but SLURM_STEP_NODELIST={env[name]!r} "
                          f"names {len(hosts)} host(s)")
    return hosts


def _local_world(env: Mapping[str, str], world: int, node_id: int, n_hosts: int | None) -> int:
    """Tasks on this task's node, from the per-node counts srun exports (``n_hosts`` None:
    the node list is unknown, the counts say how many nodes there are)."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(name, "").strip():
            counts = expand_tasks_per_node(env[name])
            n_hosts = len(counts) if n_hosts is None else n_hosts
            if sum(counts) != world or len(counts) != n_hosts or node_id >= len(counts):
                if name == "SLURM_STEP_TASKS_PER_NODE":
                    raise LaunchError(f"{name}={env[name]!r} gives {sum(counts)} task(s) on {len(counts)} "
                                      f"node(s); the step has {world} task(s) on {n_hosts} node(s)")
                continue  # the allocation's counts (srun --preserve-env), not the step's
            return counts[node_id]
    per_node = _int(env, "SLURM_NTASKS_PER_NODE")
    if per_node is not None:
        return per_node
    n_hosts = n_hosts or 1
    if world % n_hosts:
        raise LaunchError(f"{world} tasks on {n_hosts} nodes and no SLURM_STEP_TASKS_PER_NODE to say "
                          f"how they are spread")
    return world // n_hosts
