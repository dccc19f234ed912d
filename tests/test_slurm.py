"""SLURM launch detection, without SLURM: host lists, task counts and the environment srun sets.

The environments below are the variables ``srun`` exports (Slurm's ``env_array_for_step`` and
``setup_env``), so detection is tested on what a real step looks like, including the cases
that must *not* be taken for an srun task (the batch script itself, torchrun or mpirun
inside an allocation).
"""

import pytest

from tetrad.parallel.launch import LaunchError, detect_launch
from tetrad.parallel.slurm import (PORT_BASE, PORT_SPAN, derived_port, expand_hostlist,
                                   expand_tasks_per_node, iter_hosts)


@pytest.mark.parametrize("text,hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("node[08-11]", ["node08", "node09", "node10", "node11"]),  # padding from the lower bound
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("gpu[001-002]", ["gpu001", "gpu002"]),
    ("n[1-2],gpu[3-4]-ib,login", ["n1", "n2", "gpu3-ib", "gpu4-ib", "login"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("a-b-c,d", ["a-b-c", "d"]),
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
    (" c1 , c2 ", ["c1", "c2"]),
    ("x[5]", ["x5"]),
])
def test_hostlist_forms_slurm_produces(text, hosts):
    assert expand_hostlist(text) == hosts
    assert next(iter_hosts(text)) == hosts[0]


@pytest.mark.parametrize("text,match", [
    ("node[1-", "never closed"), ("node1]", "without"), ("n[[1]]", "nested"), ("a,,b", "empty host"),
    ("n[a-b]", "expected N or N-M"), ("n[3-1]", "backwards"), ("n[1-2", "never closed"),
    ("n[0-99999999]", "more than"), ("n[0-9999]m[0-9999]", "more than"), ("", "empty host"),
])
def test_bad_hostlists_are_launch_errors(text, match):
    with pytest.raises(LaunchError, match=match):
        expand_hostlist(text)


def test_a_large_cluster_list():
    hosts = expand_hostlist("gpu[0001-4096],cpu[1-64]")
    assert len(hosts) == 4160 and hosts[0] == "gpu0001" and hosts[4095] == "gpu4096" and hosts[-1] == "cpu64"


@pytest.mark.parametrize("text,counts", [("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("1,8(x2)", [1, 8, 8])])
def test_tasks_per_node(text, counts):
    assert expand_tasks_per_node(text) == counts


def _srun(rank: int, ntasks: int = 4, nodes: str = "gpu[01-02]", per_node: str = "2(x2)", **extra) -> dict:
    """The variables srun sets for task ``rank`` of a block-distributed step."""
    counts = expand_tasks_per_node(per_node)
    node = next(i for i in range(len(counts)) if rank < sum(counts[:i + 1]))
    env = {"SLURM_JOB_ID": "123456", "SLURM_JOBID": "123456", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
           "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank - sum(counts[:node])),
           "SLURM_NODEID": str(node), "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks),
           "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_STEP_NODELIST": nodes, "SLURM_JOB_NODELIST": nodes,
           "SLURM_NODELIST": nodes, "SLURM_STEP_NUM_NODES": str(len(counts)),
           "SLURM_STEP_TASKS_PER_NODE": per_node, "SLURM_TASKS_PER_NODE": per_node}
    return env | extra


_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
         "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
         "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "PMIX_RANK")


@pytest.fixture
def env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("SLURM_") or name in _VARS:
            monkeypatch.delenv(name)

    def set_all(values: dict) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)
    return set_all


@pytest.mark.parametrize("rank,local,node", [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)])
def test_srun_task_is_detected(env, rank, local, node):
    env(_srun(rank))
    got = detect_launch()
    assert (got.launcher, got.rank, got.world_size, got.local_rank, got.local_world_size) == \
           ("slurm", rank, 4, local, 2)
    assert got.slurm.node_id == node and got.slurm.master_addr == "gpu01"
    assert got.slurm.master_port() == derived_port(123456, 0)


def test_uneven_nodes_give_each_node_its_own_local_world(env):
    env(_srun(4, ntasks=5, nodes="n[1-3]", per_node="2(x2),1"))
    got = detect_launch()
    assert (got.rank, got.local_rank, got.local_world_size, got.slurm.node_id) == (4, 0, 1, 2)


def test_derived_port_is_below_the_ephemeral_range_and_differs_per_step():
    ports = {derived_port(job, step) for job in range(1000, 1100) for step in range(3)}
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SPAN < 32768 for p in ports)
    assert derived_port(77, 0) != derived_port(77, 1)


def test_torchrun_inside_an_allocation_is_torchrun(env):
    env(_srun(1) | {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    got = detect_launch()
    assert (got.launcher, got.rank, got.world_size, got.local_rank, got.local_world_size) == \
           ("torchrun", 5, 8, 1, 4)


def test_mpirun_inside_an_allocation_is_mpi(env):
    # mpirun's ranks inherit the batch step's SLURM_PROCID=0; MPI's own variables win
    env(_srun(0) | {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
                    "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    got = detect_launch()
    assert (got.launcher, got.rank, got.world_size, got.local_rank, got.local_world_size) == ("mpi", 3, 4, 1, 2)


def test_srun_with_pmi_uses_the_slurm_step(env):
    # srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE equal to SLURM's, but no local ids: SLURM's are used
    env(_srun(3) | {"PMI_RANK": "3", "PMI_SIZE": "4"})
    got = detect_launch()
    assert (got.launcher, got.local_rank, got.local_world_size) == ("slurm", 1, 2)


def test_batch_script_without_srun_is_one_process_with_a_warning(env):
    batch = {k: v for k, v in _srun(0).items() if not k.startswith("SLURM_STEP")}
    env(batch)
    with pytest.warns(UserWarning, match="not started by srun.*all 4 tasks"):
        got = detect_launch()
    assert (got.launcher, got.rank, got.world_size) == ("single", 0, 1)


@pytest.mark.parametrize("change,match", [
    ({"SLURM_PROCID": "4"}, r"SLURM_PROCID=4 is not below SLURM_STEP_NUM_TASKS=4"),
    ({"SLURM_LOCALID": "2"}, r"SLURM_LOCALID='2': expected 0..1"),
    ({"SLURM_NODEID": "2"}, r"SLURM_NODEID=2 but the step's node list has 2 host\(s\)"),
    ({"SLURM_STEP_TASKS_PER_NODE": "3(x2)"}, r"gives 6 task\(s\) on 2 node\(s\); the step has 4"),
    ({"SLURM_STEP_NUM_NODES": "3"}, r"SLURM_STEP_NUM_NODES=3 but SLURM_STEP_NODELIST='gpu\[01-02\]' names 2"),
    ({"SLURM_STEP_NODELIST": "gpu[01-"}, r"never closed"),
    ({"SLURM_PROCID": "one"}, r"SLURM_PROCID='one' is not a non-negative integer"),
])
def test_inconsistent_variables_name_them(env, change, match):
    env(_srun(1) | change)
    with pytest.raises(LaunchError, match=match):
        detect_launch()


def test_step_without_node_list_needs_master_addr(env):
    env({k: v for k, v in _srun(1).items() if "NODELIST" not in k})
    with pytest.raises(LaunchError, match="set MASTER_ADDR"):
        detect_launch()
    env({"MASTER_ADDR": "10.0.0.1"})  # then the rendezvous uses it (and the counts give the nodes)
    got = detect_launch()
    assert (got.launcher, got.local_rank, got.local_world_size, got.slurm.hosts) == ("slurm", 1, 2, ())


def test_rank0_off_the_first_host_is_refused_before_any_connection(env):
    from tetrad.parallel.launch import _slurm_rendezvous

    env(_srun(0) | {"SLURM_NODEID": "1", "SLURM_LOCALID": "0"})  # an arbitrary distribution
    with pytest.raises(LaunchError, match="runs on node 1 .*export MASTER_ADDR"):
        _slurm_rendezvous(detect_launch().slurm)
