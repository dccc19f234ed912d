"""The parallel layout as one validated object, and the DeviceMesh built from it.

Axis order is ``("pp", "dp", "cp", "sp", "tp")``: tp innermost so a tensor-parallel group is
made of neighbouring ranks (on a real cluster, the GPUs of one node, where bandwidth is
highest), then Ulysses sp (an all-to-all per attention), then cp (ring attention's K/V hops,
each hidden behind a block of attention), then dp, with pipeline stages outermost because
they exchange the least data (torchtitan orders its cp axis the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

AXES = ("pp", "dp", "cp", "sp", "tp")


class LayoutError(ValueError):
    """A parallel layout that cannot be built on this world size."""


@dataclass
class ParallelDims:
    """Degrees of the five parallel axes; ``dp=-1`` means "whatever is left of the world"."""

    world_size: int
    pp: int = 1
    dp: int = -1
    sp: int = 1
    tp: int = 1
    cp: int = 1
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for axis in ("pp", "cp", "sp", "tp"):
            if getattr(self, axis) < 1:
                raise LayoutError(f"strategy.{axis}={getattr(self, axis)}: degrees must be >= 1")
        inner = self.pp * self.cp * self.sp * self.tp
        if self.world_size % inner:
            raise LayoutError(
                f"world size {self.world_size} is not divisible by tp*pp*sp*cp = "
                f"{self.tp}*{self.pp}*{self.sp}*{self.cp} = {inner}")
        if self.dp == -1:
            self.dp = self.world_size // inner
        if self.dp * inner != self.world_size:
            raise LayoutError(
                f"strategy.dp={self.dp}: tp*pp*sp*cp*dp = {self.dp * inner} but the world has "
                f"{self.world_size} ranks; use dp={self.world_size // inner} or dp: auto")

    @property
    def degrees(self) -> tuple[int, ...]:
        return tuple(getattr(self, axis) for axis in AXES)

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    def build_mesh(self, device: torch.device) -> DeviceMesh:
        """The DeviceMesh over the default process group, built once."""
        if self._mesh is None:
            if dist.get_world_size() != self.world_size:
                raise LayoutError(f"layout is for {self.world_size} ranks but the process group "
                                  f"has {dist.get_world_size()}")
            self._mesh = init_device_mesh(device.type, self.degrees, mesh_dim_names=AXES)
        return self._mesh

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along every axis (row-major over AXES, as the mesh lays them out)."""
        out = {}
        for axis, degree in zip(reversed(AXES), reversed(self.degrees)):
            out[axis] = rank % degree
            rank //= degree
        return {axis: out[axis] for axis in AXES}
