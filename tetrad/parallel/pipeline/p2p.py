"""Point-to-point transfers between pipeline stages with shapes known ahead.

Every activation and activation gradient crossing a stage boundary has the shape
``[micro_batch, local_seq, d_model]`` and the compute dtype, so the receiver allocates its
buffer without a shape handshake. Each message has a tag naming (direction, global chunk,
micro-batch): gloo matches receives by tag, so an activation and a gradient travelling
between the same two ranks (interleaved schedules with p = 2) can never be confused.

Sends never block the schedule: the executor posts the sends an action produced together
with the receive the next action needs in one ``batch_isend_irecv`` and waits only for the
receive (Megatron's ``send_forward_recv_backward`` pairing; on NCCL the batch is one group
call, which is what keeps opposite-direction pairs from deadlocking). Send handles are
waited at the end of the step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ACT, GRAD = 0, 1


class StageComm:
    """Transfers for one pipeline rank of ``group`` (the pp group: explicit, never global)."""

    def __init__(self, group, shape: tuple[int, ...] | None, dtype: torch.dtype, device: torch.device):
        self.group, self.dtype, self.device = group, dtype, device
        self.shape = tuple(shape) if shape is not None else None
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self._sends: list = []
        self._outbox: list[dist.P2POp] = []

    def peer(self, global_chunk: int) -> int:
        """Global rank of the pp rank holding ``global_chunk``."""
        return dist.get_global_rank(self.group, global_chunk % self.size)

    @staticmethod
    def tag(kind: int, chunk: int, mb: int) -> int:
        """Unique per message of a step: (kind, sending chunk, micro-batch)."""
        return (mb << 12) | (chunk << 1) | kind

    def send(self, t: torch.Tensor, kind: int, from_chunk: int, to_chunk: int, mb: int) -> None:
        """Queue ``t``; it goes out with the next ``recv`` or ``flush``."""
        if tuple(t.shape) != self.shape:
            raise RuntimeError(f"pipeline stage produced a tensor of shape {tuple(t.shape)} but the "
                               f"p2p shape is {self.shape} ([micro_batch, local_seq, d_model])")
        t = t.detach().to(self.dtype).contiguous()
        self._outbox.append(dist.P2POp(dist.isend, t, self.peer(to_chunk), self.group,
                                       self.tag(kind, from_chunk, mb)))

    def recv(self, kind: int, from_chunk: int, mb: int) -> torch.Tensor:
        """Post queued sends and this receive together; wait for the receive only."""
        buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        op = dist.P2POp(dist.irecv, buf, self.peer(from_chunk), self.group, self.tag(kind, from_chunk, mb))
        works = dist.batch_isend_irecv(self._outbox + [op])
        self._sends += list(zip(works[:-1], self._outbox))  # keep buffers alive until sent
        self._outbox = []
        works[-1].wait()
        return buf

    def flush(self) -> None:
        """Post queued sends (no receive to pair them with)."""
        if self._outbox:
            works = dist.batch_isend_irecv(self._outbox)
            self._sends += list(zip(works, self._outbox))
            self._outbox = []

    def wait_sends(self) -> None:
        self.flush()
        for work, _ in self._sends:
            work.wait()
        self._sends = []
