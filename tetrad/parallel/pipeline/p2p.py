"""Point-to-point transfers between pipeline stages with shapes known ahead.

Every activation and activation gradient crossing a stage boundary has the shape
``[micro_batch, local_seq, d_model]`` and the compute dtype, so the receiver allocates its
buffer without a shape handshake. Each message has a tag naming (direction, global chunk,
micro-batch): gloo matches receives by tag, so an activation and a gradient travelling
between the same two ranks (interleaved schedules with p = 2) can never be confused.

With tensor parallelism (and no Megatron-SP) the tensors crossing a boundary are replicated
over the tp group: each tp rank sends only its 1/tp of the flattened tensor to the same tp
rank of the next stage, and the receiver all-gathers the pieces over its tp group (Megatron's
scatter/gather; the pieces are padded to equal length when tp does not divide the size). The
receiving tp ranks run the same schedule, so their all-gathers pair up in order. ``sent_bytes``
and ``sent_messages`` count what this rank put on the wire (reset by the executor each step).

Sends never block the schedule: the executor posts the sends an action produced right
before the receive the next action needs, and waits only for the receive; send handles are
waited at the end of the step. Each ordered pair of neighbouring stages (sender, receiver)
has a communicator of its own (``ring_channels``): on NCCL the ops of one communicator run
in order on one stream and a send completes only once its receive has started, so two
stages sending to each other on one communicator -- interleaved 1F1B with more
micro-batches than stages -- wait on each other forever. With one channel per direction of
each pair, a send waits only for the receives it feeds, which the receiver posts in the same
order (``tetrad.parallel.pipeline.nccl`` checks every schedule under NCCL's rules). gloo
would not need it (it matches by tag and completes each op alone); one code path runs on both.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from tetrad.parallel.comm import all_gather_tensor

ACT, GRAD = 0, 1


def _ranks(group) -> list[int]:
    return [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]


def ring_channels(lines: list[list[int]]) -> dict[tuple[int, int], object]:
    """One communicator per ordered pair of ring neighbours (r -> r+1 and r+1 -> r, wrapping)
    of every pipeline line (its global ranks in stage order); returns this rank's, keyed by
    (sender, receiver) stage index. Collective: every rank of the world calls it with the same
    lines (``dist.new_group`` needs all of them, in one order)."""
    me, mine = dist.get_rank(), {}
    for line in lines:
        p = len(line)
        pairs = sorted({(r, (r + 1) % p) for r in range(p)} | {((r + 1) % p, r) for r in range(p)})
        for src, dst in pairs:
            if src == dst:
                continue
            group = dist.new_group(sorted({line[src], line[dst]}))
            if me in (line[src], line[dst]):
                mine[(src, dst)] = group
    return mine


class StageComm:
    """Transfers for one pipeline rank of ``group`` (the pp group: explicit, never global).

    ``tp_group``: the group over which boundary tensors are replicated (send 1/tp, all-gather
    on receipt); None or a group of one sends them whole.
    """

    def __init__(self, group, shape: tuple[int, ...] | None, dtype: torch.dtype, device: torch.device,
                 *, tp_group=None, owner=None, channels: dict | None = None):
        self.group, self.dtype, self.device = group, dtype, device
        self.owner = owner  # global chunk -> pp rank holding it (None: round-robin, chunk % size)
        # {(sender pp rank, receiver pp rank): group}; the group itself when the caller made
        # none (a pp group of 2 on gloo, or a test): every rank of the world must build them
        self.channels = channels if channels is not None else ring_channels([_ranks(group)])
        self.shape = tuple(shape) if shape is not None else None
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_group = tp_group if tp > 1 else None
        self.tp, self.tp_rank = tp, (dist.get_rank(tp_group) if tp > 1 else 0)
        self.sent_bytes = self.sent_messages = 0
        self.traffic = None  # a tetrad.traffic.Traffic: each send counted intra/inter node
        self._sends: list = []
        self._outbox: list[dist.P2POp] = []

    def piece_numel(self) -> int:
        """Elements of one message: the whole tensor, or its 1/tp piece (rounded up)."""
        return math.ceil(math.prod(self.shape) / self.tp)

    def reset_counts(self) -> None:
        self.sent_bytes = self.sent_messages = 0

    def holder(self, global_chunk: int) -> int:
        """The pp rank holding ``global_chunk``."""
        return self.owner(global_chunk) if self.owner else global_chunk % self.size

    def peer(self, global_chunk: int) -> int:
        """Global rank of the pp rank holding ``global_chunk``."""
        return dist.get_global_rank(self.group, self.holder(global_chunk))

    @staticmethod
    def tag(kind: int, chunk: int, mb: int) -> int:
        """Unique per message of a step: (kind, sending chunk, micro-batch)."""
        return (mb << 12) | (chunk << 1) | kind

    def send(self, t: torch.Tensor, kind: int, from_chunk: int, to_chunk: int, mb: int) -> None:
        """Queue ``t``; it goes out with the next ``recv`` or ``flush``."""
        if tuple(t.shape) != self.shape:
            raise RuntimeError(f"pipeline stage produced a tensor of shape {tuple(t.shape)} but the "
                               f"p2p shape is {self.shape} ([micro_batch, local_seq, d_model])")
        t = t.detach().to(self.dtype)
        if self.tp_group is not None:  # replicated over tp: my 1/tp piece is enough
            n = self.piece_numel()
            flat = t.reshape(-1)
            if n * self.tp != flat.numel():
                flat = torch.nn.functional.pad(flat, (0, n * self.tp - flat.numel()))
            t = flat[self.tp_rank * n:(self.tp_rank + 1) * n].clone()  # not a view: frees the rest
        else:
            t = t.contiguous()
        self.sent_bytes += t.numel() * t.element_size()
        self.sent_messages += 1
        if self.traffic is not None:
            self.traffic.send(self.peer(to_chunk), t.numel() * t.element_size())
        dst = self.holder(to_chunk)
        self._outbox.append(dist.P2POp(dist.isend, t, self.peer(to_chunk), self.channels[(self.rank, dst)],
                                       self.tag(kind, from_chunk, mb)))

    def recv(self, kind: int, from_chunk: int, mb: int) -> torch.Tensor:
        """Post queued sends and this receive together; wait for the receive only."""
        piece = self.tp_group is not None
        buf = torch.empty((self.piece_numel(),) if piece else self.shape, dtype=self.dtype,
                          device=self.device)
        src = self.holder(from_chunk)
        op = dist.P2POp(dist.irecv, buf, self.peer(from_chunk), self.channels[(src, self.rank)],
                        self.tag(kind, from_chunk, mb))
        self.flush()
        dist.batch_isend_irecv([op])[0].wait()
        if not piece:
            return buf
        full = all_gather_tensor(buf, 0, self.tp_group, self.traffic)  # every tp rank's piece, in rank order
        return full[:math.prod(self.shape)].view(self.shape)

    def flush(self) -> None:
        """Post queued sends, each on its channel (one op per group: a channel carries one
        direction of one pair, so nothing is gained by batching)."""
        for op in self._outbox:
            self._sends += [(w, op) for w in dist.batch_isend_irecv([op])]  # buffers live until sent
        self._outbox = []

    def wait_sends(self) -> None:
        self.flush()
        for work, _ in self._sends:
            work.wait()
        self._sends = []
