"""The hybrid decode step with every GPU segment replayed as a CUDA graph.

A layer with cold rows cannot be one graph: the CPU must compute its cold neurons between the
GPU's two halves. So each layer is three graphs, with the CPU work between the second and the
third (ARCHITECTURE.md, "One token"). The graphs capture the model's own methods — the same
calls, in the same order, as `Transformer.forward` with `HybridFFN.forward`; nothing is re-written:

    first  model.embed
    pre    block.attend -> h_mid; ffn.prepare(h_mid): ffn_norm, predictor, D2H copy of x (+ selection)
    hot    ffn.hot_ffn over the selected hot rows                (GPU)  ┐ overlapped
           -- host waits for x, runs ffn.cold_ffn (Numba) --      (CPU)  ┘
    post   block.add_branch(h_mid, ffn.merge(y_hot)): H2D copy of y_cold, residual
    last   model.head

Replaying a graph costs one launch instead of dozens, which removes most of the per-layer
Python and launch overhead of the eager step (measured: ~1.8 ms per layer on the H100 machine).
All segments share one memory pool and are captured and replayed in the same order, so every
static output stays valid as the next segment's input.

`profiled_call` is the same step with host timers and CUDA events between the replays (the
benchmark's --profile-time, `StepProfile`); `__call__` stays free of any instrumentation.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from hybrid_runtime.hybrid import CudaStaging, HybridFFN

# StepProfile's columns (the benchmark's summary reads them by these names)
HOST_PHASES = ("launch", "wait", "cold_ffn", "loop", "profiling")   # per layer, host seconds
GPU_SPANS = ("pre", "hot", "idle_for_cpu", "post", "gap")           # per layer, GPU ms between events
TOKEN_HOST = ("wall", "first", "last", "tail_sync")                  # per token, host seconds
TOKEN_GPU = ("first", "last", "total")                               # per token, GPU ms


class HybridGraphedDecodeStep:
    """Batch-1, one-token decode of a hybrid model on CUDA; call like the model (tokens, input_pos)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, warmup_pos: int):
        self.model, self.device = model, device
        cfg = model.config
        layers = list(model.layers)
        ffns = [layer.ffn for layer in layers]
        if not all(isinstance(f, HybridFFN) for f in ffns):
            raise TypeError("HybridGraphedDecodeStep needs every layer's FFN to be a HybridFFN")
        self.staging: CudaStaging = next(f.staging for f in ffns)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        # warm-up and capture write K/V at warmup_pos: the last cache slot, overwritten before it is read
        self.pos = torch.full((1,), warmup_pos, dtype=torch.long, device=device)
        with torch.inference_mode():
            for _ in range(2):  # eager warm-up: cuBLAS handles, lazy kernel loading, Numba compilation
                model(self.token, self.pos)
        torch.cuda.synchronize(device)
        self._pool = torch.cuda.graph_pool_handle()
        d = cfg.dim
        capture = self._capture
        self.g_first, (h, cos, sin, mask) = capture(lambda: model.embed(self.token, self.pos))
        self.segments = []
        for layer, ffn in zip(layers, ffns):
            def pre(h=h, layer=layer, ffn=ffn):
                h_mid = layer.attend(h, cos, sin, mask, self.pos)         # (1, 1, d)
                return (h_mid, *ffn.prepare(h_mid.view(1, d)))

            g_pre, (h_mid, x, hot_logits, views) = capture(pre)
            g_hot, y_hot = capture(lambda ffn=ffn, x=x, hot_logits=hot_logits: ffn.hot_ffn(x, hot_logits))
            g_post, h = capture(lambda layer=layer, ffn=ffn, h_mid=h_mid, y_hot=y_hot:
                                layer.add_branch(h_mid, ffn.merge(y_hot).view(1, 1, d)))
            self.segments.append((g_pre, g_hot, g_post, ffn if ffn.cold is not None else None, views))

        self.g_last, self.logits = capture(lambda h=h: model.head(h))

    def _capture(self, fn):
        """fn's GPU work as a graph in the shared pool -> (graph, fn's outputs: the graph's static outputs)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            out = fn()
        return graph, out

    def describe(self) -> str:
        return "CUDA graph decode"

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        # kv_len is not needed: the graph attends over the whole pre-allocated cache (masked)
        self.token.copy_(tokens)
        self.pos.copy_(input_pos)
        self.g_first.replay()
        staging = self.staging
        for g_pre, g_hot, g_post, cold_ffn, views in self.segments:
            g_pre.replay()
            if cold_ffn is None:
                g_hot.replay()
                g_post.replay()
                continue
            staging.mark_ready()     # behind the D2H copies of this layer's x and selection
            g_hot.replay()           # the GPU computes the hot half while the CPU computes the cold half
            staging.wait()           # deliberate sync: the CPU half needs x
            cold_ffn.cold_ffn(*views)  # writes the pinned y buffer that g_post copies to the GPU
            g_post.replay()
        self.g_last.replay()
        return self.logits

    def profiled_call(self, tokens: torch.Tensor, input_pos: torch.Tensor, prof: "StepProfile") -> torch.Tensor:
        """`__call__` with host timers around every call and CUDA events recorded on the stream between
        the replays (outside the graphs), into `prof` (one row per token). The same operations in the
        same order; the only host sync is at the end of the token (the generator's `.item()` syncs
        there too), after which the events are read. Per layer, timestamps t0..t10:

            t0 ev_a t1 g_pre (+ ready) t2 ev_b t3 g_hot t4 ev_c t5 wait t6 cold FFN t7 ev_d t8 g_post
            t9 ev_e, count the selected cold neurons (+ keep x and the selection) t10

        The counting runs after g_post is launched (overlapped with it) and before the next layer's
        g_pre, which is what overwrites the shared host buffers.
        """
        i = prof.n
        if i >= prof.max_tokens:
            raise ValueError(f"StepProfile holds {prof.max_tokens} tokens; make a larger one")
        pc = time.perf_counter
        keep = i < prof.keep
        stamps = []
        t_start = pc()
        self.token.copy_(tokens)
        self.pos.copy_(input_pos)
        prof.ev_start.record()
        self.g_first.replay()
        t_first = pc()
        staging = self.staging
        for l, ((g_pre, g_hot, g_post, cold_ffn, views), (ea, eb, ec, ed, ee)) in enumerate(
                zip(self.segments, prof.ev_layers)):
            t0 = pc()
            ea.record()
            t1 = pc()
            g_pre.replay()
            if cold_ffn is not None:
                staging.mark_ready()
            t2 = pc()
            eb.record()
            t3 = pc()
            g_hot.replay()
            t4 = pc()
            ec.record()
            t5 = pc()
            if cold_ffn is not None:
                staging.wait()
                t6 = pc()
                cold_ffn.cold_ffn(*views)
                t7 = pc()
            else:
                t6 = t7 = t5
            ed.record()
            t8 = pc()
            g_post.replay()
            t9 = pc()
            ee.record()
            if cold_ffn is not None:
                x_host, sel = views
                prof.cold_selected[i, l] = cold_ffn.n_cold if sel is None else np.count_nonzero(sel)
                if keep:
                    prof.x[i, l] = x_host[0]
                    if sel is not None:
                        prof.sel[l][i] = sel
            stamps.append((t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, pc()))
        prof.ev_last.record()
        self.g_last.replay()
        prof.ev_end.record()
        t_last1 = pc()
        prof.ev_end.synchronize()   # the token's one host sync; every event recorded above has completed
        t_end = pc()
        prof.record_token(t_start, t_first, np.asarray(stamps), t_last1, t_end)
        return self.logits


class StepProfile:
    """Raw timings of `HybridGraphedDecodeStep.profiled_call`, one row per profiled token.

    host (T, L, 5) seconds per layer, adding up with the token columns to the call's wall time:
        launch     the three graph replays (and the D2H-ready event record the step always does)
        wait       staging.wait(): the GPU pre segment and the D2H copy of x still running
        cold_ffn   the Numba cold FFN call (np.flatnonzero of the selection + kernel)
        loop       Python between layers
        profiling  this profiler's own event records, counters and copies
    gpu (T, L, 5) ms between the events recorded around the replays:
        pre (attention, predictor, D2H copies), hot (hot FFN), idle_for_cpu (the GPU waits for the
        host to launch post: the CPU half is longer than the hot half), post (H2D copy of y_cold,
        residual), gap (until the next layer's pre is launched; the last layer's: until the final
        norm + lm_head graph)
    token_host (T, 4) seconds: wall, first (inputs + embedding graph), last (lm_head graph), tail_sync
    token_gpu (T, 3) ms: first (embedding graph + the gap to layer 0), last (final norm + lm_head), total
    cold_selected (T, L) selected cold neurons (0 for a layer without cold rows)
    x (keep, L, d), sel[l] (keep, n_cold_l): the cold FFN's inputs of the first `keep` tokens, for
        `cold_firing_counts` (which of the selected neurons really fired).
    """

    def __init__(self, step: HybridGraphedDecodeStep, max_tokens: int, keep_inputs: int = 0):
        L = len(step.segments)
        ffns = [seg[3] for seg in step.segments]
        self.n, self.max_tokens, self.n_layers = 0, max_tokens, L
        self.host = np.zeros((max_tokens, L, len(HOST_PHASES)))
        self.gpu = np.zeros((max_tokens, L, len(GPU_SPANS)))
        self.token_host = np.zeros((max_tokens, len(TOKEN_HOST)))
        self.token_gpu = np.zeros((max_tokens, len(TOKEN_GPU)))
        self.cold_selected = np.zeros((max_tokens, L), np.int64)
        self.cold_ffns = ffns
        self.n_cold = np.array([f.n_cold if f is not None else 0 for f in ffns], np.int64)
        self.cold_row_bytes = np.array([f.cold.cold.row_bytes if f is not None else 0 for f in ffns], np.int64)
        self.cold_format = next((f.cold.cold.fmt for f in ffns if f is not None), None)
        self.keep = min(keep_inputs, max_tokens)
        self.x = np.zeros((self.keep, L, step.model.config.dim), np.float32)
        # exact mode has no selection (every cold row is evaluated): a (keep, 0) array says so
        selects = [seg[4] is not None and seg[4][1] is not None for seg in step.segments]
        self.sel = [np.zeros((self.keep, n if has else 0), bool) for n, has in zip(self.n_cold, selects)]

        def event():
            return torch.cuda.Event(enable_timing=True)
        self.ev_start, self.ev_last, self.ev_end = event(), event(), event()
        self.ev_layers = [tuple(event() for _ in range(5)) for _ in range(L)]

    def record_token(self, t_start: float, t_first: float, stamps: np.ndarray, t_last1: float,
                     t_end: float) -> None:
        """Fold one token's host timestamps (stamps (L, 11), see profiled_call) and events into row n."""
        i, s = self.n, stamps
        h = self.host[i]
        h[:, 0] = (s[:, 2] - s[:, 1]) + (s[:, 4] - s[:, 3]) + (s[:, 9] - s[:, 8])
        h[:, 1] = s[:, 6] - s[:, 5]
        h[:, 2] = s[:, 7] - s[:, 6]
        h[:, 3] = s[:, 0] - np.concatenate([[t_first], s[:-1, 10]])      # since the previous layer ended
        h[:, 4] = (s[:, 1] - s[:, 0]) + (s[:, 3] - s[:, 2]) + (s[:, 5] - s[:, 4]) + (s[:, 8] - s[:, 7]) + \
            (s[:, 10] - s[:, 9])
        self.token_host[i] = (t_end - t_start, t_first - t_start, t_last1 - s[-1, 10], t_end - t_last1)
        chain = [self.ev_start] + [e for layer in self.ev_layers for e in layer] + [self.ev_last, self.ev_end]
        spans = np.array([a.elapsed_time(b) for a, b in zip(chain[:-1], chain[1:])])   # ms, 5L + 2
        L = self.n_layers
        self.gpu[i] = spans[1:1 + 5 * L].reshape(L, 5)                 # pre, hot, idle, post, gap
        self.token_gpu[i] = (spans[0], spans[-1], self.ev_start.elapsed_time(self.ev_end))
        self.n += 1

    def raw(self) -> dict:
        """The recorded tokens as plain arrays (the benchmark's `summarise_graphed_profile` input)."""
        n = self.n
        return {"tokens": n, "layers": self.n_layers, "host_phases": HOST_PHASES, "gpu_spans": GPU_SPANS,
                "token_host_cols": TOKEN_HOST, "token_gpu_cols": TOKEN_GPU,
                "host_s": self.host[:n], "gpu_ms": self.gpu[:n], "token_host_s": self.token_host[:n],
                "token_gpu_ms": self.token_gpu[:n], "cold_selected": self.cold_selected[:n],
                "n_cold": self.n_cold, "cold_row_bytes": self.cold_row_bytes, "cold_format": self.cold_format}

    def firing_counts(self) -> np.ndarray:
        """(L, 3) selected / gate-fired / active cold neurons over the kept tokens (cold_firing_counts)."""
        n = min(self.n, self.keep)
        return cold_firing_counts(self.cold_ffns, self.x[:n], [s[:n] for s in self.sel])


def cold_firing_counts(cold_ffns: list, x: np.ndarray, sel: list[np.ndarray]) -> np.ndarray:
    """Which selected cold neurons really fired, recomputed on the host after timing.

    cold_ffns[l]: layer l's HybridFFN (None: no cold rows); x (T, L, d) fp32: the cold FFN's input per
    token; sel[l] (T, n_cold_l) bool: its selection ((T, 0) for an exact-mode layer: every cold row).
    Returns (L, 3) int64 summed over tokens: selected neurons,
    gate-fired neurons (the kernel reads their up rows) and active neurons (it reads their down rows):
    g = gate . x (and u = up . x for dReLU) in fp32 from the stored rows, the activation's `active`
    and `gate_fires` (activations.py) as everywhere.
    """
    out = np.zeros((len(cold_ffns), 3), np.int64)
    T = x.shape[0]
    for l, ffn in enumerate(cold_ffns):
        if ffn is None or T == 0:
            continue
        cold = ffn.cold.cold
        m = sel[l] if sel[l].shape[1] == ffn.n_cold else np.ones((T, ffn.n_cold), bool)   # (T, n_cold)
        rows = np.flatnonzero(m.any(axis=0))
        if rows.size == 0:
            continue
        xt = torch.from_numpy(np.ascontiguousarray(x[:, l])).T                        # (d, T)
        gate_rows, up_rows, _ = cold.dequantize(rows)                                   # (U, d) fp32 each
        g = torch.from_numpy(gate_rows) @ xt                                            # (U, T)
        act = ffn.activation
        u = torch.from_numpy(up_rows) @ xt if act.name == "drelu" else torch.ones_like(g)
        chosen = torch.from_numpy(np.ascontiguousarray(m[:, rows].T))                 # (U, T)
        gate_fired = act.gate_fires(g) & chosen
        active = act.active(g, u) & chosen
        out[l] = (int(chosen.sum()), int(gate_fired.sum()), int(active.sum()))
    return out
