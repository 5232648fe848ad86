"""--profile-time: where the hybrid's decode time goes (eager phases, and the CUDA-graphed step)."""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch


# --------------------------------------------------------------------------------------- hybrid instrumentation


class SelectionCounter:
    """Counts predicted-active hot and cold neurons per layer (GPU accumulators, one read at the end)."""

    def __init__(self, model):
        self.layers = []
        for i, layer in enumerate(model.layers):
            ffn = layer.ffn
            if not hasattr(ffn, "predictor") or not hasattr(ffn, "select"):   # (the hybrid MoE is not counted)
                continue
            acc = torch.zeros(2, dtype=torch.float64, device=ffn.hot_gate.device)
            orig = ffn.select

            def counted(h, x, orig=orig, ffn=ffn, acc=acc):
                hot_logits, cold_sel = orig(h, x)
                if ffn is self.layers[0][1]:
                    self.calls += 1
                if hot_logits is not None and hot_logits.numel():
                    acc[0] += (hot_logits > ffn.predictor.threshold).sum(dim=-1).double().mean()
                if cold_sel is not None and cold_sel.numel():
                    acc[1] += cold_sel.sum().double()
                return hot_logits, cold_sel

            self.layers.append((i, ffn, orig, acc))
            ffn.select = counted
        self.calls = 0

    def reset(self) -> None:
        for *_, acc in self.layers:
            acc.zero_()
        self.calls = 0

    def restore(self) -> list[tuple[float, float]]:
        """Per layer (mean hot selected, mean cold selected) per call; unwraps."""
        out = []
        for i, ffn, orig, acc in self.layers:
            ffn.select = orig
            out.append(tuple(float(v) / max(self.calls, 1) for v in acc.cpu()))
        return out


class FiringCounter:
    """Exact mode: per layer, the cold rows whose gate fires per decode call (what exact mode reads beyond
    every gate row: their up and down rows). Each layer's gate rows are decoded to fp32 once, here, and
    the count is g = x . gate^T with the layer's activation rule; `cold_ffn` is wrapped (instance
    attribute), hybrid.py is not modified."""

    def __init__(self, model):
        from hybrid_runtime.cpu_ffn import decode_rows
        self.layers = []
        for layer in model.layers:
            ffn = layer.ffn
            if getattr(ffn, "cold", None) is None or hasattr(ffn, "predictor"):
                continue
            rows = ffn.cold.cold
            gate = torch.from_numpy(decode_rows(rows.gate, rows.fmt_code, rows.gate_scale))   # (n_cold, d)
            acc = [0.0, 0]
            orig = ffn.cold_ffn

            def counted(x_host, cold_sel, orig=orig, gate=gate, act=ffn.activation, acc=acc):
                g = torch.from_numpy(x_host) @ gate.T                                          # (T, n_cold)
                acc[0] += float(act.gate_fires(g).sum(dim=-1).double().mean())
                acc[1] += 1
                return orig(x_host, cold_sel)

            self.layers.append((ffn, rows.n_rows, acc))
            ffn.cold_ffn = counted

    def reset(self) -> None:
        for *_, acc in self.layers:
            acc[0], acc[1] = 0.0, 0

    def restore(self) -> list[tuple[float, float, float]]:
        """Per layer (0 hot selected, every cold row, mean firing cold rows) per call; unwraps."""
        out = []
        for ffn, n_rows, acc in self.layers:
            del ffn.cold_ffn
            out.append((0.0, float(n_rows), acc[0] / max(acc[1], 1)))
        return out


def _decode_loop(model, prompt: list[int], n_tokens: int, device: torch.device, per_token=None,
                 after_prefill=None) -> None:
    """Prefill, then n_tokens greedy decode steps of `model` (eager), calling per_token(t0, t1, t2):
    t0 before the step, t1 when the host returned from the forward, t2 after reading the token."""
    pos = torch.arange(len(prompt) + n_tokens + 1, device=device)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt], device=device), pos[:len(prompt)])[0, -1]
        nxt = logits.argmax().view(1, 1)
        nxt.item()
        if after_prefill:
            after_prefill()
        for i in range(n_tokens):
            p = len(prompt) + i
            t0 = time.perf_counter()
            logits = model(nxt, pos[p:p + 1])[0, -1]
            t1 = time.perf_counter()
            nxt = logits.argmax().view(1, 1)
            nxt.item()
            t2 = time.perf_counter()
            if per_token:
                per_token(t0, t1, t2)


class PhaseProfiler:
    """--profile-time: wraps the hybrid layer's phases (attention, predictor select, D2H copy, hot FFN,
    host wait, cold FFN, H2D copy) with host timers, and the GPU ones with CUDA events. Local to the
    bench: instance attributes shadow the methods; hybrid.py is not modified."""

    GPU_PHASES = ("attention", "select", "to_host", "hot_ffn", "to_device")
    HOST_ONLY = ("wait", "cold_ffn")

    def __init__(self, model, cuda: bool):
        self.cuda = cuda
        self.host = defaultdict(float)
        self.gpu = defaultdict(float)
        self.calls = defaultdict(int)
        self.pending: list[tuple[str, object, object]] = []
        self.pool: list = []
        self.found: set[str] = set()
        self.n_layers = len(model.layers)
        staged = set()
        for layer in model.layers:
            self._wrap(layer.attn, "forward", "attention", gpu=True)
            ffn = layer.ffn
            for name in ("select", "hot_ffn", "cold_ffn"):
                if hasattr(ffn, name):
                    self._wrap(ffn, name, name, gpu=name != "cold_ffn")
            st = getattr(ffn, "staging", None)
            if st is not None and id(st) not in staged:
                staged.add(id(st))
                for name, phase in (("copy_to_host", "to_host"), ("wait", "wait"), ("from_host", "to_device")):
                    if hasattr(st, name):
                        self._wrap(st, name, phase, gpu=name != "wait")

    def _event_pair(self):
        if self.pool:
            return self.pool.pop()
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def _wrap(self, obj, name: str, phase: str, gpu: bool) -> None:
        orig = getattr(obj, name)
        self.found.add(phase)
        prof = self

        def timed(*args, **kwargs):
            ev = None
            if prof.cuda and gpu:
                ev = prof._event_pair()
                ev[0].record()
            t0 = time.perf_counter()
            r = orig(*args, **kwargs)
            prof.host[phase] += time.perf_counter() - t0
            if ev is not None:
                ev[1].record()
                prof.pending.append((phase, ev[0], ev[1]))
            prof.calls[phase] += 1
            return r

        setattr(obj, name, timed)

    def collect(self) -> None:
        """After a synchronising point: fold the recorded events into the GPU times."""
        for phase, e0, e1 in self.pending:
            self.gpu[phase] += e0.elapsed_time(e1) / 1e3
            self.pool.append((e0, e1))
        self.pending.clear()

    def run(self, model, prompt: list[int], n_tokens: int, device: torch.device) -> dict:
        timeline = defaultdict(float)
        gpu_total = [0.0]
        marks = {}
        if self.cuda:
            marks = {"start": torch.cuda.Event(enable_timing=True), "end": torch.cuda.Event(enable_timing=True)}

        def after_prefill():            # only decode steps are counted
            self.collect()
            for acc in (self.host, self.gpu, self.calls):
                acc.clear()
            if self.cuda:
                marks["start"].record()

        def per_token(t0, t1, t2):
            timeline["wall"] += t2 - t0
            timeline["forward_host"] += t1 - t0
            timeline["tail_sync"] += t2 - t1
            if self.cuda:               # outside the timed step: read this token's events
                marks["end"].record()
                marks["end"].synchronize()
                gpu_total[0] += marks["start"].elapsed_time(marks["end"]) / 1e3
            self.collect()
            if self.cuda:
                marks["start"].record()

        _decode_loop(model, prompt, n_tokens, device, per_token, after_prefill)
        host, gpu, calls = dict(self.host), dict(self.gpu), dict(self.calls)
        n = max(n_tokens, 1)
        ms = lambda v: 1e3 * v / n  # noqa: E731
        cold, wait = host.get("cold_ffn", 0.0), host.get("wait", 0.0)
        python = timeline["forward_host"] - cold - wait
        gpu_phases = {p: ms(gpu.get(p, 0.0)) for p in self.GPU_PHASES if p in self.found} if self.cuda else {}
        res = {
            "tokens": n_tokens, "layers": self.n_layers,
            "wall_ms": ms(timeline["wall"]),
            "host_timeline_ms": {"python_and_launch": ms(python), "cpu_cold_ffn": ms(cold),
                                 "wait_for_gpu_x": ms(wait), "end_of_token_sync": ms(timeline["tail_sync"])},
            "gpu_busy_ms": gpu_phases,
            "gpu_total_ms": ms(gpu_total[0]) if self.cuda else None,
            "host_phase_ms": {p: ms(v) for p, v in host.items()},
            "calls_per_token": {p: c / n for p, c in calls.items()},
            "phases_missing": sorted(set(self.GPU_PHASES + self.HOST_ONLY) - self.found),
        }
        L = max(self.n_layers, 1)
        res["summary_ms"] = {
            "GPU (attention + predictor + hot FFN, events)": sum(v for k, v in gpu_phases.items()
                                                              if k in ("attention", "select", "hot_ffn")),
            "CPU (cold FFN, Numba)": ms(cold),
            "copies/sync (host blocked on the GPU)": ms(wait + timeline["tail_sync"]),
            ("Python overhead (host time not blocked)" if self.cuda else
             "torch CPU work + Python (no GPU: attention etc. run on the host)"): ms(python),
        }
        res["per_layer_us"] = {"python_and_launch": 1e3 * ms(python) / L, "wait_for_gpu_x": 1e3 * ms(wait) / L,
                               "cpu_cold_ffn": 1e3 * ms(cold) / L}
        return res


def format_profile(p: dict) -> str:
    lines = [f"decode time breakdown, hybrid, {p['tokens']} tokens, {p['layers']} layers "
             f"(profiling pass with timers: {p['wall_ms']:.2f} ms/token wall)"]
    lines.append("  host timeline (adds up to the wall time):")
    for k, v in p["host_timeline_ms"].items():
        lines.append(f"    {k:<28} {v:8.3f} ms/token  {100 * v / max(p['wall_ms'], 1e-9):5.1f}%")
    if p["gpu_busy_ms"]:
        lines.append("  GPU time per phase (CUDA events; overlaps the host timeline):")
        for k, v in p["gpu_busy_ms"].items():
            lines.append(f"    {k:<28} {v:8.3f} ms/token")
        if p.get("gpu_total_ms") is not None:
            lines.append(f"    {'token start -> end':<28} {p['gpu_total_ms']:8.3f} ms/token")
    lines.append("  summary (GPU, CPU, copies/sync, Python overhead):")
    for k, v in p["summary_ms"].items():
        lines.append(f"    {k:<44} {v:8.3f} ms/token")
    u = p["per_layer_us"]
    lines.append(f"  per layer: Python/launch {u['python_and_launch']:.1f} us, wait for x {u['wait_for_gpu_x']:.1f} us, "
                 f"cold FFN {u['cpu_cold_ffn']:.1f} us (target: Python/sync <= 100 us per layer)")
    if p["phases_missing"]:
        lines.append(f"  phases not found in this hybrid build (not timed): {', '.join(p['phases_missing'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- graphed hybrid profile


def profile_graphed_step(step, model, prompt: list[int], n_tokens: int, device: torch.device):
    """--profile-time on CUDA: prefill (eager, as the Generator does), then n_tokens greedy decode steps
    through `step.profiled_call` (the runtime's CUDA-graphed hybrid step with timers). Keeps every
    token's cold FFN inputs for `StepProfile.firing_counts`. Returns the StepProfile."""
    from hybrid_runtime.hybrid_graph import StepProfile
    prof = StepProfile(step, n_tokens, keep_inputs=n_tokens)
    pos = torch.arange(len(prompt) + n_tokens + 1, device=device)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt], device=device), pos[:len(prompt)])[0, -1]
        nxt = logits.argmax().view(1, 1)
        for i in range(n_tokens):
            p = len(prompt) + i
            nxt = step.profiled_call(nxt, pos[p:p + 1], prof)[0, -1].argmax().view(1, 1)
    return prof


HOST_LABELS = {   # host timeline of the graphed step, in the order it is printed
    "launch": "graph launches (3 replays per layer)",
    "wait": "wait for x (GPU pre segment + D2H copy)",
    "cold_ffn": "cold FFN call (Numba, CPU)",
    "loop": "Python between layers",
    "profiling": "profiler's own events and counters",
    "first_last": "first + last graphs (embedding; norm + lm_head)",
    "tail_sync": "end-of-token sync (GPU tail)",
}
GPU_LABELS = {
    "pre": "pre: attention + predictor + D2H copies",
    "hot": "hot FFN",
    "idle_for_cpu": "idle: waiting for the CPU half",
    "post": "post: H2D copy of y_cold + residual",
    "gap": "gap: waiting for the next launch",
    "first_last": "first + last graphs",
}


def summarise_graphed_profile(raw: dict, firing=None, precision: float | None = None,
                              cpu_read_GBps: float | None = None, timed_ms: float | None = None) -> dict:
    """StepProfile.raw() (+ firing counts (L, 3): selected, gate-fired, active over the kept tokens) ->
    per-token ms and per-layer mean us of every host phase and GPU span, and the cold FFN's in-situ
    read rate. Bytes the cold FFN reads per layer: every selected neuron's gate row, plus its up row
    when the gate fires and its down row when the neuron is active; those two fractions are measured
    (`firing`) or, without it, the predictors' test precision (said in `fraction_source`)."""
    T, L = int(raw["tokens"]), int(raw["layers"])
    host = np.asarray(raw["host_s"], np.float64).reshape(T, L, -1)           # (T, L, phases) s
    gpu = np.asarray(raw["gpu_ms"], np.float64).reshape(T, L, -1)            # (T, L, spans) ms
    th = dict(zip(raw["token_host_cols"], np.asarray(raw["token_host_s"], np.float64).reshape(T, -1).T))
    tg = dict(zip(raw["token_gpu_cols"], np.asarray(raw["token_gpu_ms"], np.float64).reshape(T, -1).T))
    hp, gs = list(raw["host_phases"]), list(raw["gpu_spans"])
    n = max(T, 1)
    host_layer_us = {p: 1e6 * host[:, :, k].mean(axis=0) for k, p in enumerate(hp)}    # (L,) each
    gpu_layer_us = {s: 1e3 * gpu[:, :, k].mean(axis=0) for k, s in enumerate(gs)}
    host_ms = {p: 1e3 * host[:, :, k].sum() / n for k, p in enumerate(hp)}
    host_ms["first_last"] = 1e3 * (th["first"].sum() + th["last"].sum()) / n
    host_ms["tail_sync"] = 1e3 * th["tail_sync"].sum() / n
    gpu_ms = {s: gpu[:, :, k].sum() / n for k, s in enumerate(gs)}
    gpu_ms["first_last"] = (tg["first"].sum() + tg["last"].sum()) / n

    # cold FFN: selected neurons, what fires, bytes, rate
    sel = np.asarray(raw["cold_selected"], np.float64).reshape(T, L).mean(axis=0)     # (L,) per token
    row_bytes = np.asarray(raw["cold_row_bytes"], np.float64)
    n_cold = np.asarray(raw["n_cold"], np.int64)
    has_cold = n_cold > 0
    up_frac = np.zeros(L)
    down_frac = np.zeros(L)
    if firing is not None and np.asarray(firing)[:, 0].sum() > 0:
        f = np.asarray(firing, np.float64)
        tot = f[has_cold].sum(axis=0)
        up_all, down_all = tot[1] / max(tot[0], 1), tot[2] / max(tot[0], 1)
        up_frac = np.where(f[:, 0] > 0, f[:, 1] / np.maximum(f[:, 0], 1), up_all)
        down_frac = np.where(f[:, 0] > 0, f[:, 2] / np.maximum(f[:, 0], 1), down_all)
        source = (f"measured: gate . x recomputed on the host for the {int(raw.get('firing_tokens', T))} profiled "
                  "tokens (their cold FFN inputs kept during the pass)")
    elif precision is not None:
        up_frac[:], down_frac[:] = precision, precision
        up_all = down_all = precision
        source = f"estimated: the predictors' test precision {precision:.3f} (not measured in this pass)"
    else:
        up_frac[:], down_frac[:] = 1.0, 1.0
        up_all = down_all = 1.0
        source = "unknown: every selected neuron assumed to fire (an upper bound on the bytes)"
    cold_bytes = sel * row_bytes * (1 + up_frac + down_frac)                   # (L,) per token
    cold_s = host[:, :, hp.index("cold_ffn")].mean(axis=0)                      # (L,) per token
    gbps = np.where(cold_s > 0, cold_bytes / np.maximum(cold_s, 1e-12) / 1e9, 0.0)
    total_bytes, total_s = float(cold_bytes.sum()), float(cold_s.sum())
    cold = {
        "format": raw.get("cold_format"), "layers_with_cold_rows": int(has_cold.sum()),
        "cold_neurons_per_layer": float(n_cold[has_cold].mean()) if has_cold.any() else 0.0,
        "selected_per_token": float(sel.sum()),
        "selected_per_layer": float(sel[has_cold].mean()) if has_cold.any() else 0.0,
        "gate_fired_fraction": float(up_all), "active_fraction": float(down_all), "fraction_source": source,
        "rows_per_selected": float(total_bytes / max((sel * row_bytes).sum(), 1e-12)) if total_bytes else 0.0,
        "MB_per_token": total_bytes / 1e6, "ms_per_token": 1e3 * total_s,
        "GBps": total_bytes / total_s / 1e9 if total_s > 0 else None, "cpu_read_GBps": cpu_read_GBps,
    }
    wall = 1e3 * th["wall"].sum() / n
    return {
        "kind": "graphed", "tokens": T, "layers": L, "wall_ms": wall, "timed_ms_per_token": timed_ms,
        "host_timeline_ms": {k: host_ms[k] for k in HOST_LABELS},
        "gpu_timeline_ms": {k: gpu_ms[k] for k in GPU_LABELS}, "gpu_total_ms": float(tg["total"].sum() / n),
        "per_layer_mean_us": {"host": {p: float(v.mean()) for p, v in host_layer_us.items()},
                              "gpu": {s: float(v.mean()) for s, v in gpu_layer_us.items()}},
        "cold": cold,
        "per_layer": {"host_us": {p: v.round(2).tolist() for p, v in host_layer_us.items()},
                      "gpu_us": {s: v.round(2).tolist() for s, v in gpu_layer_us.items()},
                      "cold_selected": sel.round(2).tolist(), "n_cold": n_cold.tolist(),
                      "gate_fired_fraction": up_frac.round(4).tolist(), "active_fraction": down_frac.round(4).tolist(),
                      "cold_MB": (cold_bytes / 1e6).round(4).tolist(), "cold_GBps": gbps.round(2).tolist()},
    }


def format_graphed_profile(p: dict, layers_table: bool = False) -> str:
    """The graphed profile as text; layers_table adds one line per layer (the Markdown file has it)."""
    L = max(p["layers"], 1)
    wall = p["wall_ms"]
    timed = p.get("timed_ms_per_token")
    lines = [f"decode time breakdown, hybrid, CUDA-graphed step (the runtime's decode path): {p['tokens']} tokens "
             f"x {p['layers']} layers",
             f"  profiling pass {wall:.2f} ms/token" + (f" (timed runs: {timed:.2f} ms/token; the profiler's own work "
                                                        f"is {p['host_timeline_ms']['profiling']:.2f} ms/token)"
                                                        if timed else ""),
             f"  host, per token (adds up to the {wall:.2f} ms wall)        ms/token  share  per layer us"]
    def rows(labels: dict, timeline: dict, per_layer: dict, total: float) -> list[str]:
        """One line per phase: ms/token, share of `total`, mean us per layer ('-' where not per layer)."""
        return [f"    {label:<50} {timeline[k]:8.3f} {100 * timeline[k] / max(total, 1e-9):5.1f}%  "
                + (f"{per_layer[k]:9.1f}" if per_layer.get(k) is not None else f"{'-':>9}")
                for k, label in labels.items()]

    lines += rows(HOST_LABELS, p["host_timeline_ms"], p["per_layer_mean_us"]["host"], wall)
    g = p["gpu_total_ms"]
    lines.append(f"  GPU, per token (CUDA events between the replays; adds up to {g:.2f} ms)")
    lines += rows(GPU_LABELS, p["gpu_timeline_ms"], p["per_layer_mean_us"]["gpu"], g)
    c = p["cold"]
    if c["layers_with_cold_rows"]:
        rate = f"{c['GBps']:.1f} GB/s" if c.get("GBps") else "-"
        bw = (f" (CPU read bandwidth measured in this run: {c['cpu_read_GBps']:.1f} GB/s)"
              if c.get("cpu_read_GBps") else "")
        lines += [f"  cold FFN ({c['format']} rows, {c['layers_with_cold_rows']} layers): "
                  f"{c['selected_per_layer']:.0f} of {c['cold_neurons_per_layer']:.0f} cold neurons selected per "
                  "layer and token; of those "
                  f"{100 * c['gate_fired_fraction']:.1f}% fire (up row read), {100 * c['active_fraction']:.1f}% active "
                  f"(down row read)",
                  f"    fractions {c['fraction_source']}",
                  f"    {c['rows_per_selected']:.2f} rows per selected neuron -> {c['MB_per_token']:.1f} MB per "
                  "token in "
                  f"{c['ms_per_token']:.2f} ms of cold FFN calls = {rate} in situ{bw}"]
    else:
        lines.append("  no cold rows (every neuron on the GPU)")
    if layers_table:
        pl = p["per_layer"]
        lines.append("  per layer, us (host: launch, wait, cold FFN, loop | GPU: pre, hot, idle, post, gap) "
                     "| cold selected, fired %, MB, GB/s")
        for i in range(L):
            h = [pl["host_us"][k][i] for k in ("launch", "wait", "cold_ffn", "loop")]
            gg = [pl["gpu_us"][k][i] for k in ("pre", "hot", "idle_for_cpu", "post", "gap")]
            lines.append(f"    {i:3d}  " + " ".join(f"{v:7.1f}" for v in h) + "  |" + " ".join(f"{v:7.1f}" for v in gg)
                         + f"  | {pl['cold_selected'][i]:7.1f} {100 * pl['gate_fired_fraction'][i]:5.1f} "
                           f"{pl['cold_MB'][i]:7.3f} {pl['cold_GBps'][i]:6.1f}")
    return "\n".join(lines)


def format_any_profile(p: dict, layers_table: bool = False) -> str:
    return format_graphed_profile(p, layers_table) if p.get("kind") == "graphed" else format_profile(p)
