"""AdamW with its moments stored in bf16, stochastically rounded (``optimizer.state_dtype: bf16``).

Adam's two moments are 8 of the 12 bytes of optimizer state per parameter; stored in bf16
they take 4, the fp32 masters staying fp32 (the update is computed in fp32 from them). Plain
round-to-nearest would lose updates smaller than half a bf16 ulp (``exp_avg_sq`` moves by
``(1 - beta2) * g^2``, often far below that); stochastic rounding (up with probability equal
to the discarded fraction) keeps every stored moment unbiased, which is what lets bf16 state
train like fp32 state (Zamirai et al., arXiv:2010.06192).

Why a kernel of our own. The well-kept alternative, torchao's low-bit optimizers
(``torchao.optim.AdamW8bit``: 8-bit block-wise state), runs on the CPU, but measured here at
~165 ns per element per step on one 16 MiB piece (torch's fused fp32 AdamW: ~3 ns), and its
state is a tensor subclass the offload tiers cannot store and stream as plain buffers. Written
as torch element-wise ops, the step costs ~60 ns per element on this machine (30 Python-level
ops per cache-sized chunk). So the step is one function fused by ``torch.compile`` (inductor
emits one C++ loop: ~3.5 ns per element on one core, against the fused fp32 AdamW's 1.3),
with plain bf16 tensors as state; where compiling is not possible (no C++ compiler) the same
function runs eagerly, with a warning.

The rounding noise is a hash of (the value's fp32 bits, the step, which moment): no random
generator state to keep, so a run resumes exactly from a checkpoint, and an element with the
same value at the same step rounds the same way whatever holds it (resident or offloaded
state, any piece boundaries).
"""

from __future__ import annotations

import math
import threading
import warnings

import torch

_C1, _C2 = 0x7FEB352D, 0x2C1B3C6D  # odd multipliers of a 32-bit integer hash (low-bias mixers)


def _seed(step: int, which: int) -> int:
    """A seed per (step, moment): the hash's other input (a 31-bit non-negative int)."""
    x = (step * 0x9E3779B1 + which * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    x ^= x >> 15
    return ((x * 0x2C1B3C6D) & 0xFFFFFFFF) >> 1


def round_stochastic(x: torch.Tensor, seed) -> torch.Tensor:
    """``x`` (fp32) rounded to bf16, up with probability equal to the part of ``x`` bf16 cannot
    hold: 16 noise bits (a hash of ``x``'s bits and ``seed``) are added to the 16 bits bf16
    drops, so the carry reaches the kept bits with exactly that probability; the low bits are
    then cleared and the conversion is exact. int32 multiplication wraps (two's complement) in
    torch's kernels and in inductor's."""
    bits = x.view(torch.int32)
    h = (bits ^ seed) * _C1
    h = (h ^ (h >> 15)) * _C2
    noise = (h >> 16) & 0xFFFF
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _adamw_bf16(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                hp: torch.Tensor, seeds: torch.Tensor) -> None:
    """One AdamW step of flat fp32 ``p`` with gradient ``g`` and bf16 moments ``m``, ``v``, in
    place; ``hp`` = [1-beta1, beta2, 1-beta2, -lr/bc1, 1/sqrt(bc2), eps, 1-lr*wd] (a tensor, so
    the compiled kernel is not specialised on their values). torch's AdamW arithmetic, in fp32."""
    m32 = m.float().lerp(g, hp[0])
    v32 = v.float() * hp[1] + g * g * hp[2]
    den = torch.sqrt(v32) * hp[4] + hp[5]
    p.mul_(hp[6]).add_(m32 / den * hp[3])
    m.copy_(round_stochastic(m32, seeds[0]))
    v.copy_(round_stochastic(v32, seeds[1]))


class _Kernel:
    """``_adamw_bf16`` compiled once per process (dynamic shapes: one graph for every piece
    size), or eager if compiling fails."""

    def __init__(self):
        self.fn = None
        self.lock = threading.Lock()

    def __call__(self, *args) -> None:
        if self.fn is None:
            with self.lock:
                if self.fn is None:
                    self.fn = self._first(*args)
                    return
        self.fn(*args)

    def _first(self, *args):
        compiled = torch.compile(_adamw_bf16, dynamic=True, fullgraph=True)
        try:
            compiled(*args)  # compiles before it runs: a failure has changed nothing
            return compiled
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            warnings.warn(f"optimizer.state_dtype=bf16: torch.compile of the bf16 AdamW kernel failed "
                          f"({type(e).__name__}: {str(e)[:200]}); stepping eagerly (same arithmetic, "
                          f"~20x slower)", RuntimeWarning, stacklevel=3)
            _adamw_bf16(*args)
            return _adamw_bf16


KERNEL = _Kernel()


class CompactAdamW(torch.optim.Optimizer):
    """torch's AdamW (decoupled weight decay, no amsgrad) over fp32 parameters, with
    ``exp_avg`` and ``exp_avg_sq`` kept in bf16; ``step`` is a float32 tensor as in torch."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            state.setdefault("step", torch.zeros((), dtype=torch.float32))
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.bfloat16, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.bfloat16, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.float32 or not p.is_contiguous():
                    raise ValueError("CompactAdamW steps contiguous fp32 parameters (ZeRO's masters)")
                state = self._state(p)
                state["step"] += 1
                step = int(state["step"])
                KERNEL(p.view(-1), p.grad.reshape(-1), state["exp_avg"].view(-1),
                       state["exp_avg_sq"].view(-1), _hyper(group, step, p.device),
                       torch.tensor([_seed(step, 1), _seed(step, 2)], dtype=torch.int32, device=p.device))
        return loss


def _hyper(group: dict, step: int, device: torch.device) -> torch.Tensor:
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    return torch.tensor([1 - b1, b2, 1 - b2, -lr / (1 - b1 ** step), 1 / math.sqrt(1 - b2 ** step),
                         eps, 1 - lr * wd], dtype=torch.float32, device=device)
