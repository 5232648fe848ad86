"""Held-out perplexity and activation sparsity: the numbers every conversion stage is judged by.

Sparsity is measured on x1 = act(gate(x)) * up(x), the input of each layer's down_proj:
- exact-zero (ReLU family: relu, fatrelu, relu2, drelu): the share of entries of x1 that are
  exactly zero, i.e. of FFN neurons inactive for a token, averaged over tokens; the overall
  figure is the mean over layers (the ProSparse paper's definition).
- CETT (any activation; the default for silu models, which have no exact zeros): as in the
  ReLU^2 paper (Zhang et al. 2024), neuron i's output for a token is n_i = x1_i * down[:, i],
  of magnitude |x1_i| * ||down[:, i]||_2. Neurons whose magnitude is <= eps are counted as
  inactive. Per layer, eps is the largest value for which the cumulative error of tail
  truncation, CETT(eps) = || sum of the inactive n_i ||_2 / || sum of all n_i ||_2, averaged over
  tokens, stays <= the bound (default 0.2, the paper's); the layer's sparsity is then the share
  of neurons with magnitude <= eps. eps is found by bisection on a sample of tokens spread over
  the evaluation data (`cett_tokens` per layer) and the sparsity is measured on that sample.
"""
from __future__ import annotations

import contextlib
import math
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from convert.prosparse import ActivationRecorder, decoder_layers, model_activation
from hybrid_runtime.activations import Activation, cett_threshold

SPARSITY_METHODS = ("auto", "exact", "cett", "both")


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def heldout_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """Mean next-token cross-entropy (nats) over all predicted tokens of `blocks` (N, T)."""
    device = _model_device(model)
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in tqdm(range(0, blocks.shape[0], batch_size), desc="eval", disable=not progress, dynamic_ncols=True):
        x = blocks[i:i + batch_size].to(device)  # (b, T)
        with _autocast(device):
            out = model(input_ids=x, labels=x, use_cache=False)
        n = x.shape[0] * (x.shape[1] - 1)
        total += out.loss.double() * n
        count += n
    return (total / count).item()


# ----------------------------------------------------------------------------- CETT (activations.cett_threshold)

class _SampleRecorder:
    """Keeps every `stride`-th token's x1 row of each layer, up to `limit` rows, as fp32."""

    def __init__(self, model: nn.Module, stride: int, limit: int):
        self.layers = decoder_layers(model)
        self.stride, self.limit = stride, limit
        self.rows: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.n = [0] * len(self.layers)
        self._handles = []

    def _hook(self, i: int, module: nn.Module, args: tuple) -> None:
        if self.n[i] >= self.limit:
            return
        x1 = args[0].reshape(-1, args[0].shape[-1])[:: self.stride]  # (n, f)
        x1 = x1[: self.limit - self.n[i]].float()
        self.rows[i].append(x1)
        self.n[i] += x1.shape[0]

    def __enter__(self):
        self._handles = [l.mlp.down_proj.register_forward_pre_hook(partial(self._hook, i))
                         for i, l in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def samples(self, i: int) -> torch.Tensor:
        return torch.cat(self.rows[i])


# ----------------------------------------------------------------------------- evaluate

@torch.no_grad()
def evaluate(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, sparsity: str = "auto",
             cett_bound: float = 0.2, cett_tokens: int = 1024, progress: bool = False) -> dict:
    """Held-out loss / perplexity and activation sparsity of `model` on `blocks` (N, T).

    sparsity: 'exact' (share of zeros of x1), 'cett' (see module doc), 'both', or 'auto':
    exact for the ReLU family, CETT otherwise. The headline `sparsity` is exact-zero for the
    ReLU family and CETT otherwise; both blocks are in the result when computed.
    """
    if sparsity not in SPARSITY_METHODS:
        raise ValueError(f"sparsity must be one of {SPARSITY_METHODS}")
    act, threshold = model_activation(model)
    relu_family = Activation(act, threshold).has_exact_zeros
    want_cett = sparsity in ("cett", "both") or (sparsity == "auto" and not relu_family)
    model.eval()
    n_tokens = blocks.numel()
    stride = max(1, n_tokens // max(cett_tokens, 1))
    rec = ActivationRecorder(model)
    sampler = _SampleRecorder(model, stride, cett_tokens)
    with rec, (sampler if want_cett else contextlib.nullcontext()):
        loss = heldout_loss(model, blocks, batch_size, progress)
    exact = rec.sparsity_per_layer().tolist()
    result = {
        "loss": loss, "perplexity": math.exp(loss), "tokens": n_tokens,
        "predicted_tokens": blocks.shape[0] * (blocks.shape[1] - 1),
        "activation": act, "threshold": threshold,
        "exact_zero": {"mean": sum(exact) / len(exact), "per_layer": exact},
    }
    if want_cett:
        per_layer, eps, errs = [], [], []
        for i, layer in enumerate(decoder_layers(model)):
            # down_proj.weight is (d, f); the table's CETT takes neuron-major rows (f, d)
            e, s, c = cett_threshold(sampler.samples(i), layer.mlp.down_proj.weight.T, cett_bound)
            per_layer.append(s), eps.append(e), errs.append(c)
        result["cett"] = {"bound": cett_bound, "tokens_per_layer": sampler.n[0],
                          "mean": sum(per_layer) / len(per_layer), "per_layer": per_layer,
                          "eps_per_layer": eps, "cett_per_layer": errs}
    cett_headline = want_cett and not relu_family
    head = result["cett"] if cett_headline else result["exact_zero"]
    result["sparsity_method"] = "cett" if cett_headline else "exact-zero"
    result["sparsity"] = head["mean"]
    result["sparsity_per_layer"] = head["per_layer"]
    return result
