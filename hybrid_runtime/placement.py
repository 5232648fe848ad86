"""Neuron placement under a GPU memory budget (load time, milliseconds).

The hybrid model directory stores each layer's FFN neurons most-frequent-first, so a placement
is one number per layer: neurons [0, k_l) are hot (GPU), [k_l, f) are cold (CPU).

    budget - (embeddings, lm_head, attention, norms, KV cache, predictors, workspace) = FFN budget

Every neuron costs the same (its gate, up and down rows), so the choice that maximises the
expected activations served by the GPU is the globally most frequent neurons. The kernels want
hot blocks in multiples of a granule (e.g. 64 rows), so the solver ranks granule-sized blocks
of consecutive neurons (block value: its mean frequency; a layer's blocks rank in its order
because frequencies are sorted) and takes the best blocks while they fit. Taking a prefix of
one fixed ranking makes the placement monotone in the budget; a layer is fully hot only when
its last (possibly partial) block is taken.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hybrid_runtime.errors import UserError

GiB = 1024 ** 3

_UNITS = {"b": 1, "kb": 10 ** 3, "kib": 1024, "mb": 10 ** 6, "mib": 1024 ** 2,
          "gb": 10 ** 9, "gib": GiB, "tb": 10 ** 12, "tib": 1024 ** 4}


def parse_size(text: str | int) -> int:
    """'8GiB' / '7.5 GB' / '512MiB' / '1073741824' -> bytes (int). UserError on anything else."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        if text < 0:
            raise UserError(f"memory size must be >= 0, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS and unit != "":
        raise UserError(f"cannot read memory size {text!r}: use a number with a unit, e.g. 8GiB, 7.5GB, "
                        f"512MiB (units: B, KB, KiB, MB, MiB, GB, GiB, TB, TiB; no unit: bytes)")
    if unit == "" and "." in m.group(1):
        raise UserError(f"cannot read memory size {text!r}: a size in bytes must be a whole number")
    return int(float(m.group(1)) * _UNITS[unit or "b"])


def format_gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB"


_PART_NAMES = {"kv_cache": "KV cache"}


def _parts(fixed: dict[str, int]) -> str:
    return ", ".join(f"{_PART_NAMES.get(k, k)} {format_gib(v)}" for k, v in fixed.items() if v)


@dataclass
class ModelShape:
    """The numbers that decide GPU memory. `weight_bytes`: bytes per weight element on the GPU."""
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool = False
    attention_bias: bool = False
    weight_bytes: int = 2
    kv_bytes: int = 2            # bytes per KV cache element
    n_experts: int = 0           # a mixture of experts: E experts of ffn_dim neurons per layer (0: dense)

    @classmethod
    def from_config(cls, cfg, weight_bytes: int = 2, kv_bytes: int | None = None) -> "ModelShape":
        """From a `hybrid_runtime.model.ModelConfig` (duck-typed: any object with its fields)."""
        return cls(n_layers=cfg.n_layers, dim=cfg.dim, ffn_dim=cfg.ffn_dim, n_heads=cfg.n_heads,
                   n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
                   tie_embeddings=bool(cfg.tie_embeddings),
                   attention_bias=bool(getattr(cfg, "attention_bias", False)),
                   weight_bytes=weight_bytes, kv_bytes=weight_bytes if kv_bytes is None else kv_bytes,
                   n_experts=int(getattr(cfg, "n_experts", 0) or 0))

    @property
    def neuron_bytes(self) -> int:
        """GPU bytes of one FFN neuron: its gate, up and down rows."""
        return 3 * self.dim * self.weight_bytes

    def attention_bytes(self) -> int:
        """All layers' q, k, v, o projections (and biases)."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        per_layer = self.dim * (q + 2 * kv) + q * self.dim
        if self.attention_bias:
            per_layer += q + 2 * kv
        return self.n_layers * per_layer * self.weight_bytes

    def kv_cache_bytes(self, context: int, batch: int = 1) -> int:
        return 2 * self.n_layers * batch * context * self.n_kv_heads * self.head_dim * self.kv_bytes


@dataclass
class Placement:
    """Layer l's neurons [0, hot_counts[l]) on the GPU, the rest on the CPU; a mixture of experts:
    hot_counts[l] is a list, expert e's neurons [0, hot_counts[l][e]) on the GPU."""
    hot_counts: list
    ffn_dim: int
    granule: int
    budget_bytes: int
    fixed_bytes: dict[str, int]   # GPU bytes that are not FFN neurons, by part
    hot_bytes: int                # GPU bytes of the hot FFN rows
    cpu_bytes: int                # CPU bytes of the cold FFN rows (in the CPU storage format)
    gpu_share: float              # expected share of activations served by the GPU
    layer_shares: list[float]     # the same, per layer

    @property
    def gpu_bytes(self) -> int:
        return sum(self.fixed_bytes.values()) + self.hot_bytes

    @property
    def layer_hot(self) -> list[int]:
        """Hot neurons per layer (all experts)."""
        return [sum(k) if isinstance(k, list) else k for k in self.hot_counts]

    @property
    def layer_neurons(self) -> int:
        k = self.hot_counts[0]
        return self.ffn_dim * (len(k) if isinstance(k, list) else 1)

    @property
    def cold_counts(self) -> list[int]:
        return [self.layer_neurons - k for k in self.layer_hot]

    @property
    def hot_fraction(self) -> float:
        return sum(self.layer_hot) / (self.layer_neurons * len(self.hot_counts))


def solve_placement(shape: ModelShape, frequencies: Sequence[np.ndarray], budget_bytes: int, *,
                    context: int, batch: int = 1, predictor_bytes: int | Sequence[int] = 0,
                    workspace_bytes: int = 0, granule: int = 64,
                    cpu_bytes_per_neuron: int | None = None) -> Placement:
    """Choose each layer's hot prefix for a GPU budget.

    frequencies: per layer, (ffn_dim,) activation frequencies sorted descending (as stored); a mixture of
    experts: (E * ffn_dim,) expert-major, each expert's sorted, and each expert is ranked on its own (the
    globally most frequent expert neurons go to the GPU; frequency = routed and firing, per token);
    predictor_bytes: per layer (a sequence) or the same for every layer (an int);
    cpu_bytes_per_neuron: CPU bytes of one cold neuron's three rows (default: as on the GPU;
    int8 cold rows: 3 * (dim + 4)). Raises UserError naming the minimum budget if even the
    non-FFN part does not fit.
    """
    L, f, E = shape.n_layers, shape.ffn_dim, max(shape.n_experts, 1)
    if granule < 1:
        raise UserError(f"placement granule must be >= 1, got {granule}")
    if context < 1 or batch < 1:
        raise UserError(f"context and batch must be >= 1, got context={context}, batch={batch}")
    if len(frequencies) != L:
        raise UserError(f"neuron frequencies: {len(frequencies)} layers, the model has {L}")
    freq = np.empty((L, E, f), np.float64)
    for i, fr in enumerate(frequencies):
        fr = np.asarray(fr, np.float64)
        if fr.shape != (E * f,):
            raise UserError(f"neuron frequencies of layer {i}: shape {fr.shape}, expected ({E * f},)")
        if not np.isfinite(fr).all() or (fr < 0).any():
            raise UserError(f"neuron frequencies of layer {i}: must be finite and >= 0")
        if (np.diff(fr.reshape(E, f), axis=1) > 0).any():
            raise UserError(f"neuron frequencies of layer {i}: not sorted most-frequent-first "
                            "(the hybrid directory stores neurons in that order)")
        freq[i] = fr.reshape(E, f)
    U = L * E                                   # units of consecutive rows: a layer's FFN, or one expert
    freq = freq.reshape(U, f)
    pred = [int(predictor_bytes)] * L if np.isscalar(predictor_bytes) else [int(b) for b in predictor_bytes]
    if len(pred) != L:
        raise UserError(f"predictor bytes: {len(pred)} layers, the model has {L}")

    wb = shape.weight_bytes
    fixed = {
        "embeddings": shape.vocab_size * shape.dim * wb,
        "lm_head": 0 if shape.tie_embeddings else shape.vocab_size * shape.dim * wb,
        "attention": shape.attention_bytes(),
        "norms": (2 * L + 1) * shape.dim * wb,
        "routers": L * shape.n_experts * shape.dim * wb,
        "kv_cache": shape.kv_cache_bytes(context, batch),
        "predictors": sum(pred),
        "workspace": int(workspace_bytes),
    }
    need = sum(fixed.values())
    if need > budget_bytes:
        minimum = math.ceil(need / GiB * 100) / 100   # rounded up: the stated minimum does fit
        parts = _parts(fixed)
        raise UserError(f"GPU budget {format_gib(budget_bytes)} is too small: the model needs at least "
                        f"{minimum:.2f} GiB before any FFN neuron ({parts}; KV cache for context {context}, "
                        f"batch {batch}); raise --gpu-memory or lower --context")

    # rank granule-sized blocks of consecutive neurons by mean frequency; ties: unit, then position
    n_blocks = -(-f // granule)
    pad = np.zeros((U, n_blocks * granule))
    pad[:, :f] = freq
    sizes = np.full(n_blocks, granule)
    sizes[-1] = f - (n_blocks - 1) * granule
    mean = pad.reshape(U, n_blocks, granule).sum(axis=2) / sizes       # (U, n_blocks)
    unit_of = np.repeat(np.arange(U), n_blocks)
    block_of = np.tile(np.arange(n_blocks), U)
    order = np.lexsort((block_of, unit_of, -mean.ravel()))
    # take the best blocks while they fit: a prefix of the ranking, so more budget never takes less
    cost = np.cumsum(sizes[block_of[order]]) * shape.neuron_bytes
    n_taken = int(np.searchsorted(cost, budget_bytes - need, side="right"))
    hot = np.zeros(U, np.int64)
    np.add.at(hot, unit_of[order[:n_taken]], sizes[block_of[order[:n_taken]]])

    unit_hot_mass = np.array([freq[u, :k].sum() for u, k in enumerate(hot)])
    mass, hot_mass = freq.reshape(L, E * f).sum(axis=1), unit_hot_mass.reshape(L, E).sum(axis=1)
    layer_hot = hot.reshape(L, E).sum(axis=1)
    total = mass.sum()
    share = float(hot_mass.sum() / total) if total > 0 else float(hot.sum() == U * f)
    layer_shares = [float(h / m) if m > 0 else float(k == E * f) for h, m, k in zip(hot_mass, mass, layer_hot)]
    per_cold = shape.neuron_bytes if cpu_bytes_per_neuron is None else int(cpu_bytes_per_neuron)
    hot_counts = ([[int(k) for k in ks] for ks in hot.reshape(L, E)] if shape.n_experts else
                  [int(k) for k in hot])
    return Placement(hot_counts=hot_counts, ffn_dim=f, granule=granule, budget_bytes=int(budget_bytes),
                     fixed_bytes=fixed, hot_bytes=int(hot.sum()) * shape.neuron_bytes,
                     cpu_bytes=int(U * f - hot.sum()) * per_cold, gpu_share=share, layer_shares=layer_shares)


def format_placement(p: Placement) -> str:
    """The split as a table for the log: totals, then one line per layer."""
    fixed = _parts(p.fixed_bytes)
    lines = [
        f"placement: GPU budget {format_gib(p.budget_bytes)}, used {format_gib(p.gpu_bytes)} "
        f"(fixed {format_gib(sum(p.fixed_bytes.values()))}: {fixed}; hot FFN {format_gib(p.hot_bytes)})",
        f"  FFN neurons on the GPU: {sum(p.layer_hot)} of {p.layer_neurons * len(p.hot_counts)} "
        f"({100 * p.hot_fraction:.1f}%), serving an expected {100 * p.gpu_share:.1f}% of activations; "
        f"CPU holds {format_gib(p.cpu_bytes)} of cold rows",
        f"  {'layer':>5} {'hot':>7} {'cold':>7} {'hot %':>6} {'act. on GPU':>11}",
    ]
    for i, (k, s) in enumerate(zip(p.layer_hot, p.layer_shares)):
        lines.append(f"  {i:>5} {k:>7} {p.layer_neurons - k:>7} {100 * k / p.layer_neurons:>5.1f}% {100 * s:>10.1f}%")
    return "\n".join(lines)
