"""Block-wise symmetric int8 quantization, the number format of ZeRO++'s qwZ and qgZ.

A flat tensor is cut into blocks of ``BLOCK`` elements (the last one zero padded); each block
keeps one fp32 scale ``s = max|x| / 127`` and its elements as ``q = round(x / s)`` in int8.
Dequantizing gives ``s * q``. Error bound, per element: ``|x - s q| <= s / 2 = max|x_block| / 254``
(round to nearest; fp32 rounding of ``x / s`` and ``s * q`` adds ~1e-7 relative), so at most
``||x||_inf / 254``, about 0.4% of the largest value in the element's block. Per-block scales
(rather than one per tensor) keep a few large values from flattening every other block. On the
wire an element costs 1 + 4 / BLOCK bytes (1.016 with 256-element blocks): a quarter of fp32,
about half of bf16 / fp16.

Written here rather than taken from DeepSpeed's CUDA quantizer kernels because tetrad must run
the same numerics on the CPU (gloo) and on any accelerator; these are a few vectorised torch ops.
"""

from __future__ import annotations

import torch

BLOCK = 256
QMAX = 127


def padded(n: int, block: int = BLOCK) -> int:
    """Elements of ``n`` rounded up to whole blocks."""
    return -(-n // block) * block


def quantize_rows(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D ``x`` [r, n] quantized on its own: (int8 [r, padded(n)], fp32 scales
    [r, padded(n) / block]). Rows are what a collective sends to different peers, so every
    block lies in one row."""
    rows, n = x.shape
    width = padded(n, block)
    buf = torch.zeros(rows, width, dtype=torch.float32, device=x.device)
    buf[:, :n] = x
    blocks = buf.view(rows, width // block, block)
    scales = blocks.abs().amax(dim=2) / QMAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block stays zero
    q = torch.round(blocks / safe.unsqueeze(2)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.view(rows, width), scales


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, n: int, block: int = BLOCK) -> torch.Tensor:
    """fp32 [r, n] from ``quantize_rows``' output (the padding dropped)."""
    rows, width = q.shape
    values = q.view(rows, width // block, block).to(torch.float32) * scales.unsqueeze(2)
    return values.view(rows, width)[:, :n]


def quantize(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat tensor: (int8 [padded(n)], fp32 scales [padded(n) / block])."""
    q, s = quantize_rows(x.reshape(1, -1), block)
    return q.view(-1), s.view(-1)


def dequantize(q: torch.Tensor, scales: torch.Tensor, n: int, block: int = BLOCK) -> torch.Tensor:
    return dequantize_rows(q.view(1, -1), scales.view(1, -1), n, block).reshape(-1)


def error_bound(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Per element, the bound above: half a quantization step of the element's block."""
    flat = x.reshape(-1).to(torch.float32)
    width = padded(flat.numel(), block)
    buf = torch.zeros(width, dtype=torch.float32, device=flat.device)
    buf[:flat.numel()] = flat.abs()
    step = buf.view(-1, block).amax(dim=1, keepdim=True) / QMAX
    return (step / 2).expand(-1, block).reshape(-1)[:flat.numel()]


def wire_bytes(n: int, block: int = BLOCK) -> int:
    """Bytes ``n`` elements take quantized: int8 values plus one fp32 scale per block."""
    return padded(n, block) + 4 * padded(n, block) // block
