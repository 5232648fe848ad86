"""The activation table: what each FFN activation computes, when a neuron counts as active, what
`--exact` computes, and the codes the kernels take. Profiling, predictor labels, the CPU and CUDA
kernels' drivers, placement and evaluation all ask this module; nothing else decides.

A gated FFN neuron i computes a_i = gate_fn(g_i) * up_fn(u_i), g = gate_i . x, u = up_i . x:

    name      gate_fn(g)            up_fn(u)   active (exact zeros)      paper
    silu      g * sigmoid(g)        u          - (no exact zeros)         LLaMA (SwiGLU)
    relu      max(g, 0)             u          g > 0                      ReluLLaMA, ProSparse stage 1
    fatrelu   g if g >= t else 0    u          g >= t and g != 0          ProSparse (threshold t)
    relu2     max(g, 0)^2           u          g > 0                      ReLU^2 ("sparsity beyond zero")
    drelu     max(g, 0)             max(u, 0)  g > 0 and u > 0            TurboSparse

Activations with exact zeros are *exactly* sparse: `--exact` computes every gate and reads the up
and down rows of active neurons only, which equals the dense FFN (the skipped terms are zeros).
SiLU (and any activation without exact zeros) is sparse only by magnitude: neuron i is active when
|a_i| * ||down_i|| > eps_l, with eps_l per layer calibrated so that the cumulative error of tail
truncation (CETT, the ReLU^2 paper) is a chosen fraction (`cett_threshold`, `magnitude_active`).
A hybrid directory of such a model stores up_i * ||down_i|| and down_i / ||down_i|| (the same
function: a is linear in u), so |a_i| is the neuron's output magnitude and the cut is one scalar per
layer: `Activation(name, eps=eps_l)` computes a_i where |a_i| > eps_l and 0 elsewhere. That is what
`--exact` computes for it (the true magnitude-thresholded FFN, not the dense SiLU FFN; `--dense` is
the original model), and `--predictor` computes it over the predicted neurons only.

The Numba kernels take `Activation.kernel_code` (ACT_*); the CUDA binding takes the name and
threshold (cuda/sparse_ffn.cpp maps them to the same codes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hybrid_runtime.errors import UserError

NAMES = ("silu", "relu", "fatrelu", "relu2", "drelu")
EXACT_ZERO = ("relu", "fatrelu", "relu2", "drelu")     # activations whose inactive neurons are exact zeros
# config.json `hidden_act` spellings -> names above
HF_NAMES = {"silu": "silu", "swish": "silu", "relu": "relu", "fatrelu": "fatrelu",
            "relu2": "relu2", "relu_squared": "relu2", "drelu": "drelu"}

# kernel codes (the `act` argument of the Numba kernels, and cuda/sparse_ffn.cpp's enum order)
ACT_RELU, ACT_FATRELU, ACT_RELU2, ACT_DRELU, ACT_SILU_MAGNITUDE = 0, 1, 2, 3, 4
ACT_SILU = 5  # plain SiLU: the dense CPU decode only (cpu_decode.py); no exact zeros, so no sparse kernel
_KERNEL_CODES = {"relu": ACT_RELU, "fatrelu": ACT_FATRELU, "relu2": ACT_RELU2, "drelu": ACT_DRELU}


def _fatrelu(g: torch.Tensor, t: float) -> torch.Tensor:
    return torch.where(g >= t, g, torch.zeros((), dtype=g.dtype, device=g.device))


def _identity(u: torch.Tensor) -> torch.Tensor:
    return u


@dataclass(frozen=True)
class Activation:
    """One FFN activation: `name` (see NAMES), FATReLU's threshold t (0 for the others), and for SiLU
    an optional magnitude cut `eps` (|a| <= eps counts as zero; see the module docstring)."""
    name: str
    threshold: float = 0.0
    eps: float | None = None

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise UserError(f"unknown activation {self.name!r} (supported: {', '.join(NAMES)})")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)
                and self.threshold >= 0):
            raise UserError(f"activation threshold must be a finite number >= 0, got {self.threshold!r}")
        if self.threshold and self.name != "fatrelu":
            raise UserError(f"a threshold applies to fatrelu only (got {self.name} with threshold {self.threshold})")
        if self.eps is not None:
            if self.name != "silu":
                raise UserError(f"a magnitude cut applies to silu models only (got {self.name})")
            if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
                raise UserError(f"magnitude threshold must be a finite number >= 0, got {self.eps!r}")

    @classmethod
    def from_hf(cls, hidden_act, hidden_act_param=None) -> "Activation":
        """From config.json's `hidden_act` (+ `hidden_act_param`, FATReLU's threshold)."""
        if hidden_act not in HF_NAMES:
            raise UserError(f"config.json: hidden_act {hidden_act!r} is not supported "
                            f"(supported: {', '.join(sorted(HF_NAMES))})")
        name = HF_NAMES[hidden_act]
        if name != "fatrelu":
            return cls(name)
        if hidden_act_param is not None and not isinstance(hidden_act_param, (int, float)):
            raise UserError(f"config.json: hidden_act_param must be a number, got {hidden_act_param!r}")
        return cls(name, float(hidden_act_param or 0.0))

    # ------------------------------------------------------------------ what it computes

    @property
    def has_exact_zeros(self) -> bool:
        """Inactive neurons compute exact zeros: by the function itself, or by a magnitude cut."""
        return self.name in EXACT_ZERO or self.eps is not None

    @property
    def magnitude(self) -> bool:
        return self.eps is not None

    def without_cut(self) -> "Activation":
        """The activation of the original model (the dense baseline)."""
        return Activation(self.name, self.threshold)

    def gate_fn(self, g: torch.Tensor) -> torch.Tensor:
        if self.name == "silu":
            return F.silu(g)
        if self.name == "fatrelu":
            return _fatrelu(g, self.threshold)
        if self.name == "relu2":
            return F.relu(g).square()
        return F.relu(g)                                        # relu, drelu

    def up_fn(self, u: torch.Tensor) -> torch.Tensor:
        return F.relu(u) if self.name == "drelu" else u

    def __call__(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """a = gate_fn(g) * up_fn(u), elementwise, in g's dtype (cut to 0 where |a| <= eps)."""
        a = self.gate_fn(g) * self.up_fn(u)
        if self.eps is not None:
            a = torch.where(a.abs() > self.eps, a, torch.zeros((), dtype=a.dtype, device=a.device))
        return a

    def numpy(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        """The same in numpy (the CPU kernels' reference)."""
        if self.name == "silu":
            a = g / (1.0 + np.exp(-g)) * u
            return a if self.eps is None else np.where(np.abs(a) > self.eps, a, 0)
        if self.name == "fatrelu":
            return np.where(g >= self.threshold, g, 0) * u
        if self.name == "relu2":
            return np.maximum(g, 0) ** 2 * u
        if self.name == "drelu":
            return np.maximum(g, 0) * np.maximum(u, 0)
        return np.maximum(g, 0) * u

    # ------------------------------------------------------------------ when a neuron is active

    def active(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """bool: the neuron's activation is exactly non-zero (exact-zero activations only)."""
        if self.eps is not None:
            return self(g, u) != 0
        if self.name == "fatrelu":
            return (g >= self.threshold) & (g != 0)
        if self.name in ("relu", "relu2"):
            return g > 0
        if self.name == "drelu":
            return (g > 0) & (u > 0)
        raise UserError(f"activation {self.name!r} has no exact zeros; define active neurons by output "
                        "magnitude (--cett), or convert the model with `hybrid-convert prosparse`")

    def gate_fires(self, g: torch.Tensor) -> torch.Tensor:
        """bool: the activated gate is non-zero, so the kernels read this neuron's up row (for dReLU
        a superset of `active`: the up sign is only known after the up row is read; for a magnitude
        cut every gate "fires": the cut needs u)."""
        if self.eps is not None:
            return torch.ones_like(g, dtype=torch.bool)
        return self.active(g, torch.ones_like(g))

    @property
    def kernel_code(self) -> int:
        """The Numba kernels' `act` argument; UserError where the sparse kernels cannot run it."""
        if self.eps is not None:
            return ACT_SILU_MAGNITUDE
        if self.name not in _KERNEL_CODES:
            raise UserError(f"activation {self.name!r} cannot run on the sparse kernels "
                            f"(supported: {', '.join(_KERNEL_CODES)}; silu has no exact zeros)")
        return _KERNEL_CODES[self.name]

    @property
    def dense_kernel_code(self) -> int:
        """The Numba `act` code of the original activation (no magnitude cut): what a dense FFN computes."""
        return ACT_SILU if self.name == "silu" else _KERNEL_CODES[self.name]

    @property
    def kernel_threshold(self) -> float:
        """The Numba kernels' `threshold` argument: FATReLU's t, or the magnitude cut."""
        return self.eps if self.eps is not None else self.threshold

    def describe(self) -> str:
        if self.eps is not None:
            return f"{self.name} (magnitude cut {self.eps:.6g})"
        return self.name + (f" (threshold {self.threshold:.6g})" if self.name == "fatrelu" else "")


# ---------------------------------------------------------------------- magnitude (CETT) activity

def magnitude_active(a: torch.Tensor, down_norm: torch.Tensor, eps: float) -> torch.Tensor:
    """bool (..., f): |a_i| * ||down_i|| > eps. a (..., f) activations, down_norm (f,)."""
    return a.abs() * down_norm > eps


def cett(a: torch.Tensor, down: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over tokens of ||sum_{i: |a_i| ||down_i|| <= eps} a_i down_i|| / ||sum_i a_i down_i||.

    a: (N, f) activations; down: (f, d) neuron-major rows. Returns a 0-dim fp32 tensor."""
    a, w = a.float(), down.float()
    mag = a.abs() * w.norm(dim=1)                         # (N, f) output magnitude of each neuron
    y = a @ w                                             # (N, d)
    tail = torch.where(mag <= eps, a, 0.0) @ w            # (N, d) what the inactive neurons would add
    return (tail.norm(dim=1) / y.norm(dim=1).clamp_min(1e-30)).mean()


@torch.no_grad()
def cett_threshold(a: torch.Tensor, down: torch.Tensor, target: float,
                   iters: int = 40) -> tuple[float, float, float]:
    """Largest eps with cett(a, down, eps) <= target, by bisection; a (N, f), down (f, d).
    Returns (eps, share of (token, neuron) pairs at or below eps, cett(eps))."""
    w = down.float()
    mag = a.float().abs() * w.norm(dim=1)                 # (N, f)
    lo, hi = 0.0, float(mag.max())
    if float(cett(a, w, hi)) <= target:
        lo = hi
    else:
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if float(cett(a, w, mid)) <= target:
                lo = mid
            else:
                hi = mid
    return lo, float((mag <= lo).float().mean()), float(cett(a, w, lo))
