"""The environment ``srun`` gives a task, for tests that start processes as SLURM would.

Only the variables srun itself exports (Slurm's ``env_array_for_step`` and ``setup_env``),
none of torchrun's: the processes must find each other from these alone.
"""

from __future__ import annotations

import os
import random
import socket

from tetrad.parallel.slurm import derived_port


def free_job_id(rng: random.Random) -> int:
    """A job id whose derived rendezvous port (step 0) is free on this machine right now."""
    for job in rng.sample(range(10**5, 10**6), 200):
        with socket.socket() as s:
            try:
                s.bind(("", derived_port(job, 0)))
            except OSError:
                continue
        return job
    raise RuntimeError("no free port among 200 derived job-id ports")


def without_launchers(env: dict) -> dict:
    """``env`` without any launcher's variables (in case the tests themselves run under one)."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RESTART_COUNT", "GROUP_WORLD_SIZE"}
    return {k: v for k, v in env.items() if k not in drop and not k.startswith("SLURM_")}


def srun_env(rank: int, world: int, job: int, nodes: str = "localhost", per_node: str | None = None,
             base: dict | None = None, **extra: str) -> dict:
    """Task ``rank`` of a block-distributed step of ``world`` tasks on ``nodes``; ``per_node`` is
    SLURM's compressed count ("1(x2)"; default: all on one node)."""
    from tetrad.parallel.slurm import expand_hostlist, expand_tasks_per_node

    per_node = per_node or str(world)
    counts = expand_tasks_per_node(per_node)
    node = next(i for i in range(len(counts)) if rank < sum(counts[:i + 1]))
    env = without_launchers(dict(os.environ if base is None else base))
    env.update(SLURM_JOB_ID=str(job), SLURM_JOBID=str(job), SLURM_STEP_ID="0", SLURM_STEPID="0",
               SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank - sum(counts[:node])), SLURM_NODEID=str(node),
               SLURM_NTASKS=str(world), SLURM_NPROCS=str(world), SLURM_STEP_NUM_TASKS=str(world),
               SLURM_STEP_NODELIST=nodes, SLURM_JOB_NODELIST=nodes, SLURM_NODELIST=nodes,
               SLURM_STEP_NUM_NODES=str(len(expand_hostlist(nodes))), SLURM_NNODES=str(len(counts)),
               SLURM_STEP_TASKS_PER_NODE=per_node, SLURM_TASKS_PER_NODE=per_node, **extra)
    return env
