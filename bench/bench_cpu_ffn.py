"""Cold-neuron CPU FFN kernel: GB/s over the active rows vs the machine's read bandwidth.

LLaMA-2-7B shape by default (d=4096, 7500 cold neurons per layer of 11008), weights for as
many layers as make ~1 GB per format (larger than any L3), one call per layer in rotation, a
fresh x and active set per layer. The active set holds neurons whose gate fires for that x
(exact mode: every active row costs its gate, up and down rows), so the bytes per call are
n_active * 3 * row_bytes. `--superset 2` adds as many non-firing rows (a predictor that
over-predicts 2x: those cost their gate row only) and counts the bytes actually read.

The roof is a Numba parallel sum over a 1 GB fp32 buffer with the same thread count.

    python bench/bench_cpu_ffn.py                       # all formats, Numba's default threads
    python bench/bench_cpu_ffn.py --threads 16 --json bench/results/<device>-<date>-cold-kernel.json
"""
from __future__ import annotations

import json
import os
import platform
import time

import click
import numba
import numpy as np
from numba import njit, prange

from hybrid_runtime import cpu_ffn as cpu_ffn_module
from hybrid_runtime.cpu_ffn import (BLOCK_FORMATS, FMT_INT8, ColdFFN, ColdRows, _add_into, _axpy_rows, _combine, _dot_rows,
                                    _gate_act, _w, cold_ffn_ref)


@njit(fastmath=True, cache=True)
def _sum(buf):
    s = np.float32(0.0)
    for j in range(buf.shape[0]):  # from 0: no negative-index wraparound, so LLVM vectorises
        s += buf[j]
    return s


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _parallel_sum(buf, n_chunks):
    """Read roof: sum a large fp32 buffer with every thread (one contiguous chunk each)."""
    n = buf.shape[0]
    per = (n + n_chunks - 1) // n_chunks
    partial = np.zeros(n_chunks, np.float32)
    for c in prange(n_chunks):
        partial[c] = _sum(buf[c * per:min(n, (c + 1) * per)])
    return partial.sum()


# An eight-rows-at-a-time variant of the decode kernel (the runtime reads four rows at a time), kept to
# measure the two against each other (`--compare-8way`). Dev VM (2 threads, 4 GB pool): equal at the runtime's
# 8 GiB active-set shape (30.0 vs 30.4 GB/s), eight faster only with 48 rows per call
# (bench/results/cpu-2026-11-23-cold-kernel-8way-ab.txt); H100 host (16 threads, 6 GB pool, 2026-11-23): four won, 68.3 vs 65.6
# GB/s median.

@njit
def _dot_row8(w0, w1, w2, w3, w4, w5, w6, w7, fmt, x):
    """Eight rows dotted with x in one pass: eight memory streams in flight. Random 8 KB rows from
    DRAM (2-core dev VM, fp16 gate pass over a 2.9 GB pool): 1 stream 18 GB/s, 4 streams 32, 8 streams
    38, 12 streams 35, 16 streams 30 (register spills)."""
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    a4 = np.float32(0.0)
    a5 = np.float32(0.0)
    a6 = np.float32(0.0)
    a7 = np.float32(0.0)
    for j in range(x.shape[0]):
        xj = x[j]
        a0 += _w(w0, j, fmt) * xj
        a1 += _w(w1, j, fmt) * xj
        a2 += _w(w2, j, fmt) * xj
        a3 += _w(w3, j, fmt) * xj
        a4 += _w(w4, j, fmt) * xj
        a5 += _w(w5, j, fmt) * xj
        a6 += _w(w6, j, fmt) * xj
        a7 += _w(w7, j, fmt) * xj
    return a0, a1, a2, a3, a4, a5, a6, a7


@njit
def _axpy_row8(a0, w0, a1, w1, a2, w2, a3, w3, a4, w4, a5, w5, a6, w6, a7, w7, fmt, out):
    """out += sum_k a_k * w_k over eight rows: eight streams, one read-modify-write of out."""
    for j in range(out.shape[0]):
        out[j] += ((a0 * _w(w0, j, fmt) + a1 * _w(w1, j, fmt)) + (a2 * _w(w2, j, fmt) + a3 * _w(w3, j, fmt))) + \
            ((a4 * _w(w4, j, fmt) + a5 * _w(w5, j, fmt)) + (a6 * _w(w6, j, fmt) + a7 * _w(w7, j, fmt)))


@njit
def _dot_rows_8way(w, scales, fmt, rows, x, out):
    """out[i] = (w[rows[i]] . x) * scale[rows[i]], eight rows at a time; the tail by the runtime's _dot_rows."""
    n = rows.shape[0]
    n8 = n - n % 8
    for i in range(0, n8, 8):
        out[i], out[i + 1], out[i + 2], out[i + 3], out[i + 4], out[i + 5], out[i + 6], out[i + 7] = _dot_row8(
            w[rows[i]], w[rows[i + 1]], w[rows[i + 2]], w[rows[i + 3]],
            w[rows[i + 4]], w[rows[i + 5]], w[rows[i + 6]], w[rows[i + 7]], fmt, x)
    if fmt == FMT_INT8:
        for i in range(n8):
            out[i] *= scales[rows[i]]
    _dot_rows(w, scales, fmt, rows[n8:], x, out[n8:])


@njit
def _axpy_rows_8way(w, scales, fmt, rows, a, out):
    """out += sum_i a[i] * scale[rows[i]] * w[rows[i]], eight rows at a time; the tail by the runtime's _axpy_rows."""
    n = rows.shape[0]
    n8 = n - n % 8
    if fmt == FMT_INT8:
        for i in range(n8):
            a[i] *= scales[rows[i]]
    for i in range(0, n8, 8):
        _axpy_row8(a[i], w[rows[i]], a[i + 1], w[rows[i + 1]], a[i + 2], w[rows[i + 2]], a[i + 3], w[rows[i + 3]],
                   a[i + 4], w[rows[i + 4]], a[i + 5], w[rows[i + 5]], a[i + 6], w[rows[i + 6]],
                   a[i + 7], w[rows[i + 7]], fmt, out)
    _axpy_rows(w, scales, fmt, rows[n8:], a[n8:], out)   # scales its own part of a


@njit
def _sparse_ffn_rows_8way(gate, up, down, gate_scale, up_scale, down_scale, fmt, x, rows, act, threshold, out):
    n = rows.shape[0]
    a = np.empty(n, np.float32)
    live = np.empty(n, np.int64)
    _dot_rows_8way(gate, gate_scale, fmt, rows, x, a)
    n_live = 0
    for i in range(n):
        ga = _gate_act(a[i], act, threshold)
        if ga != 0:
            live[n_live] = rows[i]
            a[n_live] = ga
            n_live += 1
    u = np.empty(n_live, np.float32)
    _dot_rows_8way(up, up_scale, fmt, live[:n_live], x, u)
    n_out = 0
    for i in range(n_live):
        ai = _combine(a[i], u[i], act, threshold)
        if ai != 0:
            live[n_out] = live[i]
            a[n_out] = ai
            n_out += 1
    _axpy_rows_8way(down, down_scale, fmt, live[:n_out], a[:n_out], out)


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def _decode_kernel_8way(gate, up, down, gate_scale, up_scale, down_scale, fmt,
                        x, active, act, threshold, partial, y):
    d = x.shape[0]
    n_active = active.shape[0]
    n_used = min(partial.shape[0], n_active)
    for c in prange(n_used):
        buf = partial[c]
        buf[:] = 0.0
        _sparse_ffn_rows_8way(gate, up, down, gate_scale, up_scale, down_scale, fmt, x,
                              active[c:n_active:n_used], act, threshold, buf)
    block = 256
    for b in prange((d + block - 1) // block):
        j0 = b * block
        j1 = min(d, j0 + block)
        yb = y[j0:j1]
        yb[:] = 0.0
        for c in range(n_used):
            _add_into(yb, partial[c, j0:j1])


class EightWayColdFFN(ColdFFN):
    def decode(self, x: np.ndarray, active: np.ndarray, out: np.ndarray) -> np.ndarray:
        _decode_kernel_8way(*self._args, x, active, self._act, self._threshold, self._partial, out)
        return out


def _spin(seconds: float) -> None:
    t = time.perf_counter() + seconds
    while time.perf_counter() < t:
        pass


def read_bandwidth(nbytes: int, repeats: int) -> float:
    buf = np.ones(nbytes // 4, np.float32)
    n_threads = numba.get_num_threads()
    _parallel_sum(buf[:1024], n_threads)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _parallel_sum(buf, n_threads)
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9


def make_layer(fmt: str, n_cold: int, d: int, rng: np.random.Generator) -> ColdRows:
    """Random weights of realistic magnitude (~1e-3..1e-2), built straight from random bits (fast)."""
    def bits(mask: int, base: int) -> np.ndarray:  # random sign, mantissa and low exponent bits
        return (np.frombuffer(rng.bytes(n_cold * d * 2), np.uint16).reshape(n_cold, d) & mask) | base

    if fmt == "bf16":
        g, u, dn = (bits(0x81FF, 0x3A00) for _ in range(3))
        scales = [np.zeros(0, np.float32)] * 3
    elif fmt == "fp16":
        g, u, dn = (bits(0x87FF, 0x1800) for _ in range(3))
        scales = [np.zeros(0, np.float32)] * 3
    elif fmt in BLOCK_FORMATS:   # random codes; every block's fp16 scale (and Q4_1 min) of the same magnitude
        from hybrid_runtime.quant import BLOCK, BLOCK_BYTES
        bb = BLOCK_BYTES[fmt]
        step = np.frombuffer(np.float16(0.02 / (127 if fmt == "q8_0" else 8)).tobytes(), np.uint8)
        offset = np.frombuffer(np.float16(-0.02).tobytes(), np.uint8)

        def blocks() -> np.ndarray:
            a = np.frombuffer(rng.bytes(n_cold * d // BLOCK * bb), np.uint8).reshape(n_cold, d // BLOCK, bb).copy()
            a[:, :, 0:2] = step
            if fmt == "q4_1":
                a[:, :, 2:4] = offset
            return a.reshape(n_cold, -1)
        g, u, dn = blocks(), blocks(), blocks()
        scales = [np.zeros(0, np.float32)] * 3
    else:
        g, u, dn = (np.frombuffer(rng.bytes(n_cold * d), np.int8).reshape(n_cold, d).copy() for _ in range(3))
        scales = [np.full(n_cold, 0.02 / 127, np.float32) for _ in range(3)]
    return ColdRows(fmt, g, u, dn, *scales)


def pick_active(cold: ColdRows, x: np.ndarray, n_fire: int, n_dead: int, rng: np.random.Generator,
                skewed: bool = False) -> np.ndarray:
    """n_fire rows whose gate fires for x (relu) plus n_dead rows whose gate does not, sorted.

    skewed: the firing rows are the lowest-index candidates and the non-firing ones the highest,
    like the runtime's cold rows (stored most-frequent-first: predicted rows near the front fire
    more often than those near the end)."""
    cand = np.sort(rng.permutation(cold.n_rows)[: 4 * (n_fire + n_dead)]) if skewed \
        else rng.permutation(cold.n_rows)[: 4 * (n_fire + n_dead)]
    g = cold.dequantize(cand)[0] @ x
    fire, dead = cand[g > 0], cand[g <= 0]
    fire, dead = (fire[:n_fire], dead[len(dead) - n_dead:]) if skewed else (fire[:n_fire], dead[:n_dead])
    assert len(fire) == n_fire and len(dead) == n_dead, "not enough candidate rows"
    return np.sort(np.concatenate([fire, dead])).astype(np.int32)


def bench_format(fmt: str, d: int, n_cold: int, total_bytes: int, active_frac: float, superset: float,
                 seconds: float, check: bool, rng: np.random.Generator, skewed: bool = False,
                 gap_us: float = 0.0, eight_way: bool = False) -> dict:
    probe = make_layer(fmt, 8, d, rng)
    n_layers = max(2, -(-total_bytes // (3 * n_cold * probe.row_bytes)))
    layers = [make_layer(fmt, n_cold, d, rng) for i in range(n_layers)]
    n_fire = int(round(active_frac * n_cold))
    n_dead = int(round((superset - 1.0) * n_fire))
    xs = [rng.standard_normal(d).astype(np.float32) for _ in layers]
    actives = [pick_active(c, x, n_fire, n_dead, rng, skewed) for c, x in zip(layers, xs)]
    ffns = [(EightWayColdFFN if eight_way else ColdFFN)(c, "relu") for c in layers]
    out = np.empty(d, np.float32)
    if check:  # the benchmark measures a correct kernel
        ref = cold_ffn_ref(layers[0], xs[0], actives[0], "relu")
        got = ffns[0].decode(xs[0], actives[0], out)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        tol = 2e-2 if fmt in BLOCK_FORMATS else 1e-4   # block kernels round x to int8 per block (llama.cpp's way)
        assert err < tol, f"{fmt}: kernel differs from the reference (rel err {err:.2e})"
    for i in range(n_layers):  # warm-up (compile is cached; first-touch the workspace)
        ffns[i].decode(xs[i], actives[i], out)
    bytes_per_call = (n_fire * 3 + n_dead) * layers[0].row_bytes
    calls, t0 = 0, time.perf_counter()
    times = []
    while time.perf_counter() - t0 < seconds:
        i = calls % n_layers
        if gap_us:
            _spin(gap_us * 1e-6)   # the host waiting for the GPU between two layers' cold FFNs
        t = time.perf_counter()
        ffns[i].decode(xs[i], actives[i], out)
        times.append(time.perf_counter() - t)
        calls += 1
    times = np.array(times)
    return {
        "fmt": fmt, "kernel": "8-way" if eight_way else "4-way", "skewed": skewed, "gap_us": gap_us,
        "layers": n_layers, "weights_gb": n_layers * layers[0].nbytes / 1e9,
        "n_cold": n_cold, "n_fire": n_fire, "n_dead": n_dead, "calls": calls,
        "bytes_per_call_mb": bytes_per_call / 1e6,
        "median_us": float(np.median(times) * 1e6),
        "gbps_median": bytes_per_call / float(np.median(times)) / 1e9,
        "gbps_mean": bytes_per_call * calls / float(times.sum()) / 1e9,
        "gbps_p10": bytes_per_call / float(np.percentile(times, 10)) / 1e9,   # best decile: noisy hosts
    }


def bench_batch(fmt: str, d: int, n_cold: int, T: int, active_frac: float, rng: np.random.Generator) -> dict:
    cold = make_layer(fmt, n_cold, d, rng)
    x = rng.standard_normal((T, d)).astype(np.float32)
    active = np.sort(rng.permutation(n_cold)[: int(active_frac * n_cold)]).astype(np.int32)
    ffn, out = ColdFFN(cold, "relu"), np.empty((T, d), np.float32)
    ffn.batch(x, active, out)
    reps, t0 = 3, time.perf_counter()
    for _ in range(reps):
        ffn.batch(x, active, out)
    dt = (time.perf_counter() - t0) / reps
    return {"fmt": fmt, "T": T, "n_active": len(active), "ms": dt * 1e3,
            "gflops": 3 * 2 * T * len(active) * d / dt / 1e9}  # dense over the union rows (as computed)


@click.command()
@click.option("--formats", default="bf16,fp16,int8", show_default=True, help="also q8_0, q4_0, q4_1 (block rows)")
@click.option("--dim", default=4096, show_default=True)
@click.option("--n-cold", default=7500, show_default=True, help="cold neurons per layer")
@click.option("--total-gb", default=1.0, show_default=True, help="weights per format, rotated over layers")
@click.option("--active-frac", default=0.10, show_default=True, help="firing rows per call / n_cold")
@click.option("--superset", default=1.0, show_default=True, help="active set / firing rows (predictor over-prediction)")
@click.option("--seconds", default=2.0, show_default=True, help="timed seconds per format")
@click.option("--threads", default=0, help="numba threads (0: Numba's default)")
@click.option("--batch-tokens", default=32, show_default=True,
              help="also time the prefill kernel at T tokens over a 3x larger union set (0: skip)")
@click.option("--skewed", is_flag=True,
              help="firing rows at the front of the active list, non-firing at the end (frequency-sorted rows)")
@click.option("--gap-us", default=0.0, show_default=True,
              help="host spins this long between calls (the runtime's wait for the GPU between layers)")
@click.option("--compare-8way", is_flag=True, help="also time the eight-rows-at-a-time variant")
@click.option("--json", "json_path", default=None, help="write the results here")
def main(formats, dim, n_cold, total_gb, active_frac, superset, seconds, threads, batch_tokens, skewed, gap_us,
         compare_8way, json_path):
    if threads:
        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise click.BadParameter(f"must be in [1, {numba.config.NUMBA_NUM_THREADS}]", param_hint="--threads")
        numba.set_num_threads(threads)
    rng = np.random.default_rng(0)
    n_threads = numba.get_num_threads()
    roof = read_bandwidth(int(total_gb * 1e9), repeats=5)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numba threads {n_threads} ({numba.threading_layer() if hasattr(numba, 'threading_layer') else ''})")
    print(f"read roof (parallel sum of {total_gb:.1f} GB fp32): {roof:.1f} GB/s")
    rows = []
    variants = [False, True] if compare_8way else [False]
    for fmt, eight_way in ((f, b) for f in formats.split(",") for b in variants):
        r = bench_format(fmt, dim, n_cold, int(total_gb * 1e9), active_frac, superset, seconds, True, rng,
                         skewed, gap_us, eight_way)
        r["roof_frac"] = r["gbps_median"] / roof
        rows.append(r)
        print(f"{fmt:5s} {r['kernel']:7s} {r['layers']:2d} layers {r['weights_gb']:.2f} GB | active {r['n_fire']} fire "
              f"+ {r['n_dead']} dead rows = {r['bytes_per_call_mb']:.1f} MB/call | "
              f"{r['median_us']:7.0f} us/call | {r['gbps_median']:5.1f} GB/s (mean {r['gbps_mean']:.1f}, "
              f"best decile {r['gbps_p10']:.1f}) "
              f"= {100 * r['roof_frac']:.0f}% of roof")
    roof_after = read_bandwidth(int(total_gb * 1e9), repeats=5)
    print(f"read roof again after the kernels: {roof_after:.1f} GB/s")
    batch = []
    if batch_tokens:
        for fmt in formats.split(","):
            b = bench_batch(fmt, dim, n_cold, batch_tokens, active_frac * 3, rng)
            batch.append(b)
            print(f"batch {fmt:5s} T={b['T']} n_active={b['n_active']}: {b['ms']:.1f} ms "
                  f"({b['gflops']:.0f} GFLOP/s)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"threads": n_threads, "threading_layer": numba.threading_layer(),
                   "f16c": cpu_ffn_module.HAS_F16C, "roof_gbps": roof, "roof_after_gbps": roof_after,
                       "decode": rows, "batch": batch}, f, indent=1)
        print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
