"""Host <-> device copies off the compute stream, for the offload tiers and the checkpoint
snapshot: on a side stream, into pinned memory, ordered by events, so they overlap compute
instead of serialising with it, and background threads that touch the device set it first.

Its own module at the bottom floor because two packages far apart need the same few lines
(tetrad.offload, tetrad.checkpoint), and ``Done`` (a finished handle) with them.

``to_host(src)`` (main thread, inside backward or after a step): the side stream waits for
the compute stream's work so far (an event, not a device-wide synchronize), copies ``src``
into a pinned host tensor without blocking, and returns ``(host, ready)``; whoever reads
``host`` on the CPU calls ``ready.wait()`` first, from any thread (CUDA events belong to
their device, not to the calling thread's current device). ``src`` is marked as used by the
side stream, so the caching allocator does not hand its memory out before the copy is done.
``after`` (an event recorded elsewhere, e.g. on the training thread when a checkpoint was
asked for) orders the copy after that point instead of after the calling thread's stream.

On the CPU the device is the host: nothing moves, ``to_host`` returns ``src`` itself and a
finished handle, so the same code paths run (and are tested) on a machine without a GPU.
"""

from __future__ import annotations

import torch


class Done:
    """A handle of work that finished when it was issued: a collective with nothing to
    communicate (a group of one), a host-memory copy. Same surface as the async handles it
    stands in for (c10d ``Work.wait``, offload ``Transfer.done``/``add_done_callback``)."""

    def wait(self) -> bool:
        return True

    def done(self) -> bool:
        return True

    def add_done_callback(self, cb) -> None:
        cb(self)


class _Ready:
    """A recorded event: ``wait`` blocks the calling thread until the copy has landed."""

    def __init__(self, event):
        self.event = event

    def wait(self) -> bool:
        self.event.synchronize()
        return True

    def done(self) -> bool:
        return self.event.query()


class DeviceCopies:
    def __init__(self, device: torch.device):
        self.device = device
        self.on_host = device.type == "cpu"
        if not self.on_host:
            self.mod = torch.get_device_module(device)
            self.stream = self.mod.Stream(device=device)

    def mark(self):
        """An event at this point of the calling thread's stream (None on the CPU)."""
        if self.on_host:
            return None
        event = self.mod.Event()
        event.record(self.mod.current_stream(self.device))
        return event

    def to_host(self, src: torch.Tensor, dtype: torch.dtype | None = None, after=None):
        """(host tensor with ``src``'s values, in ``dtype`` if given; a handle to wait on)."""
        if self.on_host or src.device.type == "cpu":
            return (src if dtype in (None, src.dtype) else src.to(dtype)), Done()
        if dtype not in (None, src.dtype):
            src = src.to(dtype)  # on the compute stream: a device-side cast, then one copy
        host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        return host, self.into_host(host, src, after)

    def into_host(self, dst: torch.Tensor, src: torch.Tensor, after=None):
        """Copy ``src`` into the host tensor ``dst`` (pinned for the copy to be asynchronous);
        returns the handle to wait on before ``dst`` is read."""
        if self.on_host or src.device.type == "cpu":
            dst.copy_(src)
            return Done()
        if after is not None:
            self.stream.wait_event(after)
        else:
            self.stream.wait_stream(self.mod.current_stream(self.device))
        with self.mod.stream(self.stream):
            dst.copy_(src, non_blocking=dst.is_pinned())
        src.record_stream(self.stream)
        event = self.mod.Event()
        event.record(self.stream)
        return _Ready(event)

    def order_after(self, handle) -> None:
        """Make the calling thread's stream wait (on the device, not the CPU) for a copy."""
        if isinstance(handle, _Ready):
            self.mod.current_stream(self.device).wait_event(handle.event)


def set_thread_device(device: torch.device) -> None:
    """A background thread's first act: make ``device`` its current device, so that anything
    it asks of the accelerator (events, copies, synchronize) concerns this rank's device, not
    device 0 (CUDA's current device is per thread)."""
    if device.type != "cpu":
        torch.get_device_module(device).set_device(device)
