"""GPU sparse FFN kernels vs the dense FFN (cuBLAS through torch), batch 1, on one layer's shape.

LLaMA-2-7B (d=4096, f=11008) and 13B (d=5120, f=13824), bf16 and fp16. The activation is FATReLU
with its threshold at the 89th percentile of the gate pre-activations, so ~11% of neurons fire
(ProSparse-like sparsity) on random weights. Variants, one FFN call each:
  dense          F.linear(x, gate), F.linear(x, up), act, a @ down  (the engine's dense FFN)
  exact_fused    (a) dense_gate_sparse_ffn: all gate rows, up/down rows of firing neurons only
  exact_cublas   (a') cuBLAS gate GEMV + active_indices + sparse_up_given_gate + sparse_down
  pred           (b) active_indices(predictor logits) + sparse_ffn; the logits select exactly the
                 firing neurons (a perfect predictor: every selected row costs gate, up and down)
  pred_2x        (b) as pred with a predictor that over-predicts 2x (half the selected neurons
                 do not fire: their up and down rows are skipped, their gate rows are read)
and single kernels (dense gate GEMV, active_indices, sparse_gate_up, sparse_down).

Timing: each variant's calls rotate over --sets weight sets and --inputs inputs per set (fresh
x and active set per call), so the weights touched per replay far exceed the L2 cache; the
rotation is captured in one CUDA graph (decode runs graphed) and replayed; per-call time =
replay time / calls, median over replays, timed with CUDA events. Eager (no graph) medians are
reported too. GB/s counts the bytes each call must read at least (rows touched x row bytes) and
is compared with a device-to-device copy measured in the same run (bytes read + written).

    python bench/bench_kernels.py --out bench/results/
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from hybrid_runtime import kernels as K
from hybrid_runtime.activations import Activation

SHAPES = {"7b": (4096, 11008), "13b": (5120, 13824)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ACT = "fatrelu"


@dataclass
class Row:
    shape: str
    dtype: str
    variant: str
    us_graph: float       # median per-call time, CUDA graph replay
    us_eager: float       # median per-call time, eager launches
    spread_pct: float     # (p90 - p10) / median of the graph timings
    mbytes: float         # least bytes per call (MB)
    gbps: float           # mbytes / us_graph
    pct_copy_bw: float    # gbps / measured copy bandwidth
    floor_us: float       # mbytes / copy bandwidth
    speedup: float        # dense us_graph / us_graph (0 for single kernels)


def median_event_ms(fn, replays: int, warmup: int = 3) -> tuple[float, float]:
    """Median and (p90 - p10)/median of fn()'s time in ms, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    med = statistics.median(times)
    p10, p90 = times[int(0.1 * (len(times) - 1))], times[int(0.9 * (len(times) - 1))]
    return med, (p90 - p10) / med * 100


def copy_bandwidth_gbps(replays: int) -> float:
    """Device-to-device copy of 1 GiB of random bf16, counting bytes read + written."""
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms, _ = median_event_ms(lambda: dst.copy_(src), replays)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / (ms * 1e-3) / 1e9


def time_calls(calls: list, replays: int) -> tuple[float, float, float]:
    """Per-call median time in us: (graph, eager, graph spread %). `calls` are closures."""
    def run_all():
        for c in calls:
            c()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run_all()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    ms_graph, spread = median_event_ms(graph.replay, replays)
    ms_eager, _ = median_event_ms(run_all, max(5, replays // 2))
    del graph
    n = len(calls)
    return ms_graph * 1e3 / n, ms_eager * 1e3 / n, spread


def bench_shape(shape: str, dtype_name: str, sparsity: float, n_sets: int, n_inputs: int, replays: int,
                copy_gbps: float, log) -> tuple[list[Row], dict]:
    d, f = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    row_bytes = d * torch.finfo(dtype).bits // 8
    gen = torch.Generator(device="cuda").manual_seed(1234)

    def randn(*size):
        return torch.randn(*size, device="cuda", generator=gen)

    sets = [tuple((randn(f, d) * d ** -0.5).to(dtype) for _ in range(3)) for _ in range(n_sets)]
    # one threshold per set: the gate pre-activations' (sparsity) quantile on a calibration input
    thresholds = [float(F.linear(randn(1, d).to(dtype), s[0]).float().quantile(sparsity)) for s in sets]

    # per call: (set, x, predictor logits exact, logits 2x, n_fire)
    calls = []
    for k in range(n_sets * n_inputs):
        s = k % n_sets
        gate, up, down = sets[s]
        x = randn(1, d).to(dtype)
        g = F.linear(x, gate).float()  # (1, f)
        fire = (g >= thresholds[s])[0]  # (f,)
        n_fire = int(fire.sum())
        logits = torch.where(fire, 1.0, -1.0)[None].to(dtype)  # selects exactly the firing neurons
        extra = (~fire).nonzero().flatten()
        extra = extra[torch.randperm(len(extra), device="cuda", generator=gen)[:n_fire]]
        logits_2x = logits.clone()
        logits_2x[0, extra] = 1.0
        calls.append(dict(set=s, x=x, logits=logits, logits_2x=logits_2x, n_fire=n_fire, n_2x=2 * n_fire))
    mean_fire = sum(c["n_fire"] for c in calls) / len(calls)
    mean_2x = sum(c["n_2x"] for c in calls) / len(calls)

    # correctness of what we time: the sparse paths against the dense FFN on one call
    c0 = calls[0]
    gate, up, down = sets[c0["set"]]
    thr0 = thresholds[c0["set"]]
    y_dense = Activation(ACT, thr0)(F.linear(c0["x"].float(), gate.float()),
                                    F.linear(c0["x"].float(), up.float())) @ down.float()
    checks = {}
    y_exact = K.dense_gate_sparse_ffn(c0["x"], gate, up, down, ACT, thr0)
    checks["exact_fused_rel_err"] = ((y_exact.float() - y_dense).norm() / y_dense.norm()).item()
    idx, count = K.active_indices(c0["logits"], 0.0)
    y_pred = K.sparse_ffn(c0["x"], gate, up, down, idx, count, ACT, thr0)
    checks["pred_rel_err"] = ((y_pred.float() - y_dense).norm() / y_dense.norm()).item()
    idx2, count2 = K.active_indices(c0["logits_2x"], 0.0)
    y_pred2 = K.sparse_ffn(c0["x"], gate, up, down, idx2, count2, ACT, thr0)
    checks["pred_2x_rel_err"] = ((y_pred2.float() - y_dense).norm() / y_dense.norm()).item()

    def closures(make):
        return [make(k, c, *sets[c["set"]], thresholds[c["set"]]) for k, c in enumerate(calls)]

    def dense(k, c, gate, up, down, thr):
        act = Activation(ACT, thr)
        return lambda: act(F.linear(c["x"], gate), F.linear(c["x"], up)) @ down

    def exact_fused(k, c, gate, up, down, thr):
        return lambda: K.dense_gate_sparse_ffn(c["x"], gate, up, down, ACT, thr)

    def exact_cublas(k, c, gate, up, down, thr):
        def run():
            g = F.linear(c["x"], gate)  # (1, f)
            idx, count = K.active_indices(g, thr, inclusive=True)
            a = K.sparse_up_given_gate(c["x"], g, up, idx, count, ACT, thr)
            return K.sparse_down(a, down, idx, count)
        return run

    def pred(key):
        def make(k, c, gate, up, down, thr):
            def run():
                idx, count = K.active_indices(c[key], 0.0)
                return K.sparse_ffn(c["x"], gate, up, down, idx, count, ACT, thr)
            return run
        return make

    # single kernels (indices and activations prepared outside the timed region)
    prepared = []
    for c in calls:
        gate, up, down = sets[c["set"]]
        thr = thresholds[c["set"]]
        idx, count = K.active_indices(c["logits"], 0.0)
        a = K.sparse_gate_up(c["x"], gate, up, idx, count, ACT, thr)
        prepared.append((idx, count, a))

    def k_gemv(k, c, gate, up, down, thr):
        return lambda: F.linear(c["x"], gate)

    def k_dense_gate_sparse_up(k, c, gate, up, down, thr):
        return lambda: K.dense_gate_sparse_up(c["x"], gate, up, ACT, thr)

    def k_active_indices(k, c, gate, up, down, thr):
        return lambda: K.active_indices(c["logits"], 0.0)

    def k_sparse_gate_up(k, c, gate, up, down, thr):
        idx, count, _ = prepared[k]
        return lambda: K.sparse_gate_up(c["x"], gate, up, idx, count, ACT, thr)

    def k_sparse_down(k, c, gate, up, down, thr):
        idx, count, a = prepared[k]
        return lambda: K.sparse_down(a, down, idx, count)

    mb = row_bytes / 1e6
    variants = [  # name, closure factory, least MB per call, is a whole FFN
        ("dense", dense, 3 * f * mb, True),
        ("exact_fused", exact_fused, (f + 2 * mean_fire) * mb, True),
        ("exact_cublas", exact_cublas, (f + 2 * mean_fire) * mb, True),
        ("pred", pred("logits"), 3 * mean_fire * mb, True),
        ("pred_2x", pred("logits_2x"), (mean_2x + 2 * mean_fire) * mb, True),
        ("k_gate_gemv", k_gemv, f * mb, False),
        ("k_dense_gate_sparse_up", k_dense_gate_sparse_up, (f + mean_fire) * mb, False),
        ("k_active_indices", k_active_indices, f * 2 / 1e6, False),
        ("k_sparse_gate_up", k_sparse_gate_up, 2 * mean_fire * mb, False),
        ("k_sparse_down", k_sparse_down, mean_fire * mb, False),
    ]
    rows: list[Row] = []
    dense_us = None
    for name, make, mbytes, whole in variants:
        t0 = time.perf_counter()
        us_graph, us_eager, spread = time_calls(closures(make), replays)
        if name == "dense":
            dense_us = us_graph
        gbps = mbytes * 1e6 / (us_graph * 1e-6) / 1e9
        rows.append(Row(shape, dtype_name, name, round(us_graph, 2), round(us_eager, 2), round(spread, 1),
                        round(mbytes, 2), round(gbps, 1), round(100 * gbps / copy_gbps, 1),
                        round(mbytes * 1e6 / (copy_gbps * 1e9) * 1e6, 2),
                        round(dense_us / us_graph, 2) if whole else 0.0))
        log(f"  {shape} {dtype_name} {name:24s} {us_graph:9.2f} us (eager {us_eager:9.2f})  "
            f"{gbps:7.1f} GB/s  [{time.perf_counter() - t0:.1f} s]")
    meta = dict(shape=shape, dtype=dtype_name, d=d, f=f, sets=n_sets, inputs_per_set=n_inputs,
                mean_active=round(mean_fire, 1), mean_active_frac=round(mean_fire / f, 4),
                mean_selected_2x=round(mean_2x, 1), weights_mb_per_replay=round(n_sets * 3 * f * mb, 1),
                **{k: round(v, 6) for k, v in checks.items()})
    del sets, calls, prepared
    torch.cuda.empty_cache()
    return rows, meta


def markdown(rows: list[Row], device: dict, copy_gbps: float, metas: list[dict]) -> str:
    lines = [f"# Sparse FFN kernels on {device['name']}", "",
             f"- copy bandwidth (device-to-device, read + write): **{copy_gbps:.0f} GB/s**; "
             f"L2 {device['l2_mb']:.0f} MB, {device['sms']} SMs; torch {device['torch']}, CUDA {device['cuda']}",
             f"- backend: {device['kernels']}", ""]
    for m in metas:
        lines.append(f"- {m['shape']} {m['dtype']}: d={m['d']} f={m['f']}, {m['mean_active']:.0f} neurons "
                     f"fire per token ({100 * m['mean_active_frac']:.1f}%); weights touched per replay "
                     f"{m['weights_mb_per_replay']:.0f} MB; rel. error vs dense: exact_fused "
                     f"{m['exact_fused_rel_err']:.1e}, pred {m['pred_rel_err']:.1e}, pred_2x {m['pred_2x_rel_err']:.1e}")
    lines += ["", "| shape | dtype | variant | µs (graph) | µs (eager) | spread % | MB | GB/s | % copy BW "
              "| floor µs | speedup vs dense |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.shape} | {r.dtype} | {r.variant} | {r.us_graph:.2f} | {r.us_eager:.2f} | "
                     f"{r.spread_pct:.1f} | {r.mbytes:.2f} | {r.gbps:.0f} | {r.pct_copy_bw:.0f} | "
                     f"{r.floor_us:.2f} | {r.speedup:.2f}{'x' if r.speedup else ''} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="bench/results", show_default=True,
              help="Directory for kernels_<gpu>.json and .md.")
@click.option("--shapes", default="7b,13b", show_default=True)
@click.option("--dtypes", default="bf16,fp16", show_default=True)
@click.option("--sparsity", default=0.89, show_default=True, help="Fraction of neurons that do not fire.")
@click.option("--sets", "n_sets", default=3, show_default=True, help="Weight sets rotated per replay.")
@click.option("--inputs", "n_inputs", default=8, show_default=True, help="Inputs (x, active set) per weight set.")
@click.option("--replays", default=30, show_default=True, help="Timed graph replays per variant.")
@click.option("--force", is_flag=True, help="Overwrite existing result files.")
def main(out: str, shapes: str, dtypes: str, sparsity: float, n_sets: int, n_inputs: int, replays: int,
         force: bool) -> None:
    if not torch.cuda.is_available():
        raise click.ClickException("needs a CUDA GPU")
    status = K.kernel_status()
    if not status.startswith("CUDA kernels"):
        raise click.ClickException(f"the CUDA kernels are not in use ({status})")
    shape_list = [s.strip() for s in shapes.split(",") if s.strip()]
    dtype_list = [s.strip() for s in dtypes.split(",") if s.strip()]
    for s in shape_list:
        if s not in SHAPES:
            raise click.BadParameter(f"unknown shape {s!r} (choose from {', '.join(SHAPES)})", param_hint="--shapes")
    for s in dtype_list:
        if s not in DTYPES:
            raise click.BadParameter(f"unknown dtype {s!r} (choose from {', '.join(DTYPES)})", param_hint="--dtypes")
    props = torch.cuda.get_device_properties(0)
    slug = "".join(c if c.isalnum() else "_" for c in props.name.lower()).strip("_")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"kernels_{slug}.json", out_dir / f"kernels_{slug}.md"
    for p in (json_path, md_path):
        if p.exists() and not force:
            raise click.ClickException(f"{p}: exists (use --force to overwrite)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = dict(name=props.name, sms=props.multi_processor_count,
                  l2_mb=getattr(props, "L2_cache_size", 0) / 2**20, memory_gb=round(props.total_memory / 2**30, 1),
                  torch=torch.__version__, cuda=torch.version.cuda, kernels=status)
    copy_gbps = copy_bandwidth_gbps(replays)
    log(f"{props.name}: copy bandwidth {copy_gbps:.0f} GB/s (read + write); kernels: {status}")
    rows, metas = [], []
    for shape in shape_list:
        for dt in dtype_list:
            r, m = bench_shape(shape, dt, sparsity, n_sets, n_inputs, replays, copy_gbps, log)
            rows += r
            metas.append(m)
    copy_after = copy_bandwidth_gbps(replays)  # the card's state should not have moved
    result = dict(device=device, copy_gbps=round(copy_gbps, 1), copy_gbps_after=round(copy_after, 1),
                  sparsity=sparsity, act=ACT, replays=replays, seconds=round(time.perf_counter() - t_start, 1),
                  configs=metas, rows=[asdict(r) for r in rows])
    json_path.write_text(json.dumps(result, indent=1))
    md = markdown(rows, device, copy_gbps, metas)
    md_path.write_text(md)
    print(md)
    print(f"wrote {json_path} and {md_path} in {result['seconds']:.0f} s "
          f"(copy bandwidth before/after: {copy_gbps:.0f}/{copy_after:.0f} GB/s)")


if __name__ == "__main__":
    main()
