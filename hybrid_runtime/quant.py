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

At rest a quantized matrix (n, d) is one uint8 array (n, d/32 * block bytes): each row its blocks in
order, each block its fp16 scale (and fp16 min for Q4_1) then its codes, byte for byte a GGUF tensor's
data (`to_blocks` / `from_blocks`). So a GGUF file's blocks are used as they are (no copy), a row is one
memory stream, and the Numba kernels (`cpu_ffn._block_dot_row_q`, `_block_axpy_row`) read rows of it; their
reference is `from_blocks` (de-quantize), then float64 arithmetic.

The modules: `BlockLinear` (a Linear whose weight is blocks) and `BlockFeedForward` (the dense FFN with
gate, up (f, d) and down in the checkpoint's own (d, f) orientation, so down's blocks run along the
neurons as in every GGUF file: the Q4_1 quality measurement found +9.6% perplexity when down is blocked
the other way). `quantize_model_` swaps them in. Their torch `forward` de-quantizes the whole matrix per
call (the prefill: ~4 G weights/s on the dev VM's two cores); decode on the CPU reads the blocks
directly (cpu_decode.py).
There are no CUDA kernels for blocks yet: quantized weights run on the CPU only.
`fake_quantize` (quantize, then dequantize) is what the quality measurement (`bench/quant_quality.py`) runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_runtime.errors import UserError

BLOCK = 32
FORMATS = ("q8_0", "q4_0", "q4_1")
BLOCK_BYTES = {"q8_0": 2 + 32, "q4_0": 2 + 16, "q4_1": 2 + 2 + 16}   # per 32 weights
# what the --weights names mean: int8 is Q8_0, int4 is Q4_1 (its offset grid loses far less than
# Q4_0's on the real model: bench/results/README.md, quantization quality)
WEIGHT_ALIASES = {"int8": "q8_0", "int4": "q4_1"}


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


# ----------------------------------------------------------------------------- GGUF block layout

def _half_bytes(h: torch.Tensor) -> torch.Tensor:
    """(n, nb) fp16 -> (n, nb, 2) its little-endian bytes."""
    return h.contiguous().view(torch.uint8).reshape(*h.shape, 2)


def to_blocks(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """(n, d) float -> (n, d/32 * BLOCK_BYTES[fmt]) uint8: a GGUF tensor's data, byte for byte."""
    n, d = w.shape
    nb = d // BLOCK
    if fmt == "q8_0":
        codes, scales = quantize_q8_0(w)
        parts = [_half_bytes(scales), codes.view(torch.uint8).reshape(n, nb, BLOCK)]
    elif fmt == "q4_0":
        codes, scales = quantize_q4_0(w)
        parts = [_half_bytes(scales), codes.reshape(n, nb, BLOCK // 2)]
    elif fmt == "q4_1":
        codes, scales, mins = quantize_q4_1(w)
        parts = [_half_bytes(scales), _half_bytes(mins), codes.reshape(n, nb, BLOCK // 2)]
    else:
        raise UserError(f"unknown weight format {fmt!r} (use one of: {', '.join(FORMATS)})")
    return torch.cat(parts, dim=-1).reshape(n, nb * BLOCK_BYTES[fmt])


def from_blocks(blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    """(n, row bytes) uint8 blocks -> (n, d) float32: the reference every block kernel is checked against."""
    n, nb = blocks.shape[0], blocks.shape[1] // BLOCK_BYTES[fmt]
    b = blocks.reshape(n, nb, BLOCK_BYTES[fmt])                                      # (n, nb, bytes)

    def half(o: int) -> torch.Tensor:
        return b[..., o:o + 2].contiguous().view(torch.float16).reshape(n, nb)      # (n, nb)
    if fmt == "q8_0":
        return dequantize_q8_0(b[..., 2:].contiguous().view(torch.int8).reshape(n, nb * BLOCK), half(0))
    if fmt == "q4_0":
        return dequantize_q4_0(b[..., 2:].reshape(n, nb * BLOCK // 2), half(0))
    return dequantize_q4_1(b[..., 4:].reshape(n, nb * BLOCK // 2), half(0), half(2))


def block_row_bytes(d: int, fmt: str) -> int:
    return d // BLOCK * BLOCK_BYTES[fmt]


def weight_format(name: str) -> str:
    """A --weights value -> block format (q8_0 / q4_0 / q4_1); UserError for anything else."""
    fmt = WEIGHT_ALIASES.get(name, name)
    if fmt not in FORMATS:
        raise UserError(f"--weights: unknown format {name!r} (use one of: "
                        f"{', '.join(list(WEIGHT_ALIASES) + list(FORMATS))})")
    return fmt


# ----------------------------------------------------------------------------- modules

class BlockLinear(nn.Module):
    """y = x W^T (+ b) with W (out, in) held as blocks (uint8 (out, in/32 * block bytes)).

    forward de-quantizes W per call (prefill, the reference); cpu_decode.py reads `blocks` directly."""

    def __init__(self, blocks: torch.Tensor, fmt: str, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != block_row_bytes(in_features, fmt):
            raise UserError(f"{fmt} blocks for {in_features} inputs: expected uint8 (rows, "
                            f"{block_row_bytes(in_features, fmt)}), got {blocks.dtype} {tuple(blocks.shape)}")
        self.fmt, self.in_features, self.out_features = fmt, in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """W (out, in) fp32, by the block kernels' own row decoder (tests compare it with `from_blocks`)."""
        from hybrid_runtime.cpu_ffn import BLOCK_FORMATS, decode_block_rows
        out = torch.empty(self.out_features, self.in_features)
        decode_block_rows(self.blocks.numpy(), BLOCK_FORMATS[self.fmt], out.numpy())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized().to(x.dtype), bias)

    @classmethod
    def quantize(cls, w: torch.Tensor, fmt: str, bias: torch.Tensor | None = None) -> "BlockLinear":
        return cls(to_blocks(w, fmt), fmt, w.shape[1], bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}"


class BlockExpert(nn.Module):
    """A gated FFN over blocks, y = down (act(gate x) * (up x)): one expert of an MoE FFN.

    gate, up: (f, d) rows; down: (d, f) rows, the checkpoint's orientation (HF down_proj.weight, GGUF
    ffn_down), so its blocks run along the neurons."""

    def __init__(self, gate: BlockLinear, up: BlockLinear, down: BlockLinear, activation):
        super().__init__()
        self.gate, self.up, self.down = gate, up, down
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.gate(x), self.up(x)))       # (..., d)

    @classmethod
    def quantize(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, fmt: str, activation):
        """From the engine's neuron-major (f, d) gate, up and down rows."""
        return cls(BlockLinear.quantize(gate.float(), fmt), BlockLinear.quantize(up.float(), fmt),
                   BlockLinear.quantize(down.t().float(), fmt), activation)


class BlockFeedForward(BlockExpert):
    """The dense FFN over blocks: a BlockExpert on x = norm(h) (the block owns its norm, as FeedForward)."""

    def __init__(self, norm: nn.Module, gate: BlockLinear, up: BlockLinear, down: BlockLinear, activation):
        super().__init__(gate, up, down, activation)
        self.norm = norm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(self.norm(h))                               # (B, T, d)


def quantize_attention_and_head_(model, fmt: str) -> None:
    """In place: each layer's fused qkv and wo, and the lm_head, become `fmt` blocks (the FFN is left as it is:
    a hybrid model's cold rows have their own format)."""
    for layer in model.layers:
        a = layer.attn
        a.wqkv = BlockLinear.quantize(a.wqkv.weight.float(), fmt, a.wqkv.bias)
        a.wo = BlockLinear.quantize(a.wo.weight.float(), fmt, a.wo.bias)
    model.output = BlockLinear.quantize(model.output.weight.float(), fmt)


def quantize_model_(model, fmt: str) -> None:
    """In place: every matrix of the dense engine (fused qkv, wo, each FFN's or expert's gate/up/down, lm_head)
    becomes `fmt` blocks; embeddings (a lookup of one row a token), norms and an MoE router stay float. CPU."""
    from hybrid_runtime.model import FeedForward, MoEFeedForward
    quantize_attention_and_head_(model, fmt)
    for layer in model.layers:
        ffn = layer.ffn
        if type(ffn) is MoEFeedForward:       # the router stays float; each expert's matrices become blocks
            ffn.experts = nn.ModuleList(BlockExpert.quantize(ex.gate, ex.up, ex.down, fmt, ex.activation)
                                        for ex in ffn.experts)
            continue
        if type(ffn) is not FeedForward:
            raise UserError(f"quantized weights need the dense FFN, not {type(ffn).__name__}")
        e = BlockExpert.quantize(ffn.gate, ffn.up, ffn.down, fmt, ffn.activation)
        layer.ffn = BlockFeedForward(ffn.norm, e.gate, e.up, e.down, ffn.activation)


def block_formats(model) -> set[str]:
    """The block formats of the model's matrices (empty for a float model)."""
    return {m.fmt for m in model.modules() if isinstance(m, BlockLinear)}
