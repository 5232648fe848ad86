"""scikit-learn baselines for the activation predictors, compared at equal predicted density.

On the same train/test split and input as the torch predictor of a layer:
  ridge_lowrank  Ridge regression x -> active (0/1) for all f neurons, then reduced-rank projection
                 to the torch predictor's rank (W_r = V_r V_r^T W, V_r the top right singular vectors
                 of the fitted scores): a low-rank linear probe with about the predictor's parameters.
  pca_logreg     x -> PCA to the predictor's rank r -> one-vs-rest logistic regression (SGDClassifier,
                 log loss, balanced classes), fitted on a random subset of neurons that are active in
                 some but not all training tokens (all f would cost f fits); parameters counted for all f.
Why every baseline is held to about the predictor's parameter budget: for ReLU models the label
`gate_j . x > 0` is exactly linear in the normed x, so a full-rank linear classifier is the gate
itself (100% recall at the cost of computing the gate) - the question is what a cheap predictor gets.
  mlp_sklearn    MLPClassifier (one ReLU hidden layer of the predictor's rank, multi-label logistic
                 outputs), only on small layers.
Each method's threshold is set so its test predicted density equals the torch predictor's test density
(on the neuron subset for pca_logreg, where the torch predictor is re-thresholded on that subset too),
and recall is compared there.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from predictors.metrics import recall_at_density
from hybrid_runtime.predictor import LayerPredictor
from predictors.train import LayerData, predict_logits


@dataclass
class BaselineConfig:
    max_train: int = 20000        # sklearn fits on at most this many training rows
    n_subset: int = 32            # neurons for the one-vs-rest logistic model
    mlp_max_ffn_dim: int = 2048   # MLPClassifier only when f <= this ...
    mlp_max_dim: int = 1024       # ... and d <= this
    mlp_max_iter: int = 60
    ridge_alpha: float = 1.0
    seed: int = 0


def _row(method: str, scores: np.ndarray | torch.Tensor, true: torch.Tensor, density: float,
         params: int, seconds: float, **extra) -> dict:
    m = recall_at_density(torch.as_tensor(np.asarray(scores, dtype=np.float32)), true, density)
    return {"method": method, "recall": m["recall"], "precision": m["precision"],
            "pred_density": m["pred_density"], "params": params, "fit_seconds": round(seconds, 2), **extra}


def run_baselines(data: LayerData, predictor: LayerPredictor, cfg: BaselineConfig = BaselineConfig()) -> list[dict]:
    """Rows {method, recall, precision, pred_density, params, ...}; the first row is the torch predictor."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge, SGDClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils.extmath import randomized_svd

    rng = np.random.default_rng(cfg.seed)
    n_tr = len(data.x["train"])
    take = np.sort(rng.choice(n_tr, min(n_tr, cfg.max_train), replace=False))
    x_tr = data.x["train"][torch.from_numpy(take).to(data.x["train"].device)].cpu().numpy()
    y_tr = data.labels("train")[torch.from_numpy(take).to(data.x["train"].device)].cpu().numpy()
    x_te = data.x["test"].cpu().numpy()
    y_te = data.labels("test").cpu()
    scaler = StandardScaler().fit(x_tr)
    xs_tr, xs_te = scaler.transform(x_tr), scaler.transform(x_te)
    d, f, r = x_tr.shape[1], y_tr.shape[1], predictor.rank

    torch_logits = predict_logits(predictor, data.x["test"]).cpu()  # (n_test, f)
    density = float((torch_logits > predictor.threshold).float().mean())
    rows = [_row("torch_mlp", torch_logits, y_te, density, predictor.n_params(), 0.0, neurons="all")]

    # low-rank linear probe
    t0 = time.perf_counter()
    ridge = Ridge(alpha=cfg.ridge_alpha).fit(xs_tr, y_tr.astype(np.float32))
    W = ridge.coef_.reshape(f, d)                                        # (f, d)
    fitted = xs_tr @ W.T                                                 # (n, f)
    k = min(r, min(fitted.shape) - 1) if min(fitted.shape) > 1 else 1
    _, _, vt = randomized_svd(fitted, n_components=k, random_state=cfg.seed)  # (k, f)
    W_r = vt.T @ (vt @ W)                                                # (f, d), rank k
    scores = xs_te @ W_r.T + ridge.intercept_
    rows.append(_row("ridge_lowrank", scores, y_te, density, k * (d + f) + f, time.perf_counter() - t0,
                     neurons="all"))

    # PCA(r) features -> one-vs-rest logistic regression, on a neuron subset
    rate = y_tr.mean(0)
    usable = np.flatnonzero((rate > 0) & (rate < 1))
    if len(usable):
        subset = np.sort(rng.choice(usable, min(cfg.n_subset, len(usable)), replace=False))
        t0 = time.perf_counter()
        pca = PCA(n_components=min(r, d, len(xs_tr)), random_state=cfg.seed).fit(xs_tr)
        z_tr, z_te = pca.transform(xs_tr), pca.transform(xs_te)
        z_scale = z_tr.std(0) + 1e-12
        z_tr, z_te = z_tr / z_scale, z_te / z_scale
        cols = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter is expected and harmless here
            for j in subset:
                clf = SGDClassifier(loss="log_loss", class_weight="balanced", alpha=1e-4, max_iter=30,
                                    tol=1e-4, random_state=cfg.seed).fit(z_tr, y_tr[:, j])
                cols.append(clf.decision_function(z_te))
        sub_scores, sub_true = np.stack(cols, 1), y_te[:, torch.from_numpy(subset)]
        sub_torch = torch_logits[:, torch.from_numpy(subset)]
        sub_density = float((sub_torch > predictor.threshold).float().mean())
        rows.append(_row("torch_mlp@subset", sub_torch, sub_true, sub_density, predictor.n_params(), 0.0,
                         neurons=len(subset)))
        rows.append(_row("pca_logreg@subset", sub_scores, sub_true, sub_density, pca.n_components_ * d + f * (
            pca.n_components_ + 1), time.perf_counter() - t0, neurons=len(subset)))

    # sklearn MLP, same architecture, unweighted multi-label log loss
    if f <= cfg.mlp_max_ffn_dim and d <= cfg.mlp_max_dim:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlp = MLPClassifier(hidden_layer_sizes=(r,), activation="relu", learning_rate_init=1e-3,
                                batch_size=min(1024, len(xs_tr)), max_iter=cfg.mlp_max_iter,
                                random_state=cfg.seed)  # (its early_stopping scores exact-match accuracy)
            mlp.fit(xs_tr, y_tr)
        # predict_proba of a multi-label MLP is (n, f) sigmoid outputs; logit keeps ties rare
        prob = np.clip(mlp.predict_proba(xs_te), 1e-12, 1 - 1e-12)
        rows.append(_row("mlp_sklearn", np.log(prob) - np.log1p(-prob), y_te, density,
                         r * (d + f) + r + f, time.perf_counter() - t0, neurons="all"))
    else:
        rows.append({"method": "mlp_sklearn", "skipped": f"layer too large (f={f}, d={d})"})
    return rows
