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

from convert.prosparse import ActivationRecorder, decoder_layers, down_input_module, is_moe, model_activation
from hybrid_runtime.activations import Activation, cett_threshold
from hybrid_runtime.errors import UserError

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
        self._handles = [down_input_module(l).register_forward_pre_hook(partial(self._hook, i))
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
    moe = any(is_moe(layer) for layer in decoder_layers(model))
    if moe and sparsity in ("cett", "both"):
        raise UserError("CETT sparsity is defined for one dense FFN per layer; this model has experts "
                        "(use --sparsity exact)")
    want_cett = sparsity in ("cett", "both") or (sparsity == "auto" and not relu_family and not moe)
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


# ----------------------------------------------------------------------------- the runtime's modes

EVAL_MODES = ("dense", "exact", "predictor")


def _greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens after prompt (T,), with the model's KV cache (decode semantics)."""
    T = prompt.shape[0]
    model.setup_cache(1, T + n)
    logits = model(prompt[None], torch.arange(T))[0, -1]
    out = []
    for i in range(n):
        nxt = int(logits.argmax())
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), torch.tensor([T + i]))[0, -1]
    return out


@torch.no_grad()
def evaluate_modes(model_dir, blocks: torch.Tensor, modes=EVAL_MODES, batch_size: int = 4,
                   free_prompts: int = 4, free_prompt_len: int = 16, free_tokens: int = 32,
                   progress: bool = False) -> dict:
    """Held-out perplexity of the runtime's modes on the same blocks (N, T), through this engine in fp32
    with `hybrid.ReferenceFFN` (each token's own predictor mask and magnitude cut, what decoding computes):
    per mode the loss, perplexity and its change against dense, FFN sparsity (neurons whose down row is
    used: a != 0), per-layer true / predicted density and predictor recall, and greedy agreement with
    dense, teacher-forced (every position of the text) and free-running (greedy continuations of the
    first `free_prompt_len` tokens of `free_prompts` blocks)."""
    from hybrid_runtime.errors import UserError
    from hybrid_runtime.hybrid import ReferenceFFN, ReferenceMoEFFN
    from hybrid_runtime.loading import load_model
    from hybrid_runtime.model_dir import open_model_dir
    md = open_model_dir(model_dir)
    cfg = md.config
    modes = list(dict.fromkeys(["dense", *modes]))
    unknown = [m for m in modes if m not in EVAL_MODES]
    if unknown:
        raise UserError(f"--mode {unknown[0]!r}: use {', '.join(EVAL_MODES)}")
    acts = md.hybrid.layer_activations(cfg.activation) if md.is_hybrid else [cfg.activation] * cfg.n_layers
    if "exact" in modes and not all(a.has_exact_zeros for a in acts):
        raise UserError(f"{md.path}: --mode exact needs exact zeros (a ReLU-family model, or a hybrid directory "
                        "with a magnitude cut: hybrid-convert all --cett)")
    preds = None
    if "predictor" in modes:
        if md.hybrid is None or md.hybrid.predictors_file is None:
            raise UserError(f"{md.path}: --mode predictor needs a hybrid model directory with predictors")
        from hybrid_runtime.predictor import PredictorSet
        preds = PredictorSet.load(md.hybrid.predictors_file)
    model = load_model(md, dtype=torch.float32)
    dense_ffns = [layer.ffn for layer in model.layers]
    n_tok = blocks.shape[0] * (blocks.shape[1] - 1)
    res: dict = {"model": str(md.path), "activation": acts[0].describe() if acts else cfg.act,
                 "tokens": n_tok, "blocks": list(blocks.shape), "modes": {}}
    dense_argmax, dense_free = [], []
    prompts = blocks[:free_prompts, :free_prompt_len]
    for mode in modes:
        for i, layer in enumerate(model.layers):
            layer.ffn = (ReferenceMoEFFN if cfg.n_experts else ReferenceFFN)(dense_ffns[i], acts[i], mode,
                                     preds.layers[i] if mode == "predictor" else None,
                                     preds is not None and preds.input_kind == "residual")
        total, agree = 0.0, 0
        it = range(0, blocks.shape[0], batch_size)
        for k, b in enumerate(tqdm(it, desc=f"eval {mode}", disable=not progress, dynamic_ncols=True)):
            x = blocks[b:b + batch_size]
            model.setup_cache(x.shape[0], x.shape[1])
            logits = model(x, torch.arange(x.shape[1]))[:, :-1]                     # (B, T-1, V)
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             x[:, 1:].reshape(-1), reduction="sum"))
            am = logits.argmax(-1)
            if mode == "dense":
                dense_argmax.append(am)
            else:
                agree += int((am == dense_argmax[k]).sum())
        counts = torch.stack([layer.ffn.counts for layer in model.layers])     # (L, 5)
        free = [_greedy(model, p, free_tokens) for p in prompts]
        if mode == "dense":
            dense_free = free
        tokens, computed, active, predicted, hit = counts.T
        f = cfg.layer_neurons            # a mixture of experts: densities over all its experts' neurons
        loss = total / n_tok
        row = {"loss": loss, "perplexity": math.exp(loss),
               "ffn_sparsity": float(1 - (computed / (tokens * f)).mean()),
               "per_layer": [{"sparsity": float(1 - c / (t * f)), "true_density": float(a / (t * f)),
                              "predicted_density": float(p / (t * f)),
                              "recall": float(h / a) if a else None}
                             for t, c, a, p, h in counts.tolist()]}
        if mode != "dense":
            dense = res["modes"]["dense"]
            row["perplexity_vs_dense"] = row["perplexity"] / dense["perplexity"] - 1
            row["teacher_forced_agreement"] = agree / n_tok
            same = [sum(a == b for a, b in zip(s, d)) / free_tokens for s, d in zip(free, dense_free)]
            first = [next((j for j, (a, b) in enumerate(zip(s, d)) if a != b), free_tokens)
                     for s, d in zip(free, dense_free)]
            row["free_running"] = {"prompts": len(free), "tokens": free_tokens,
                                   "agreement": sum(same) / max(len(same), 1),
                                   "tokens_before_first_difference": sum(first) / max(len(first), 1)}
        if mode == "predictor":
            rec = [r["recall"] for r in row["per_layer"] if r["recall"] is not None]
            row["predictor_recall"] = sum(rec) / max(len(rec), 1)
            row["predicted_density"] = float((predicted / (tokens * f)).mean())
        res["modes"][mode] = row
    return res


def format_modes_table(res: dict) -> str:
    rows = ["mode        perplexity  vs dense  FFN sparsity  recall  teacher-forced  free-running"]
    for mode, r in res["modes"].items():
        rows.append(f"{mode:<10s}  {r['perplexity']:10.3f}  {100 * r.get('perplexity_vs_dense', 0):+7.2f}%  "
                    f"{100 * r['ffn_sparsity']:11.2f}%  "
                    f"{r['predictor_recall'] if 'predictor_recall' in r else float('nan'):6.3f}  "
                    f"{100 * r.get('teacher_forced_agreement', 1):13.1f}%  "
                    f"{100 * r.get('free_running', {}).get('agreement', 1):11.1f}%")
    return "\n".join(rows)
