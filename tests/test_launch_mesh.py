"""Launch-environment detection and the validated parallel layout."""

import pytest
import torch
import torch.distributed as dist

from harness import run_distributed
from tetrad.parallel.launch import detect_launch
from tetrad.parallel.mesh import AXES, LayoutError, ParallelDims

_LAUNCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "PMIX_RANK"]


@pytest.fixture
def clean_env(monkeypatch):
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env,expected", [
    ({}, ("single", 0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, ("torchrun", 3, 4, 1)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2"},
     ("mpi", 2, 8, 2)),  # Open MPI
    ({"PMI_RANK": "5", "PMI_SIZE": "6"}, ("mpi", 5, 6, 5)),  # MPICH hydra
    ({"PMI_RANK": "5", "PMI_SIZE": "6", "MPI_LOCALRANKID": "1"}, ("mpi", 5, 6, 1)),  # Intel MPI
])
def test_detect_launch(clean_env, env, expected):
    for key, value in env.items():
        clean_env.setenv(key, value)
    got = detect_launch()
    assert (got.launcher, got.rank, got.world_size, got.local_rank) == expected


def test_dp_auto_fills_the_world():
    dims = ParallelDims(16, pp=2, tp=2)
    assert dims.dp == 4 and dims.degrees == (2, 4, 1, 1, 2)
    assert dims.dp_enabled and dims.tp_enabled and dims.pp_enabled and not dims.sp_enabled
    assert not dims.cp_enabled and ParallelDims(16, cp=2, tp=2).dp == 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(world_size=6, tp=4), r"world size 6 is not divisible by tp\*pp\*sp\*cp"),
    (dict(world_size=8, tp=2, dp=3), r"strategy.dp=3: tp\*pp\*sp\*cp\*dp = 6 but the world has 8 ranks; use dp=4"),
    (dict(world_size=8, tp=2, cp=2, dp=4), r"use dp=2"),
    (dict(world_size=8, pp=0), r"strategy.pp=0: degrees must be >= 1"),
])
def test_bad_layouts_are_rejected(kwargs, match):
    with pytest.raises(LayoutError, match=match):
        ParallelDims(**kwargs)


def test_coords_are_row_major_with_tp_innermost():
    dims = ParallelDims(8, pp=2, tp=2)  # dp = 2
    assert dims.coords(0) == {"pp": 0, "dp": 0, "cp": 0, "sp": 0, "tp": 0}
    assert dims.coords(1) == {"pp": 0, "dp": 0, "cp": 0, "sp": 0, "tp": 1}
    assert dims.coords(2) == {"pp": 0, "dp": 1, "cp": 0, "sp": 0, "tp": 0}
    assert dims.coords(7) == {"pp": 1, "dp": 1, "cp": 0, "sp": 0, "tp": 1}
    # cp sits between dp and sp: sp=2 pairs are neighbours, cp=2 pairs two apart.
    usp = ParallelDims(8, cp=2, sp=2)
    assert usp.coords(1) == {"pp": 0, "dp": 0, "cp": 0, "sp": 1, "tp": 0}
    assert usp.coords(2) == {"pp": 0, "dp": 0, "cp": 1, "sp": 0, "tp": 0}
    assert usp.coords(4) == {"pp": 0, "dp": 1, "cp": 0, "sp": 0, "tp": 0}


def _mesh_groups(rank, world):
    dims = ParallelDims(world, pp=1, tp=2)
    mesh = dims.build_mesh(torch.device("cpu"))
    out = {}
    for axis in AXES:
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=mesh.get_group(axis))
        out[axis] = (t.item(), mesh.get_local_rank(axis))
    assert {a: mesh.get_local_rank(a) for a in AXES} == dims.coords(rank)
    return out


def test_mesh_groups_match_coords():
    out = run_distributed(_mesh_groups, 4)
    # tp pairs are neighbours {0,1}, {2,3}; dp pairs are {0,2}, {1,3}.
    assert [o["tp"][0] for o in out] == [1.0, 1.0, 5.0, 5.0]
    assert [o["dp"][0] for o in out] == [2.0, 4.0, 2.0, 4.0]
    assert [o["pp"][0] for o in out] == [0.0, 1.0, 2.0, 3.0]
