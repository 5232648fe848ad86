"""Group-quantized weights in llama.cpp's Q8_0, Q4_0 and Q4_1 block formats (32 weights a block, fp16 scale).

Why these two: they are what llama.cpp users run (Q4_0 / Q8_0 GGUF files), so a GGUF's blocks can be kept
as they are, and a block of 32 is what a vectorised kernel reads at full width (16 bytes of 4-bit codes, or
32 bytes of 8-bit codes, plus 2 bytes of scale). Layout per row of d weights (d a multiple of 32):

    Q8_0  codes (n, d) int8,          scales (n, d/32) fp16;   w = scale * q,        q in [-127, 127]
    Q4_0  codes (n, d/2) uint8,       scales (n, d/32) fp16;   w = scale * (q - 8),  q in [0, 15];
          byte k of block b holds weight 32b + k in its low nibble and 32b + k + 16 in its high nibble
    Q4_1  codes as Q4_0, scales and mins (n, d/32) fp16;       w = scale * q + min   (an offset grid)

Quantization follows ggml-quants.c (and the `gguf` package's numpy port) bit for bit: Q8_0 scale =
max|w| / 127, codes rounded half away from zero; Q4_0 scale = (the weight of largest magnitude, signed) / -8,
codes trunc(w / scale + 8.5) clipped to 15; Q4_1 scale = (max - min) / 15, codes trunc((w - min) / scale + 0.5);
all computed in fp32, scales and mins stored as fp16.
tests/test_quant.py checks equality with the `gguf` package on random and adversarial rows.

Kernels reading these blocks (Numba on the CPU, CUDA on the GPU) are not written yet; `dequantize_*` is
their reference, and `fake_quantize` (quantize, then dequantize) is what the quality measurement
(`bench/quant_quality.py`) runs.
"""
from __future__ import annotations

import torch

from hybrid_runtime.errors import UserError

BLOCK = 32
FORMATS = ("q8_0", "q4_0", "q4_1")


def _blocks(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise UserError(f"quantization needs (rows, d) weights with d a multiple of {BLOCK}, got {tuple(w.shape)}")
    return w.detach().float().reshape(w.shape[0], w.shape[1] // BLOCK, BLOCK)      # (n, d/32, 32)


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) float -> (codes (n, d) int8, scales (n, d/32) fp16)."""
    b = _blocks(w)
    scale = b.abs().amax(dim=-1, keepdim=True) / 127                              # (n, d/32, 1)
    v = b * _inverse(scale)
    a = v.abs()
    rounded = torch.floor(a) + torch.floor(2 * (a - torch.floor(a)))               # half away from zero
    q = (torch.sign(v) * rounded).to(torch.int8)
    return q.reshape(w.shape), scale.squeeze(-1).half()


def dequantize_q8_0(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n, d = codes.shape
    return (codes.float().reshape(n, d // BLOCK, BLOCK) * scales.float()[..., None]).reshape(n, d)


def quantize_q4_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) float -> (codes (n, d/2) uint8, two per byte, scales (n, d/32) fp16)."""
    b = _blocks(w)
    extreme = b.gather(-1, b.abs().argmax(dim=-1, keepdim=True))                  # signed, (n, d/32, 1)
    scale = extreme / -8
    q = torch.trunc(b * _inverse(scale) + 8.5).clamp(0, 15).to(torch.uint8)      # (n, d/32, 32)
    return _pack4(q, *w.shape), scale.squeeze(-1).half()


def dequantize_q4_0(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    q = _unpack4(codes) - 8                                                          # (n, d/32, 32)
    return (q * scales.float()[..., None]).reshape(codes.shape[0], 2 * codes.shape[1])


def _pack4(q: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """(n, d/32, 32) codes in [0, 15] -> (n, d/2) bytes: low nibble weight k, high nibble weight k + 16."""
    return (q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)).reshape(n, d // 2)


def _unpack4(codes: torch.Tensor) -> torch.Tensor:
    n, half = codes.shape
    c = codes.reshape(n, half // (BLOCK // 2), BLOCK // 2)
    return torch.cat([c & 0x0F, c >> 4], dim=-1).float()                            # (n, d/32, 32)


def quantize_q4_1(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, d) float -> (codes (n, d/2) uint8, scales (n, d/32) fp16, mins (n, d/32) fp16)."""
    b = _blocks(w)
    lo, hi = b.amin(dim=-1, keepdim=True), b.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / 15
    q = torch.trunc((b - lo) * _inverse(scale) + 0.5).clamp(0, 15).to(torch.uint8)
    return _pack4(q, *w.shape), scale.squeeze(-1).half(), lo.squeeze(-1).half()


def dequantize_q4_1(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    q = _unpack4(codes)
    return (q * scales.float()[..., None] + mins.float()[..., None]).reshape(codes.shape[0], 2 * codes.shape[1])


def fake_quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w quantized to `fmt` and back, in w's dtype: the weights a kernel reading `fmt` blocks computes with."""
    if fmt == "q8_0":
        return dequantize_q8_0(*quantize_q8_0(w)).to(w.dtype)
    if fmt == "q4_0":
        return dequantize_q4_0(*quantize_q4_0(w)).to(w.dtype)
    if fmt == "q4_1":
        return dequantize_q4_1(*quantize_q4_1(w)).to(w.dtype)
    raise UserError(f"unknown weight format {fmt!r} (use one of: {', '.join(FORMATS)})")
