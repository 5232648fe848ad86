"""Torch trainer for the per-layer activation predictors.

Loss: weighted binary cross-entropy on logits, following the published ProSparse predictor recipe
("weight = positive rate + 0.005"). What exactly is implemented, per layer:
  p_j      = fraction of training tokens on which neuron j is active
  weight   = 1 for a positive label (neuron active), p_j + 0.005 for a negative label
  loss     = mean over (token, neuron) of weight * BCE(logit, label)
Down-weighting negatives by ~p_j balances each neuron's positives against its (1 - p_j)/p_j times
more numerous negatives, and makes a neuron's total weight ~ 2 n p_j, i.e. proportional to its
positives, which is what micro-averaged recall counts; the +0.005 keeps never-active neurons in play.
A mixture of experts (one predictor per layer over its E * f neurons): the runtime asks only about the
routed experts' neurons, so the loss, p_j (the rate among tokens routed to j's expert) and every metric
count those only; the predictor never spends capacity on learning the router.

Recipe defaults (ProSparse): samples split 95/5 train/held-out, no bias, AdamW lr 1e-3, batch 1024.
The held-out 5% is split in two halves: `val` (early stopping, checkpoint choice, rank and threshold
choice) and `test` (the reported metrics), so reported numbers are not tuned on.
Checkpoint kept: the epoch with the highest val recall at the density budget
(`density_factor` x true density) - the same "highest recall" rule as ProSparse, measured at the
density we target instead of at logit 0 (ties, e.g. recall 1.0, go to the lower val density at the
recall target). Training stops after `patience` epochs without improvement.
Rank: binary search over the sorted candidate list for the smallest rank whose val density at the
recall target is <= density_factor x true density (monotone in rank in practice); if none meets it,
the candidate with the lowest such density is kept and the layer is flagged `val_target_met: false`.
Decision threshold: the largest threshold whose val recall >= recall target + `recall_margin_se` standard
errors of the val recall estimate (ratio-estimator SE over tokens, at the plain target's threshold); a
threshold fitted at exactly the target would miss it on new text about half the time. The margin is
small (~0.001-0.005) and recorded per layer as `recall_margin`.
Input: "ffn_norm" (x = ffn_norm(h), what the FFN sees) or "residual" (h, what ProSparse's published
predictors read); `choose_input_kind` trains both on one probe layer (the middle one) and keeps
ffn_norm unless residual's val density at the recall target is more than 2% lower.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hybrid_runtime.errors import UserError
from predictors.metrics import (ffn_output_rel_error, mask_metrics, recall_density_curve, recall_standard_error,
                                threshold_for_density, threshold_for_recall)
from hybrid_runtime.predictor import LayerPredictor, PredictorSet
from predictors.samples import SampleReader, pack_mask, unpack_mask

RESIDUAL_MARGIN = 0.02
RANK_LADDER = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class TrainConfig:
    recall_target: float = 0.95
    density_factor: float = 1.5        # allowed predicted density / true density
    ranks: tuple[int, ...] | None = None  # None: RANK_LADDER up to the parameter budget, plus the budget
    max_param_frac: float = 0.10       # predictor params / FFN params (3 d f), bounds the auto ranks
    bias: bool = False
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 1024
    max_epochs: int = 50
    min_steps: int = 50                # small sample sets: an "epoch" repeats the data to this many steps
    patience: int = 4
    held_out_frac: float = 0.05
    min_held_out: int = 256            # val + test rows at least (if the store has 4x that many)
    neg_weight_eps: float = 0.005
    recall_margin_se: float = 2.0      # decision threshold aims this many standard errors above the target
    max_samples: int | None = None
    input_kind: str = "auto"           # "auto" | "ffn_norm" | "residual"
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


def auto_ranks(dim: int, ffn_dim: int, max_param_frac: float) -> list[int]:
    """Candidate ranks: the ladder up to the parameter budget r_max, plus r_max itself."""
    r_max = max(1, int(max_param_frac * 3 * dim * ffn_dim / (dim + ffn_dim)))
    return sorted({r for r in RANK_LADDER if r < r_max} | {r_max})


# ---------------------------------------------------------------------------- data

@dataclass
class LayerData:
    """One layer's samples on the training device, split train/val/test."""
    x: dict[str, torch.Tensor]       # split -> (n, d) float32 predictor input
    packed: dict[str, torch.Tensor]  # split -> (n, ceil(f/8)) uint8 labels
    h_test: torch.Tensor             # (n_test, d) the stored x of the test split (for the FFN error)
    ffn_dim: int
    # a mixture of experts: split -> (n, ceil(F/8)) uint8, the neurons of each sample's routed experts, the
    # only ones the runtime asks the predictor about (the loss and every metric ignore the others)
    routed: dict[str, torch.Tensor] | None = None

    def labels(self, split: str) -> torch.Tensor:
        return unpack_mask(self.packed[split], self.ffn_dim)

    def logits(self, p: LayerPredictor, split: str) -> torch.Tensor:
        """The predictor's logits on a split; -inf outside the routed experts (never predicted active)."""
        logits = predict_logits(p, self.x[split])
        if self.routed is not None:
            logits = logits.masked_fill(~unpack_mask(self.routed[split], self.ffn_dim), float("-inf"))
        return logits


def split_rows(n: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if n < 8:
        raise UserError(f"only {n} samples for a layer: too few to train and evaluate a predictor")
    n_hold = max(int(round(cfg.held_out_frac * n)), min(cfg.min_held_out, n // 4), 2)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_val = n_hold // 2
    return perm[n_hold:], perm[:n_val], perm[n_val:n_hold]


def make_input_fn(kind: str, stored_kind: str, norm: Callable | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Predictor input from the stored x: identity, or ffn_norm applied to a stored residual."""
    if kind == stored_kind:
        return lambda h: h.float()
    if kind == "ffn_norm" and stored_kind == "residual":
        if norm is None:
            raise UserError("the samples hold the residual stream; the ffn_norm input needs the model's norm")
        return lambda h: norm(h.float()).float()
    raise UserError(f"cannot build predictor input {kind!r} from stored samples of kind {stored_kind!r}")


def norm_fn(ffn: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """A float32 copy of the FFN's RMSNorm on `device` (the model's own module is left untouched)."""
    return copy.deepcopy(ffn.norm).to(device=device, dtype=torch.float32)


@torch.no_grad()
def load_layer(reader: SampleReader, layer: int, input_fn: Callable, cfg: TrainConfig,
               ffn: torch.nn.Module | None = None) -> LayerData:
    """One layer's samples; `ffn`: the model's FFN module, needed for a mixture of experts (its routing)."""
    from hybrid_runtime.model import MoEFeedForward
    h, packed = reader.load(layer, cfg.max_samples)
    train, val, test = split_rows(len(h), cfg)
    dev = torch.device(cfg.device)
    moe = isinstance(ffn, MoEFeedForward)
    norm = norm_fn(ffn, dev) if moe else None
    xs, ps, routed = {}, {}, {}
    for name, idx in (("train", train), ("val", val), ("test", test)):
        hb = h[idx].to(dev)
        xs[name] = torch.cat([input_fn(hb[i:i + 8192]) for i in range(0, len(hb), 8192)])
        ps[name] = packed[idx].to(dev)
        if moe:
            routed[name] = torch.cat([torch.from_numpy(pack_mask(routed_neurons(ffn, norm(hb[i:i + 8192].float()))))
                                      for i in range(0, len(hb), 8192)]).to(dev)
    return LayerData(x=xs, packed=ps, h_test=h[test].to(dev), ffn_dim=reader.ffn_dim, routed=routed or None)


def routed_neurons(ffn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n, E * f) bool: the neurons of each token's routed experts (x = ffn_norm(h), float32)."""
    return ffn.routed(x).repeat_interleave(ffn.experts[0].gate.shape[0], dim=1)


# ---------------------------------------------------------------------------- training

@torch.no_grad()
def predict_logits(p: LayerPredictor, x: torch.Tensor, block: int = 4096) -> torch.Tensor:
    return torch.cat([p(x[i:i + block]) for i in range(0, len(x), block)])  # (n, f)


@torch.no_grad()
def evaluate(p: LayerPredictor, data: LayerData, split: str, cfg: TrainConfig) -> dict:
    """Recall at the density budget and density at the recall target, on one split."""
    logits, true = data.logits(p, split), data.labels(split)
    true_density = float(true.float().mean())
    budget = min(1.0, cfg.density_factor * true_density)
    t_budget = threshold_for_density(logits, budget)
    at_budget = mask_metrics(logits > t_budget, true)
    t_target = threshold_for_recall(logits, true, cfg.recall_target)
    at_target = mask_metrics(logits > t_target, true)
    return {"true_density": true_density, "recall_at_budget": at_budget["recall"],
            "density_at_target": at_target["pred_density"], "threshold_at_target": t_target,
            "ok": at_target["pred_density"] <= budget + 1e-12}


def train_predictor(data: LayerData, rank: int, cfg: TrainConfig, desc: str = "") -> tuple[LayerPredictor, dict]:
    """Train one predictor of a given rank; returns the best checkpoint and its history."""
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    d, f = data.x["train"].shape[1], data.ffn_dim
    p = LayerPredictor(d, f, rank, bias=cfg.bias).to(dev)
    x_tr, m_tr = data.x["train"], data.packed["train"]
    r_tr = data.routed["train"] if data.routed is not None else None
    n = len(x_tr)
    # per-neuron positive rate -> weight of negative labels (see module docstring); a mixture of experts: the
    # rate among the samples routed to the neuron's expert, and no loss outside the routed experts
    pos, seen = torch.zeros(f, device=dev), torch.full((f,), float(n), device=dev)
    for i in range(0, n, 8192):
        pos += unpack_mask(m_tr[i:i + 8192], f).sum(0)
    if r_tr is not None:
        seen.zero_()
        for i in range(0, n, 8192):
            seen += unpack_mask(r_tr[i:i + 8192], f).sum(0)
    neg_weight = pos / seen.clamp(min=1) + cfg.neg_weight_eps  # (f,)
    opt = torch.optim.AdamW(p.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    # tiny sample sets: make one "epoch" at least min_steps steps so early stopping sees progress
    repeats = max(1, math.ceil(cfg.min_steps / steps_per_epoch))
    best, best_state, bad, history = (-1.0, 0.0), None, 0, []
    bar = tqdm(range(cfg.max_epochs), desc=desc or f"rank {rank}", leave=False, disable=not cfg.progress,
               file=sys.stderr)
    for epoch in bar:
        p.train()
        loss_sum, steps = torch.zeros((), device=dev), 0
        for _ in range(repeats):
            perm = torch.randperm(n, generator=gen).to(dev)
            for i in range(0, n, cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                xb, yb = x_tr[idx], unpack_mask(m_tr[idx], f)       # (b, d), (b, f)
                logits = p(xb)                                     # (b, f)
                w = torch.where(yb, torch.ones_like(neg_weight), neg_weight)
                if r_tr is not None:
                    w = w * unpack_mask(r_tr[idx], f)
                loss = F.binary_cross_entropy_with_logits(logits, yb.float(), weight=w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
                steps += 1
        p.eval()
        ev = evaluate(p, data, "val", cfg)
        ev.update(epoch=epoch, loss=float(loss_sum) / steps)
        history.append(ev)
        key = (ev["recall_at_budget"], -ev["density_at_target"])  # ties (e.g. recall 1.0): lower density
        if key > best:
            best, best_state, bad = key, copy.deepcopy(p.state_dict()), 0
        else:
            bad += 1
        bar.set_postfix(loss=f"{ev['loss']:.4f}", recall=f"{ev['recall_at_budget']:.4f}",
                        density=f"{ev['density_at_target']:.4f}", true=f"{ev['true_density']:.4f}")
        if bad >= cfg.patience:
            break
    bar.close()
    p.load_state_dict(best_state)
    best_epoch = max(range(len(history)), key=lambda i: ((history[i]["recall_at_budget"],
                                                         -history[i]["density_at_target"]), -i))
    return p, {"rank": rank, "epochs": len(history), "best_epoch": best_epoch, "history": history}


def fit_layer_rank(data: LayerData, ranks: list[int], cfg: TrainConfig, layer: int) -> tuple[LayerPredictor, list[dict], bool]:
    """Binary search for the smallest candidate rank meeting the target on val."""
    ranks = sorted(set(ranks))
    tried: dict[int, tuple[LayerPredictor, dict]] = {}

    def attempt(r: int) -> dict:
        p, info = train_predictor(data, r, cfg, desc=f"layer {layer} rank {r}")
        ev = evaluate(p, data, "val", cfg)
        tried[r] = (p, {**info, "val": ev})
        return ev

    lo, hi, found = 0, len(ranks) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if attempt(ranks[mid])["ok"]:
            found, hi = mid, mid - 1
        else:
            lo = mid + 1
    if found is not None:
        rank, met = ranks[found], True
    else:  # nothing meets it: keep the best trade-off seen
        rank, met = min(tried, key=lambda r: (tried[r][1]["val"]["density_at_target"], r)), False
    return tried[rank][0], [tried[r][1] for r in sorted(tried)], met


@torch.no_grad()
def decision_threshold(p: LayerPredictor, data: LayerData, cfg: TrainConfig) -> tuple[float, float]:
    """(threshold, margin): largest threshold with val recall >= target + margin (see module docstring)."""
    logits, true = data.logits(p, "val"), data.labels("val")
    t0 = threshold_for_recall(logits, true, cfg.recall_target)
    margin = cfg.recall_margin_se * recall_standard_error(logits > t0, true)
    return threshold_for_recall(logits, true, min(1.0, cfg.recall_target + margin)), margin


@torch.no_grad()
def test_metrics(p: LayerPredictor, data: LayerData, ffn: torch.nn.Module | None, cfg: TrainConfig) -> dict:
    """Reported metrics on the test split at the predictor's threshold, plus the full trade-off curve."""
    logits, true = data.logits(p, "test"), data.labels("test")   # (a mixture of experts: routed experts only)
    pred = logits > p.threshold
    a = down = None
    if ffn is not None:
        x = norm_fn(ffn, data.h_test.device)(data.h_test.float())  # the FFN's own input, whatever the predictor reads
        a, down = layer_activation(ffn, x)
    out = mask_metrics(pred, true)
    out["density_ratio"] = out["pred_density"] / out["true_density"] if out["true_density"] else None
    out["ffn_rel_err"] = None if a is None else ffn_output_rel_error(a, down, true, pred)
    out["curve"] = recall_density_curve(logits, true)
    return out


def layer_activation(ffn: torch.nn.Module, x: torch.Tensor):
    """A layer's activation values over all its neurons for x = ffn_norm(h) (n, d), in float32 on x's device:
    (a (n, F), down rows (F, d)). For a mixture of experts the neurons are expert-major (E * f) and a is zero
    outside each token's routed experts."""
    from hybrid_runtime.model import MoEFeedForward
    dev = x.device

    def rows(m):
        return (m.gate.to(dev, torch.float32), m.up.to(dev, torch.float32), m.down.to(dev, torch.float32))

    if not isinstance(ffn, MoEFeedForward):
        gate, up, down = rows(ffn)
        return ffn.activation(F.linear(x, gate), F.linear(x, up)), down
    experts = [rows(e) for e in ffn.experts]
    a = torch.cat([ffn.activation(F.linear(x, g), F.linear(x, u)) for g, u, _ in experts], dim=1)  # (n, E*f)
    return a * routed_neurons(ffn, x), torch.cat([d for _, _, d in experts])


def layer_neurons(ffn: torch.nn.Module) -> tuple[int, int]:
    """(F, d): a layer's FFN neurons (all experts) and the model width."""
    if hasattr(ffn, "experts"):
        return len(ffn.experts) * ffn.experts[0].gate.shape[0], ffn.experts[0].gate.shape[1]
    return tuple(ffn.gate.shape)


def choose_input_kind(reader: SampleReader, ffns: list, cfg: TrainConfig, ranks: list[int],
                      layer: int) -> tuple[str, dict]:
    """Train one predictor per input kind on a probe layer; keep the lower val density at target."""
    if reader.x_kind == "ffn_norm" or ffns[layer] is None:
        return "ffn_norm" if reader.x_kind == "ffn_norm" else "residual", {"probe_layer": None,
                                                                          "reason": "only one input available"}
    rank = ranks[len(ranks) // 2]
    results = {}
    for kind in ("ffn_norm", "residual"):
        data = load_layer(reader, layer, make_input_fn(kind, reader.x_kind, norm_fn(ffns[layer], cfg.device)), cfg,
                          ffns[layer])
        p, _ = train_predictor(data, rank, cfg, desc=f"probe layer {layer} input={kind} rank {rank}")
        results[kind] = evaluate(p, data, "val", cfg)
    # ffn_norm is what the FFN itself reads (and what the runtime has at hand): the residual input
    # must be clearly better (> RESIDUAL_MARGIN lower density) to win, not just by training noise.
    better = results["residual"]["density_at_target"] < (1 - RESIDUAL_MARGIN) * results["ffn_norm"]["density_at_target"]
    kind = "residual" if better else "ffn_norm"
    return kind, {"probe_layer": layer, "rank": rank, "chosen": kind, "val": results}


# ---------------------------------------------------------------------------- all layers

@dataclass
class LayerResult:
    layer: int
    rank: int
    threshold: float
    recall_margin: float
    val_target_met: bool
    params: int
    param_frac: float
    test: dict
    rank_search: list[dict] = field(default_factory=list)
    baselines: list[dict] | None = None


def train_all(reader: SampleReader, ffns: list, cfg: TrainConfig, work_dir: Path, resume: bool = False,
              baseline_fn: Callable | None = None, baseline_layers: list[int] = ()) -> tuple[PredictorSet, dict]:
    """Train every layer; per-layer results are checkpointed in work_dir so `resume` skips done layers.

    ffns[i]: the model's FeedForward module of layer i (norm, gate, up, down, activation), or None (then
    the ffn_norm input and the FFN-output error are unavailable). baseline_fn(layer, data, predictor)
    returns baseline rows for the layers in baseline_layers.
    """
    L, d, f = reader.n_layers, reader.dim, reader.ffn_dim
    if len(ffns) != L:
        raise UserError(f"samples have {L} layers but the model has {len(ffns)}")
    for i, ffn in enumerate(ffns):
        if ffn is not None and layer_neurons(ffn) != (f, d):
            raise UserError(f"layer {i}: model FFN is {layer_neurons(ffn)} but samples are (f={f}, d={d}): "
                            "profile and model do not match")
    ranks = list(cfg.ranks) if cfg.ranks else auto_ranks(d, f, cfg.max_param_frac)
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / "input.json"
    if resume and state_path.is_file():
        input_info = json.loads(state_path.read_text())
        if input_info.get("config") != _cfg_fingerprint(cfg, ranks):
            raise UserError(f"{work_dir}: partial results were made with other training settings; "
                            "rerun with --force")
    else:
        for p in work_dir.glob("layer_*"):
            p.unlink()
        if cfg.input_kind == "auto":
            kind, info = choose_input_kind(reader, ffns, cfg, ranks, L // 2)
        else:
            kind, info = cfg.input_kind, {"probe_layer": None, "reason": "set by the user"}
        input_info = {"kind": kind, "choice": info, "config": _cfg_fingerprint(cfg, ranks)}
        state_path.write_text(json.dumps(input_info, indent=1))
    kind = input_info["kind"]

    layers, results = [], []
    bar = tqdm(range(L), desc="layers", disable=not cfg.progress, file=sys.stderr)
    for i in bar:
        p_path, m_path = work_dir / f"layer_{i:03d}.safetensors", work_dir / f"layer_{i:03d}.json"
        if resume and p_path.is_file() and m_path.is_file():
            layers.append(PredictorSet.load(p_path).layers[0])
            results.append(json.loads(m_path.read_text()))
            continue
        norm = norm_fn(ffns[i], cfg.device) if ffns[i] is not None else None
        data = load_layer(reader, i, make_input_fn(kind, reader.x_kind, norm), cfg, ffns[i])
        p, search, met = fit_layer_rank(data, ranks, cfg, i)
        p.threshold, margin = decision_threshold(p, data, cfg)
        res = LayerResult(layer=i, rank=p.rank, threshold=p.threshold, recall_margin=margin, val_target_met=met,
                          params=p.n_params(),
                          param_frac=p.n_params() / (3 * d * f), test=test_metrics(p, data, ffns[i], cfg),
                          rank_search=search)
        if baseline_fn is not None and i in baseline_layers:
            res.baselines = baseline_fn(i, data, p)
        rec = asdict(res)
        PredictorSet([p.cpu()], input_kind=kind).save(p_path)
        m_path.write_text(json.dumps(rec, indent=1))
        layers.append(p)
        results.append(rec)
        bar.set_postfix(recall=f"{res.test['recall']:.3f}", ratio=f"{res.test['density_ratio']:.2f}",
                        rank=p.rank)
    bar.close()
    pset = PredictorSet([p.cpu() for p in layers], input_kind=kind)
    summary = {"input": kind, "input_choice": input_info["choice"], "ranks": ranks,
               "config": {k: v for k, v in asdict(cfg).items() if k != "progress"}, "layers": results}
    return pset, summary


def _cfg_fingerprint(cfg: TrainConfig, ranks: list[int]) -> dict:
    keep = ("recall_target", "density_factor", "bias", "lr", "batch_size", "held_out_frac", "neg_weight_eps",
            "max_samples", "input_kind", "seed")
    return {k: getattr(cfg, k) for k in keep} | {"ranks": ranks}
