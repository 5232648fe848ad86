"""Neuron-activation predictors: per layer a low-rank MLP `x -> Linear(d, r) -> ReLU -> Linear(r, f)`.

The output is one logit per FFN neuron; neuron j is predicted active when `logit_j > threshold`
(one threshold per layer, chosen by the trainer to meet a recall target). This is the predictor
shape PowerInfer and Deja Vu use. The runtime runs it (hybrid.py); `predictors/` trains it.

File format (`predictors.safetensors`), all layers in one file:
  tensors   `layers.{i}.w1` (r, d), `layers.{i}.b1` (r,), `layers.{i}.w2` (f, r), `layers.{i}.b2` (f,)
            (b1/b2 are always stored; they are zeros for predictors trained without bias)
  metadata  `format` = "hybrid-predictors", `version` = "1", `n_layers`, `dim`, `ffn_dim`,
            `input` = "ffn_norm" (predictor reads x = ffn_norm(h)) or "residual" (reads h itself),
            per layer `layers.{i}.rank`, `layers.{i}.threshold` (float repr), `layers.{i}.bias` ("0"/"1").
All safetensors metadata values are strings.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from hybrid_runtime.errors import UserError

FORMAT_NAME = "hybrid-predictors"
FORMAT_VERSION = "1"
INPUT_KINDS = ("ffn_norm", "residual")


class LayerPredictor(nn.Module):
    """One layer's predictor. `forward(x)` -> logits (..., f); `predict_active(x)` -> bool (..., f)."""

    def __init__(self, dim: int, ffn_dim: int, rank: int, bias: bool = False, threshold: float = 0.0):
        super().__init__()
        if min(dim, ffn_dim, rank) <= 0:
            raise ValueError(f"predictor sizes must be positive: dim={dim} ffn_dim={ffn_dim} rank={rank}")
        self.dim, self.ffn_dim, self.rank, self.bias = dim, ffn_dim, rank, bias
        self.threshold = float(threshold)
        self.w1 = nn.Parameter(torch.empty(rank, dim))      # (r, d)
        self.w2 = nn.Parameter(torch.empty(ffn_dim, rank))  # (f, r)
        # Biases exist as buffers when disabled so the forward has no branch and files are uniform.
        if bias:
            self.b1 = nn.Parameter(torch.zeros(rank))
            self.b2 = nn.Parameter(torch.zeros(ffn_dim))
        else:
            self.register_buffer("b1", torch.zeros(rank))
            self.register_buffer("b2", torch.zeros(ffn_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init (kaiming-uniform with a=sqrt(5) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))).
        nn.init.uniform_(self.w1, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w2, -1 / math.sqrt(self.rank), 1 / math.sqrt(self.rank))

    def n_params(self) -> int:
        return self.rank * (self.dim + self.ffn_dim) + (self.rank + self.ffn_dim) * int(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(F.linear(x, self.w1, self.b1))  # (..., r)
        return F.linear(z, self.w2, self.b2)       # (..., f)

    @torch.no_grad()
    def predict_active(self, x: torch.Tensor) -> torch.Tensor:
        """Bool mask (..., f) of neurons predicted active; no host sync (threshold is a Python float)."""
        return self.forward(x.to(self.w1.dtype)) > self.threshold

    @torch.no_grad()
    def permute_neurons(self, perm: torch.Tensor) -> None:
        """Reorder output neurons: new neuron j is old neuron perm[j] (same convention as `W[perm]`)."""
        perm = torch.as_tensor(perm, dtype=torch.long, device=self.w2.device)
        check_permutation(perm, self.ffn_dim)
        self.w2.data = self.w2.data[perm].contiguous()
        self.b2.data = self.b2.data[perm].contiguous()


def check_permutation(perm: torch.Tensor, n: int) -> None:
    if perm.shape != (n,):
        raise ValueError(f"permutation has shape {tuple(perm.shape)}, expected ({n},)")
    seen = torch.zeros(n, dtype=torch.bool, device=perm.device)
    if int(perm.min()) < 0 or int(perm.max()) >= n:
        raise ValueError(f"permutation values must lie in [0, {n})")
    seen[perm] = True
    if not bool(seen.all()):
        raise ValueError("permutation has repeated entries")


class PredictorSet(nn.Module):
    """All layers' predictors of one model plus the input convention they were trained on."""

    def __init__(self, layers: list[LayerPredictor], input_kind: str = "ffn_norm"):
        super().__init__()
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
        if not layers:
            raise ValueError("a PredictorSet needs at least one layer")
        dims = {(p.dim, p.ffn_dim) for p in layers}
        if len(dims) != 1:
            raise ValueError(f"all layers must share (dim, ffn_dim), got {sorted(dims)}")
        self.layers = nn.ModuleList(layers)
        self.input_kind = input_kind
        self.dim, self.ffn_dim = layers[0].dim, layers[0].ffn_dim

    def __len__(self) -> int:
        return len(self.layers)

    def predict_active(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.layers[layer].predict_active(x)

    def permute_neurons(self, layer: int, perm: torch.Tensor) -> None:
        self.layers[layer].permute_neurons(perm)

    def n_params(self) -> int:
        return sum(p.n_params() for p in self.layers)

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write `predictors.safetensors` (format in the module docstring); `dtype` casts the weights."""
        tensors, meta = {}, {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "n_layers": str(len(self.layers)),
            "dim": str(self.dim), "ffn_dim": str(self.ffn_dim), "input": self.input_kind,
        }
        for i, p in enumerate(self.layers):
            for name in ("w1", "b1", "w2", "b2"):
                t = getattr(p, name).detach()
                tensors[f"layers.{i}.{name}"] = (t.to(dtype) if dtype else t).cpu().contiguous()
            meta[f"layers.{i}.rank"] = str(p.rank)
            meta[f"layers.{i}.threshold"] = repr(float(p.threshold))
            meta[f"layers.{i}.bias"] = "1" if p.bias else "0"
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> "PredictorSet":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: predictor file not found")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                keys = set(fh.keys())
                tensors = {k: fh.get_tensor(k) for k in keys}
        except Exception as e:  # not a safetensors file, truncated, ...
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
        if meta.get("format") != FORMAT_NAME:
            raise UserError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise UserError(f"{path}: unsupported predictor format version {meta.get('version')!r}")
        try:
            n_layers, dim, ffn_dim = int(meta["n_layers"]), int(meta["dim"]), int(meta["ffn_dim"])
            input_kind = meta["input"]
        except (KeyError, ValueError) as e:
            raise UserError(f"{path}: bad or missing metadata field {e}") from None
        layers = []
        for i in range(n_layers):
            try:
                rank, thr = int(meta[f"layers.{i}.rank"]), float(meta[f"layers.{i}.threshold"])
                bias = meta[f"layers.{i}.bias"] == "1"
            except (KeyError, ValueError) as e:
                raise UserError(f"{path}: bad or missing metadata for layer {i}: {e}") from None
            want = {"w1": (rank, dim), "b1": (rank,), "w2": (ffn_dim, rank), "b2": (ffn_dim,)}
            p = LayerPredictor(dim, ffn_dim, rank, bias=bias, threshold=thr)
            for name, shape in want.items():
                key = f"layers.{i}.{name}"
                if key not in tensors:
                    raise UserError(f"{path}: missing tensor {key}")
                if tuple(tensors[key].shape) != shape:
                    raise UserError(f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
                getattr(p, name).data = tensors[key].float()
            layers.append(p)
        if input_kind not in INPUT_KINDS:
            raise UserError(f"{path}: metadata 'input' is {input_kind!r}, expected one of {INPUT_KINDS}")
        ps = cls(layers, input_kind=input_kind)
        return ps.to(device=device, dtype=dtype) if dtype else ps.to(device=device)
