"""The hybrid FFN: hot neurons on the GPU (torch, or the CUDA kernels), cold neurons on the CPU (Numba).

One decode step of a layer (ARCHITECTURE.md, "One token"):
    GPU: x = ffn_norm(h); selection = predictor(x) > threshold (predictor mode)   `prepare`
         copy x and the cold part of the selection to pinned host memory (one D2H copy)
    GPU: y_hot = FFN over the selected hot rows            ┐ at the same time      `hot_ffn`
    CPU: y_cold = Numba FFN over the selected cold rows    ┘                      `cold_ffn`
         copy y_cold to the GPU; y = y_hot + y_cold          (one H2D copy)         `merge`
`forward` runs the four in that order; the CUDA-graph step (hybrid_graph.py) replays the GPU ones
as graphs around the same host call. The CPU half runs on the calling thread: the GPU half is
already queued when the host waits for x, so the GPU computes while the (GIL-free) Numba kernel
runs; no extra thread is needed.

Two selection rules, two classes:
- `HybridFFN` (--exact): true activations; the hot block is computed densely (zeros are exact)
  and the CPU kernel evaluates every cold gate, reading up/down rows only where the gate fires.
  For the exact-zero activations (activations.py) this equals the dense FFN.
- `PredictedHybridFFN` (--predictor, default): the predictor's mask decides which neurons are
  computed at all (PowerInfer's approximation).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hybrid_runtime import kernels
from hybrid_runtime.activations import Activation
from hybrid_runtime.cpu_ffn import ColdFFN, ColdRows
from hybrid_runtime.model import RMSNorm, route


class CpuStaging:
    """Host side is the same memory: no copies (the `--device cpu` runtime and the tests)."""

    def __init__(self):
        self.y = np.empty((0, 0), np.float32)   # the cold half's output, grown to the largest step

    def copy_to_host(self, x: torch.Tensor, cold_selected: torch.Tensor | None):
        sel = None if cold_selected is None else cold_selected.numpy()
        return x.float().contiguous().numpy(), sel

    def mark_ready(self) -> None:
        pass

    def wait(self) -> None:
        pass

    def host_out(self, n: int, dim: int) -> np.ndarray:
        if self.y.shape[0] < n or self.y.shape[1] != dim:
            self.y = np.empty((n, dim), np.float32)
        return self.y[:n]

    def from_host(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.y[:n]).to(like.dtype)


class CudaStaging:
    """Pinned host buffers shared by all layers; one D2H and one H2D copy per layer.

    Reuse is safe without extra syncs: every copy is on the current stream, and the host only
    touches a buffer after waiting on an event recorded behind the previous layer's copies."""

    def __init__(self, max_tokens: int, dim: int, max_cold: int, device: torch.device):
        self.device = device
        self.x = torch.empty(max_tokens, dim, dtype=torch.float32, pin_memory=True)
        self.sel = torch.empty(max(max_cold, 1), dtype=torch.bool, pin_memory=True)
        self.y = torch.empty(max_tokens, dim, dtype=torch.float32, pin_memory=True)
        self.y_np = self.y.numpy()
        self.ready = torch.cuda.Event()

    def copy_to_host(self, x: torch.Tensor, cold_selected: torch.Tensor | None):
        """Queue the D2H copies (capturable in a CUDA graph); returns host views of the buffers."""
        n = x.shape[0]
        self.x[:n].copy_(x.float(), non_blocking=True)
        sel = None
        if cold_selected is not None:
            m = cold_selected.shape[0]
            self.sel[:m].copy_(cold_selected, non_blocking=True)
            sel = self.sel[:m].numpy()
        return self.x[:n].numpy(), sel

    def mark_ready(self) -> None:
        self.ready.record()       # behind the D2H copies queued by copy_to_host

    def wait(self) -> None:
        self.ready.synchronize()  # deliberate sync: the CPU half needs x (the one per-layer round trip)

    def host_out(self, n: int, dim: int) -> np.ndarray:
        return self.y_np[:n]

    def from_host(self, n: int, like: torch.Tensor) -> torch.Tensor:
        # the pinned buffer that host_out handed to the cold half: an asynchronous copy (capturable)
        return self.y[:n].to(self.device, non_blocking=True).to(like.dtype)


class HybridFFN(nn.Module):
    """Exact hybrid FFN: rows [0, n_hot) on the device, rows [n_hot, f) in CPU memory.

    The hot half runs through the CUDA sparse kernels when `use_kernels` (fp16/bf16 on a GPU with
    the extension built), else through plain torch over the whole hot block (the tested fallback).
    """

    def __init__(self, norm: RMSNorm, hot_gate: torch.Tensor, hot_up: torch.Tensor, hot_down: torch.Tensor,
                 cold: ColdRows | None, activation: Activation, staging, use_kernels: bool = False):
        super().__init__()
        self.activation = activation
        self.hot_ffn = self.hot_ffn_kernels if use_kernels and hot_gate.shape[0] else self.hot_ffn_torch
        self.norm = norm
        self.hot_gate = nn.Parameter(hot_gate, requires_grad=False)   # (k, d)
        self.hot_up = nn.Parameter(hot_up, requires_grad=False)       # (k, d)
        self.hot_down = nn.Parameter(hot_down, requires_grad=False)   # (k, d)
        self.cold = ColdFFN(cold, activation) \
            if cold is not None and cold.n_rows else None
        self.n_cold = cold.n_rows if self.cold is not None else 0
        self.all_cold = np.arange(self.n_cold, dtype=np.int32)
        self.staging = staging

    def select(self, h: torch.Tensor, x: torch.Tensor):
        """(hot predictor logits (N, k) or None, cold selection (n_cold,) bool or None); None: exact."""
        return None, None

    def prepare(self, h: torch.Tensor):
        """h (N, d) -> (x = ffn_norm(h) (N, d), hot logits, host views of x and the cold selection
        (None without cold rows)); the D2H copies are queued, not waited for."""
        x = self.norm(h)                                                       # (N, d)
        hot_logits, cold_sel = self.select(h, x)
        views = self.staging.copy_to_host(x, cold_sel) if self.cold is not None else None
        return x, hot_logits, views

    def hot_ffn_torch(self, x: torch.Tensor, hot_logits: None) -> torch.Tensor:
        a = self.activation(F.linear(x, self.hot_gate), F.linear(x, self.hot_up))  # (N, k)
        return a @ self.hot_down                                                   # (N, d)

    def hot_ffn_kernels(self, x: torch.Tensor, hot_logits: None) -> torch.Tensor:
        # dense gate, up and down rows only where the gate fires: exact
        return kernels.dense_gate_sparse_ffn(x, self.hot_gate, self.hot_up, self.hot_down,
                                             self.activation.name, self.activation.threshold)

    def cold_ffn(self, x_host: np.ndarray, cold_sel: np.ndarray | None) -> None:
        """The CPU half, into the staging's host output buffer (what `merge` adds)."""
        active = self.all_cold if cold_sel is None else np.flatnonzero(cold_sel).astype(np.int32)
        y = self.staging.host_out(*x_host.shape)
        if x_host.shape[0] == 1:
            self.cold.decode(x_host[0], active, y[0])
        else:
            self.cold.batch(x_host, active, y)

    def merge(self, y_hot: torch.Tensor) -> torch.Tensor:
        """y_hot (N, d) + the cold half's output (copied from the host)."""
        if self.cold is None:
            return y_hot
        return y_hot + self.staging.from_host(y_hot.shape[0], y_hot)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, d = h.shape
        x, hot_logits, views = self.prepare(h.view(B * T, d))
        if views is not None:
            self.staging.mark_ready()
        y = self.hot_ffn(x, hot_logits)                         # queued: GPU hot half
        if views is not None:
            self.staging.wait()
            self.cold_ffn(*views)                               # CPU half, while the GPU works
        return self.merge(y).view(B, T, d)


class PredictedHybridFFN(HybridFFN):
    """Predictor mode: only neurons whose predictor logit passes the layer threshold are computed."""

    def __init__(self, *args, predictor: nn.Module, predictor_reads_residual: bool, n_hot: int, **kw):
        super().__init__(*args, **kw)
        self.predictor = predictor
        self.reads_residual = predictor_reads_residual
        self.n_hot = n_hot

    def select(self, h: torch.Tensor, x: torch.Tensor):
        logits = self.predictor(h if self.reads_residual else x)           # (N, f)
        cold_sel = (logits[:, self.n_hot:] > self.predictor.threshold).any(dim=0)  # union over tokens
        return logits[:, :self.n_hot], cold_sel

    def hot_ffn_torch(self, x: torch.Tensor, hot_logits: torch.Tensor) -> torch.Tensor:
        keep = (hot_logits > self.predictor.threshold).to(x.dtype)          # (N, k)
        a = self.activation(F.linear(x, self.hot_gate), F.linear(x, self.hot_up)) * keep
        return a @ self.hot_down

    def hot_ffn_kernels(self, x: torch.Tensor, hot_logits: torch.Tensor) -> torch.Tensor:
        idx, count = kernels.active_indices(hot_logits, self.predictor.threshold)  # on the GPU, no sync
        return kernels.sparse_ffn(x, self.hot_gate, self.hot_up, self.hot_down, idx, count,
                                  self.activation.name, self.activation.threshold)


class HybridMoEFFN(nn.Module):
    """Mixture of experts, hybrid: the router and each expert's hot rows [0, k_e) on the device, each expert's
    cold rows [k_e, f) in CPU memory. Exact mode (no predictor) equals the dense `MoEFeedForward`; with a
    predictor (outputs for all E * f neurons, expert-major) only the predicted neurons of the routed experts
    are computed.

    A step: x = ffn_norm(h); the routing (`model.route`, the dense MoE's function) and the predictor's hidden
    layer; a deliberate host sync for the routing (which experts run on which tokens decides the shapes, as
    in the dense MoE); per routed expert its predictor output rows and its hot rows, queued on the device;
    one more sync for x and the predicted cold rows; then on the CPU each routed expert's cold rows over its
    tokens (the union of their predicted cold neurons); y adds weight * (hot + cold) per expert, in expert
    order as the dense MoE adds.
    """

    def __init__(self, norm: RMSNorm, router: torch.Tensor, top_k: int,
                 hot: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cold: list[ColdRows | None],
                 activation: Activation, predictor: nn.Module | None = None, predictor_reads_residual: bool = False):
        super().__init__()
        self.norm, self.top_k, self.activation = norm, top_k, activation
        self.router = nn.Parameter(router, requires_grad=False)                 # (E, d)
        self.hot = nn.ParameterList(nn.Parameter(t, requires_grad=False) for rows in hot for t in rows)
        self.n_hot = [rows[0].shape[0] for rows in hot]
        self.ffn_dim = hot[0][0].shape[0] + (cold[0].n_rows if cold[0] is not None else 0)
        self.cold = [ColdFFN(c, activation) if c is not None and c.n_rows else None for c in cold]
        self.all_cold = [np.arange(c.cold.n_rows, dtype=np.int32) if c is not None else None for c in self.cold]
        self.predictor, self.reads_residual = predictor, predictor_reads_residual

    def hot_rows(self, e: int):
        return self.hot[3 * e], self.hot[3 * e + 1], self.hot[3 * e + 2]                 # (k_e, d) each

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, d = h.shape
        h = h.view(B * T, d)
        x = self.norm(h)                                                                  # (N, d)
        weights, chosen = route(x, self.router, self.top_k)                              # (N, k), (N, k)
        p, z = self.predictor, None
        if p is not None:   # the predictor's hidden layer once; its output rows only for the routed experts
            z = F.relu(F.linear(h if self.reads_residual else x, p.w1, p.b1))            # (N, r)
        # deliberate host sync: the routing decides which experts run on which tokens (as in the dense MoE)
        chosen_host = chosen.cpu().numpy()
        f = self.ffn_dim
        parts = []
        for e in range(len(self.cold)):
            token, slot = np.nonzero(chosen_host == e)                                     # (n_e,), (n_e,)
            if not len(token):
                continue
            tok = torch.from_numpy(token).to(x.device)
            keep = None if z is None else F.linear(z[tok], p.w2[e * f:(e + 1) * f], p.b2[e * f:(e + 1) * f]) > p.threshold
            gate, up, down = self.hot_rows(e)
            a = self.activation(F.linear(x[tok], gate), F.linear(x[tok], up))             # (n_e, k_e): queued
            if keep is not None:
                a = a * keep[:, :self.n_hot[e]]
            parts.append((e, token, tok, slot, a @ down, keep))
        cold_parts = [part for part in parts if self.cold[part[0]] is not None]
        y_cold = {}
        if cold_parts:
            # deliberate host sync: the CPU half's input (and the union of each expert's predicted cold rows)
            x_host = x.float().cpu().numpy()
            sel = (None if z is None else
                   torch.cat([keep[:, self.n_hot[e]:].any(dim=0) for e, *_, keep in cold_parts]).cpu().numpy())
            at = 0
            for e, token, *_ in cold_parts:                                                # CPU, as the device works
                cold, n_cold = self.cold[e], self.cold[e].cold.n_rows
                active = (self.all_cold[e] if sel is None else
                          np.flatnonzero(sel[at:at + n_cold]).astype(np.int32))
                at += n_cold
                xe = np.ascontiguousarray(x_host[token])
                out = np.empty_like(xe)
                if len(token) == 1:
                    cold.decode(xe[0], active, out[0])
                else:
                    cold.batch(xe, active, out)
                y_cold[e] = out
        y = torch.zeros_like(x)
        for e, token, tok, slot, y_e, _ in parts:
            if e in y_cold:
                y_e = y_e + torch.from_numpy(y_cold[e]).to(y_e.device, y_e.dtype)
            y.index_add_(0, tok, (y_e * weights[tok, torch.from_numpy(slot).to(x.device), None]).to(y.dtype))
        return y.view(B, T, d)


class ReferenceFFN(nn.Module):
    """What the hybrid modes compute, token by token, with dense torch ops: the reference the sparse
    paths are tested against and the evaluation's FFN (`hybrid-convert eval --mode`).

        dense      a = the model's activation (no cut)
        exact      a = the sparse activation (exact zeros, or the layer's magnitude cut)
        predictor  a = the sparse activation on the neurons the predictor marks, 0 elsewhere

    `counts` accumulates per layer (tokens, computed (a != 0), truly active, predicted, predicted and
    truly active) over every forward, for sparsity, recall and density."""

    def __init__(self, ffn: nn.Module, activation: Activation, mode: str, predictor: nn.Module | None = None,
                 predictor_reads_residual: bool = False):
        super().__init__()
        if mode not in ("dense", "exact", "predictor") or (mode == "predictor") != (predictor is not None):
            raise ValueError(f"mode {mode!r} with{'out' if predictor is None else ''} a predictor")
        self.ffn, self.mode, self.predictor = ffn, mode, predictor
        self.reads_residual = predictor_reads_residual
        self.activation = activation if mode != "dense" else activation.without_cut()
        self.sparse = activation
        self.counts = torch.zeros(5, dtype=torch.float64)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ffn = self.ffn
        x = ffn.norm(h)                                                       # (B, T, d)
        g, u = F.linear(x, ffn.gate), F.linear(x, ffn.up)                     # (B, T, f)
        a = self.activation(g, u)
        active = self.sparse(g, u) != 0                                       # the truly active neurons
        if self.predictor is not None:
            pred = self.predictor(h if self.reads_residual else x) > self.predictor.threshold
            a = a * pred
        else:
            pred = torch.ones_like(active)
        self.counts += torch.stack([torch.tensor(float(active[..., 0].numel())), (a != 0).sum().double().cpu(),
                                    active.sum().double().cpu(), pred.sum().double().cpu(),
                                    (pred & active).sum().double().cpu()])
        return a @ ffn.down                                                   # (B, T, d)


class ReferenceMoEFFN(ReferenceFFN):
    """`ReferenceFFN` for a mixture of experts (`model.MoEFeedForward`): the same modes inside each token's
    routed experts (the predictor's outputs are expert-major, E * f), added as the dense MoE adds them.
    `counts` are over all E * f neurons of the layer: a token's unrouted experts count as not computed."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ffn = self.ffn
        B, T, d = h.shape
        x = ffn.norm(h).view(B * T, d)                                        # (N, d)
        weights, chosen = route(x, ffn.router, ffn.top_k)                     # (N, k)
        pred_all = None
        if self.predictor is not None:
            pred_all = self.predictor(h.view(B * T, d) if self.reads_residual else x) > self.predictor.threshold
        f = ffn.experts[0].gate.shape[0]
        y = torch.zeros_like(x)
        stats = torch.zeros(5, dtype=torch.float64)
        stats[0] = B * T
        for e, expert in enumerate(ffn.experts):
            token, slot = torch.where(chosen == e)                            # (n_e,), (n_e,)
            if token.numel() == 0:
                continue
            g, u = F.linear(x[token], expert.gate), F.linear(x[token], expert.up)   # (n_e, f)
            a = self.activation(g, u)
            active = self.sparse(g, u) != 0
            pred = pred_all[token, e * f:(e + 1) * f] if pred_all is not None else torch.ones_like(active)
            a = a * pred
            stats[1:] += torch.stack([(a != 0).sum(), active.sum(), pred.sum(), (pred & active).sum()]).double().cpu()
            y.index_add_(0, token, ((a @ expert.down) * weights[token, slot, None]).to(y.dtype))
        self.counts += stats
        return y.view(B, T, d)


def build_hybrid_model(path, hot_counts: list[int], device: torch.device, dtype: torch.dtype | None = None,
                       mode: str = "predictor", cold_format: str | None = None, max_tokens: int = 512):
    """Load a hybrid model directory with layer l's rows [0, hot_counts[l]) on `device` in `dtype`
    (default: the checkpoint's, on the GPU too) and the rest in CPU memory as `cold_format` rows
    (bf16/fp16 bit patterns, or int8 with per-row scales). The cold rows are cut from the weights
    in `dtype`: with the defaults (the checkpoint's dtype, or float32 on the CPU) a float16
    checkpoint's cold fp16 rows are its own bits.

    A mixture of experts: hot_counts[l] lists each expert's hot prefix (HybridMoEFFN).
    mode "predictor" uses the stored predictors; "exact" computes true activations.
    """
    from hybrid_runtime.errors import UserError
    from hybrid_runtime.loading import load_model
    from hybrid_runtime.model_dir import open_model_dir

    md = open_model_dir(path)
    if md.hybrid is None:
        raise UserError(f"{md.path}: not a hybrid model directory (no hybrid.json)")
    if mode not in ("predictor", "exact"):
        raise UserError(f"unknown hybrid mode {mode!r} (predictor or exact)")
    predictors_file = md.hybrid.predictors_file
    if mode == "predictor" and predictors_file is None:
        raise UserError(f"{md.path}: has no predictors (hybrid.json 'predictors' is null); run with --exact "
                        "or re-pack with predictors")
    cfg = md.config
    activations = md.hybrid.layer_activations(cfg.activation)
    if not all(a.has_exact_zeros for a in activations):
        raise UserError(f"{md.path}: activation {cfg.act!r} has no exact zeros and hybrid.json defines no magnitude "
                        "cut; profile it with --cett and re-pack, or convert it with `hybrid-convert prosparse`")
    if cfg.n_experts:
        if len(hot_counts) != cfg.n_layers or any(not isinstance(ks, (list, tuple)) or len(ks) != cfg.n_experts
                                                  or any(not 0 <= k <= cfg.ffn_dim for k in ks) for ks in hot_counts):
            raise UserError(f"hot neuron counts must be {cfg.n_layers} lists of {cfg.n_experts} values in "
                            f"[0, {cfg.ffn_dim}]")
    elif len(hot_counts) != cfg.n_layers or any(not 0 <= k <= cfg.ffn_dim for k in hot_counts):
        raise UserError(f"hot neuron counts must be {cfg.n_layers} values in [0, {cfg.ffn_dim}]")
    run_dtype = dtype or md.dtype
    # memory-mapped where possible; in host memory first, the device parts move below
    model = load_model(md, device="cpu", dtype=run_dtype)
    predictors = None
    if mode == "predictor":
        from hybrid_runtime.predictor import PredictorSet
        predictors = PredictorSet.load(predictors_file, device=device, dtype=run_dtype)
        if len(predictors) != cfg.n_layers:
            raise UserError(f"{predictors_file}: {len(predictors)} layers, the model has {cfg.n_layers}")
    if cfg.n_experts:
        for i, layer in enumerate(model.layers):
            ffn = layer.ffn
            parts = list(zip(ffn.experts, hot_counts[i]))
            layer.ffn = HybridMoEFFN(
                ffn.norm.to(device), ffn.router.data.to(device), ffn.top_k,
                [tuple(t[:k].to(device) for t in (ex.gate.data, ex.up.data, ex.down.data)) for ex, k in parts],
                [ColdRows.from_torch(ex.gate.data[k:], ex.up.data[k:], ex.down.data[k:], fmt=cold_format)
                 if k < cfg.ffn_dim else None for ex, k in parts],
                activations[i], predictor=None if predictors is None else predictors.layers[i],
                predictor_reads_residual=predictors is not None and predictors.input_kind == "residual")
        return _non_ffn_to(model, device)
    max_cold = max(cfg.ffn_dim - k for k in hot_counts)
    use_kernels = (device.type == "cuda" and run_dtype in (torch.float16, torch.bfloat16)
                   and kernels.cuda_kernels_ready())
    if use_kernels and any(a.magnitude for a in activations):
        from hybrid_runtime.errors import log
        log("note: the CUDA sparse kernels have no magnitude cut yet; the hot rows of this CETT-sparse model "
            "run through torch (same results)")
        use_kernels = False
    staging = (CudaStaging(max_tokens, cfg.dim, max_cold, device) if device.type == "cuda"
               else CpuStaging())
    for i, layer in enumerate(model.layers):
        ffn, k = layer.ffn, hot_counts[i]
        hot = [t[:k].to(device) for t in (ffn.gate.data, ffn.up.data, ffn.down.data)]
        cold = ColdRows.from_torch(ffn.gate.data[k:], ffn.up.data[k:], ffn.down.data[k:], fmt=cold_format) \
            if k < cfg.ffn_dim else None
        args = (ffn.norm.to(device), *hot, cold, activations[i], staging)
        if predictors is None:
            layer.ffn = HybridFFN(*args, use_kernels=use_kernels)
        else:
            layer.ffn = PredictedHybridFFN(*args, use_kernels=use_kernels, predictor=predictors.layers[i],
                                           predictor_reads_residual=predictors.input_kind == "residual",
                                           n_hot=k)
    return _non_ffn_to(model, device)


def _non_ffn_to(model, device: torch.device):
    """Everything that is not an FFN part (those are placed already) to the device."""
    model.tok_embeddings.to(device)
    model.norm.to(device)
    model.output.to(device)
    for layer in model.layers:
        layer.attn_norm.to(device)
        layer.attn.to(device)
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model
