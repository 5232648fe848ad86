"""Predictor quality metrics on held-out samples.

All counts are micro-averaged over (token, neuron) pairs of one layer:
  recall        = TP / (TP + FN)  (1.0 when nothing is truly active: nothing can be missed)
  precision     = TP / (TP + FP)  (1.0 when nothing is predicted active)
  true_density  = mean(true),  pred_density = mean(pred)
  ffn_rel_err   = ||Y_pred - Y_true||_F / ||Y_true||_F over all held-out tokens, where Y_S = (a * S) @ down
                  is the FFN output computed over neuron set S only (a = activated gate * up).
Thresholds follow the predictor convention: predicted active iff score > threshold.
"""
from __future__ import annotations

import math

import numpy as np
import torch

RECALL_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999)


def _t(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a)) if not isinstance(a, torch.Tensor) else a


def mask_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict:
    """pred, true: bool (n, f). Returns recall, precision, densities and raw counts."""
    pred, true = _t(pred).bool(), _t(true).bool()
    if pred.shape != true.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} masks differ in shape")
    total = pred.numel()
    tp = int((pred & true).sum())
    n_pred, n_true = int(pred.sum()), int(true.sum())
    return {
        "recall": tp / n_true if n_true else 1.0,
        "precision": tp / n_pred if n_pred else 1.0,
        "pred_density": n_pred / total if total else 0.0,
        "true_density": n_true / total if total else 0.0,
        "tp": tp, "fp": n_pred - tp, "fn": n_true - tp, "n": total,
    }


@torch.no_grad()
def ffn_output_rel_error(a: torch.Tensor, down: torch.Tensor, true: torch.Tensor, pred: torch.Tensor,
                         block: int = 4096) -> float:
    """a: (n, f) activation values (act(g) * u); down: (f, d); true/pred: bool (n, f).

    Relative L2 (Frobenius over all tokens) error of the FFN output computed over the predicted
    neuron set instead of the true set. Computed in float32, `block` tokens at a time.
    """
    if not (a.shape == true.shape == pred.shape) or down.shape[0] != a.shape[1]:
        raise ValueError(f"shape mismatch: a {tuple(a.shape)}, down {tuple(down.shape)}, "
                         f"true {tuple(true.shape)}, pred {tuple(pred.shape)}")
    down = down.float()
    err2 = ref2 = 0.0
    for i in range(0, a.shape[0], block):
        ab, tb, pb = a[i:i + block].float(), true[i:i + block], pred[i:i + block]
        y_true = (ab * tb) @ down                 # (b, d)
        diff = (ab * (pb.float() - tb.float())) @ down  # y_pred - y_true
        err2 += float(diff.square().sum())
        ref2 += float(y_true.square().sum())
    return math.sqrt(err2 / ref2) if ref2 > 0 else 0.0


def recall_standard_error(pred: torch.Tensor, true: torch.Tensor) -> float:
    """Standard error of micro recall over tokens (rows), by the delta method for a ratio estimator.

    recall R = sum_t tp_t / sum_t pos_t; SE = sqrt(sum_t (tp_t - R pos_t)^2) / sum_t pos_t.
    """
    pred, true = _t(pred).bool(), _t(true).bool()
    tp, pos = (pred & true).sum(1).double(), true.sum(1).double()  # (n,)
    n_pos = float(pos.sum())
    if n_pos == 0:
        return 0.0
    r = float(tp.sum()) / n_pos
    return float((tp - r * pos).square().sum().sqrt()) / n_pos


def threshold_for_recall(scores: torch.Tensor, true: torch.Tensor, target: float) -> float:
    """Largest threshold t with recall(scores > t) >= target."""
    scores, true = _t(scores).float(), _t(true).bool()
    pos = scores[true]
    if pos.numel() == 0:
        return float(scores.max()) if scores.numel() else 0.0  # nothing to recall: predict nothing
    k = max(1, math.ceil(target * pos.numel() - 1e-9))  # need >= k positives strictly above t
    kth = torch.kthvalue(pos.flatten(), pos.numel() - k + 1).values  # k-th largest
    return float(torch.nextafter(kth, torch.tensor(-math.inf, device=kth.device)))


def threshold_for_density(scores: torch.Tensor, density: float) -> float:
    """Smallest threshold t with mean(scores > t) <= density (ties may make it lower than asked)."""
    flat = _t(scores).float().flatten()
    k = int(math.floor(density * flat.numel() + 1e-9))  # allowed number of predicted positives
    if k >= flat.numel():
        return float(torch.nextafter(flat.min(), torch.tensor(-math.inf, device=flat.device)))
    # predict strictly above the (k+1)-th largest score
    return float(torch.kthvalue(flat, flat.numel() - k).values)


def recall_at_density(scores: torch.Tensor, true: torch.Tensor, density: float) -> dict:
    t = threshold_for_density(scores, density)
    return {"threshold": t, **mask_metrics(_t(scores) > t, true)}


@torch.no_grad()
def recall_density_curve(scores: torch.Tensor, true: torch.Tensor,
                         recall_levels: tuple[float, ...] = RECALL_LEVELS) -> list[dict]:
    """Trade-off curve: for each recall level, the largest threshold reaching it and what it costs.

    Exact (no binning): positives' and all scores are sorted once; counts come from searchsorted.
    """
    scores, true = _t(scores).float(), _t(true).bool()
    all_sorted = scores.flatten().sort().values
    pos_sorted = scores[true].sort().values
    n, n_pos = all_sorted.numel(), pos_sorted.numel()
    curve = []
    for level in recall_levels:
        t = threshold_for_recall(scores, true, level)
        tt = torch.tensor([t], device=scores.device)
        n_pred = n - int(torch.searchsorted(all_sorted, tt, right=True))
        tp = n_pos - int(torch.searchsorted(pos_sorted, tt, right=True))
        curve.append({"recall_target": level, "threshold": t,
                      "recall": tp / n_pos if n_pos else 1.0,
                      "precision": tp / n_pred if n_pred else 1.0,
                      "pred_density": n_pred / n if n else 0.0})
    return curve
