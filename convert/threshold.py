"""Activation threshold shifting (ProSparse step 3): FATReLU(t) in place of ReLU.

The threshold is given (`apply_threshold`) or searched (`search_threshold`): the largest t
whose held-out loss increase over plain ReLU stays <= `max_loss_increase` (nats per token;
0.01 nats is about +1% perplexity). Candidates are quantiles of the positive gate values
(so the search adapts to the model's activation scale), scanned upwards until the first
failure (past the last quantile: x1.5 steps, at most 8), then refined by bisection between
the last passing and the first failing value.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from convert.evaluate import heldout_loss
from convert.prosparse import decoder_layers, gate_output_module, model_activation, swap_activation
from hybrid_runtime.errors import UserError

DEFAULT_QUANTILES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass
class ThresholdSearch:
    threshold: float            # 0.0: no threshold passed (keep plain ReLU)
    base_loss: float            # held-out loss with plain ReLU
    loss: float                 # held-out loss at `threshold`
    max_loss_increase: float
    tried: list[dict] = field(default_factory=list)  # {"threshold", "loss", "increase", "ok"} in order


def apply_threshold(model: nn.Module, threshold: float) -> nn.Module:
    """FATReLU(threshold) in every layer (threshold 0: plain ReLU)."""
    if threshold < 0:
        raise UserError(f"threshold must be >= 0 (got {threshold})")
    return swap_activation(model, "fatrelu", threshold) if threshold > 0 else swap_activation(model, "relu")


@torch.no_grad()
def _positive_gate_quantiles(model: nn.Module, blocks: torch.Tensor, batch_size: int,
                             quantiles: tuple[float, ...], max_values: int = 1 << 22) -> list[float]:
    """Quantiles of the positive gate pre-activations gate(x) over the first batch(es) of `blocks`."""
    device = next(model.parameters()).device
    values: list[torch.Tensor] = []
    seen = [0]

    def hook(module, args, out):  # out: (B, T, f)
        if seen[0] < max_values:
            v = out.detach().float().flatten()
            v = v[v > 0][: max_values - seen[0]]
            values.append(v.cpu())
            seen[0] += v.numel()

    handles = [gate_output_module(l).register_forward_hook(hook) for l in decoder_layers(model)]
    try:
        for i in range(0, blocks.shape[0], batch_size):
            if seen[0] >= max_values:
                break
            model(input_ids=blocks[i:i + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    v = torch.cat(values)
    if v.numel() == 0:
        raise UserError("threshold search: no positive gate values on the held-out data (dead ReLUs?)")
    if v.numel() > (1 << 24) - 1:  # torch.quantile's input limit
        v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[: (1 << 24) - 1]]
    return torch.quantile(v, torch.tensor(quantiles)).tolist()


def search_threshold(model: nn.Module, blocks: torch.Tensor, max_loss_increase: float, batch_size: int = 8,
                     quantiles: tuple[float, ...] = DEFAULT_QUANTILES, refine_steps: int = 4,
                     log=print) -> ThresholdSearch:
    """Find and apply the largest FATReLU threshold whose held-out loss increase is <= the bound.

    The model must compute ReLU or FATReLU; it is left with the chosen threshold applied.
    """
    if not max_loss_increase > 0:
        raise UserError(f"--max-loss-increase must be > 0 (got {max_loss_increase})")
    act, _ = model_activation(model)
    if act not in ("relu", "fatrelu"):
        raise UserError(f"threshold shifting applies to ReLU models (this one computes {act})")
    apply_threshold(model, 0.0)
    base = heldout_loss(model, blocks, batch_size)
    candidates = _positive_gate_quantiles(model, blocks, batch_size, quantiles)
    tried: list[dict] = []

    def attempt(t: float) -> bool:
        apply_threshold(model, t)
        loss = heldout_loss(model, blocks, batch_size)
        ok = loss - base <= max_loss_increase
        tried.append({"threshold": t, "loss": loss, "increase": loss - base, "ok": ok})
        log(f"  threshold {t:.4g}: held-out loss {loss:.4f} ({loss - base:+.4f}) {'ok' if ok else 'over the bound'}")
        return ok

    good, bad = 0.0, None
    for t in candidates:
        if t <= good:
            continue
        if attempt(t):
            good = t
        else:
            bad = t
            break
    for _ in range(8 if bad is None else 0):  # every quantile passed: look further up
        t = 1.5 * good
        if attempt(t):
            good = t
        else:
            bad = t
            break
    if bad is not None:
        for _ in range(refine_steps):
            mid = 0.5 * (good + bad)
            if attempt(mid):
                good = mid
            else:
                bad = mid
    apply_threshold(model, good)
    final = next((r["loss"] for r in reversed(tried) if r["threshold"] == good), base)
    return ThresholdSearch(threshold=good, base_loss=base, loss=final, max_loss_increase=max_loss_increase,
                           tried=tried)
