"""The torch APIs tetrad uses that are newer than its floor (``torch>=2.6``), each with the
older spelling it falls back to. One home, so the declared range is honest: everything else
tetrad calls exists in 2.6 (``tests/test_compat.py`` removes these names from torch and runs
the tensor-parallel and ZeRO paths).

Looked up at call time, not import time: a test (or an older torch) without the new name
takes the fallback whenever it runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_single(out: torch.Tensor, inp: torch.Tensor, group=None, async_op: bool = False):
    """``dist.all_gather_single`` (torch 2.13's name), else ``all_gather_into_tensor``."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


def reduce_scatter_single(out: torch.Tensor, inp: torch.Tensor, group=None, async_op: bool = False):
    """``dist.reduce_scatter_single`` (torch 2.13's name), else ``reduce_scatter_tensor``."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group, async_op=async_op)


def default_backend(device: torch.device) -> str:
    """The process-group backend for a device type: torch's own answer where it has one."""
    fn = getattr(dist, "get_default_backend_for_device", None)
    if fn is not None:
        return fn(device)
    return dist.Backend.default_device_backend_map.get(device.type, "gloo")  # torch's table, older name


def _accel(name: str):
    """``torch.accelerator.<name>`` where this torch has it, else ``torch.cuda.<name>``."""
    return getattr(torch.accelerator, name, None) or getattr(torch.cuda, name)


def max_memory_allocated(device: torch.device) -> int:
    return _accel("max_memory_allocated")(device)


def memory_info(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of device memory."""
    fn = getattr(torch.accelerator, "get_memory_info", None)
    return fn(device) if fn is not None else torch.cuda.mem_get_info(device)


def reset_peak_memory_stats(device: torch.device) -> None:
    _accel("reset_peak_memory_stats")(device)
