"""Physical limits: bandwidths measured in the run, the bytes a decode token must read, memory counters."""
from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.options import GiB

# --------------------------------------------------------------------------------------- memory


def _proc_status(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def free_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------- bandwidths

try:
    from numba import njit, prange

    @njit(parallel=True, nogil=True, cache=True, fastmath=True)
    def _parallel_sum(a):
        s = np.float32(0.0)
        for i in prange(a.shape[0]):
            s += a[i]
        return s
except ImportError:  # numba is a dependency; keep the module importable for --help
    _parallel_sum = None


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu_read_bw(nbytes: int) -> float:
    """GB/s of a multi-threaded (Numba) read of a float32 buffer of nbytes (random data)."""
    a = torch.rand(nbytes // 4).numpy()
    _parallel_sum(a[:1024])
    return nbytes / _best_of(lambda: _parallel_sum(a), 5) / 1e9


def measure_gpu_bw(nbytes: int) -> dict:
    """Device-to-device copy (bytes read + written) and pinned host<->device copies, GB/s."""
    dev = torch.device("cuda")
    src = torch.rand(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    host = torch.empty(nbytes // 4 // 2, pin_memory=True).uniform_()
    dev_half = torch.empty(host.numel(), device=dev)

    def timed(fn, iters: int) -> float:
        fn()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(iters):
            fn()
        e1.record()
        torch.cuda.synchronize()
        return e0.elapsed_time(e1) / 1e3 / iters

    d2d = 2 * nbytes / timed(lambda: dst.copy_(src), 20) / 1e9
    h2d = host.numel() * 4 / timed(lambda: dev_half.copy_(host, non_blocking=True), 10) / 1e9
    d2h = host.numel() * 4 / timed(lambda: host.copy_(dev_half, non_blocking=True), 10) / 1e9
    return {"gpu_copy_GBps": d2d, "h2d_GBps": h2d, "d2h_GBps": d2h, "gpu_buffer_bytes": nbytes}


def measure_cpu_matvec(d: int, f: int, min_bytes: int) -> dict:
    """GB/s of torch's batch-1 CPU matvec (x @ W^T, W (f, d)) per dtype, over enough matrices to
    exceed min_bytes (so they are not cache-resident), rotating between them."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):   # (the engine runs no fp16 on the CPU)
        per = f * d * torch.finfo(dtype).bits // 8
        n = min(16, max(2, math.ceil(min_bytes / per)))   # small models: cache-resident, say so in the notes
        try:
            ws = [torch.randn(f, d).to(dtype) for _ in range(n)]
            x = torch.randn(1, d).to(dtype)
            torch.nn.functional.linear(x, ws[0])

            def run():
                for w in ws:
                    torch.nn.functional.linear(x, w)
            once = _best_of(run, 1)
            best = min(once, _best_of(run, 2)) if once < 0.5 else once   # a slow dtype is timed once
            out[str(dtype).replace("torch.", "")] = n * per / best / 1e9
        except RuntimeError as e:   # a dtype without a CPU kernel
            out[str(dtype).replace("torch.", "")] = None
            print(f"note: torch CPU matvec in {dtype} failed ({str(e).splitlines()[0]})", file=sys.stderr)
        finally:
            ws = None
    return out


def pick_cpu_dtype(matvec: dict) -> tuple[str, float]:
    """The dtype with the most weights per second (GB/s / bytes per weight); its GB/s."""
    per = {"float32": 4, "bfloat16": 2, "float16": 2}
    best = max((k for k, v in matvec.items() if v), key=lambda k: matvec[k] / per[k])
    return best, matvec[best]



# --------------------------------------------------------------------------------------- bytes / limits


def param_bytes(module: torch.nn.Module, device_type: str | None = None) -> int:
    """Bytes of the module's weights: its parameters and its block-quantized matrices (quant.BlockLinear)."""
    seen, total = set(), 0
    blocks = [m.blocks for m in module.modules() if hasattr(m, "blocks") and isinstance(m.blocks, torch.Tensor)]
    for p in [*module.parameters(), *blocks]:
        if id(p) in seen or (device_type and p.device.type != device_type):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def kv_read_bytes(cfg, ctx_avg: float, elem: int, layers: int | None = None) -> float:
    L = cfg.n_layers if layers is None else layers
    return 2 * L * ctx_avg * cfg.n_kv_heads * cfg.head_dim * elem


@dataclass
class Limit:
    """Bytes one decode token must read, and the fastest ms/token they allow."""
    gpu_bytes: float = 0.0
    cpu_bytes: float = 0.0
    h2d_bytes: float = 0.0
    ms: float = 0.0
    model: str = ""

    @property
    def tps(self) -> float | None:
        return 1e3 / self.ms if self.ms > 0 else None


def sequential_limit(gpu_bytes: float, cpu_bytes: float, h2d_bytes: float, bw: dict, what: str) -> Limit:
    s = 0.0
    if gpu_bytes:
        s += gpu_bytes / (bw["gpu_copy_GBps"] * 1e9)
    if cpu_bytes:
        s += cpu_bytes / (bw["cpu_read_GBps"] * 1e9)
    if h2d_bytes:
        s += h2d_bytes / (bw["h2d_GBps"] * 1e9)
    return Limit(gpu_bytes, cpu_bytes, h2d_bytes, 1e3 * s, what)
