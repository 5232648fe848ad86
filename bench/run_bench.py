"""One command, every system, one table: the hybrid runtime against dense baselines.

    python -m bench.run_bench --out $OUT                  # GPU machine: synthetic 7B, every GPU system
    python -m bench.run_bench --model synthetic-tiny      # CPU smoke run (what CI does, smaller still)
    hybrid-run bench ...                                  # the same command (bench/cli_bench.py)

Every system runs on the same model (weights, prompt, machine) in one process, one after the
other; each is loaded, warmed up (a short generation: compilation, graph capture, caches), then
timed on `runs` generations of `new_tokens` greedy tokens from a `prompt_tokens` prompt (batch 1;
EOS is ignored so every run generates exactly that many tokens). The table reports medians.

Systems (`--systems`, comma list; `auto`: the GPU set with CUDA, the CPU set without):
  dense-gpu      this engine, dense, whole model on the GPU, decode step replayed as a CUDA graph
  hybrid         hybrid runtime under --gpu-memory (predictor mode; placement solver, Numba cold rows)
  dense-offload  this engine, dense, layer offload under --gpu-memory: first N layers on the GPU, the
                 rest on the CPU (llama.cpp's -ngl), CPU layers in the fastest dense CPU dtype measured
  hybrid-gpu     hybrid runtime with every neuron on the GPU (predictor mode, sparse kernels if built)
  hf-gpu         transformers generate(), whole model on the GPU
  hf-offload     transformers + accelerate, device_map="auto", max_memory={GPU: --gpu-memory}
  llamacpp-gpu / llamacpp-offload   llama.cpp (llama-cpp-python) when importable, else skipped; it runs
                 in a child process (bench/llamacpp_child.py: no torch in it), a crash is a failed row
  dense-cpu, hybrid-cpu, hf-cpu     the CPU-only counterparts (the default without CUDA)
  llamacpp-cpu   llama.cpp with every layer on the CPU and no GPU visible to it (not in a default set)

Physical limits: the bandwidths are measured in the same run (GPU device-to-device copy counting
bytes read + written; CPU multi-threaded read of a buffer larger than the last-level cache;
pinned host<->device copies). Per system, the bytes one decode token must read on each side
(weights; KV cache at the mean position; for the hybrid the predicted-active rows: a predicted
neuron costs its gate row, and its up and down rows when it fires, estimated with the
predictors' measured precision) divided by those bandwidths give the fastest possible ms/token;
"achieved" is measured / limit. Hybrid per layer: attention, predictor and lm_head on the GPU in
sequence, the hot and cold FFN halves overlapped (max of the two).

Time budget: the script prints timestamped progress, writes the results after every system
(a timeout still leaves them in --out), and skips what no longer fits in --time-budget-s (its
least time estimated before it starts) or shortens it (fewer runs, then one shorter run), saying
so in the table's notes.

Disk: free space is checked before every large write (synthetic build, GGUF); a 13B build on a
64 GiB disk runs the llama.cpp systems before the hybrid directory is written and deletes the
GGUF after them (bench/README.md, "Disk"); --clean-work drops other cached builds first.

--profile-time on CUDA profiles the CUDA-graphed hybrid step the runtime really decodes with
(`HybridGraphedDecodeStep.profiled_call`): host time per call, GPU time per segment, the cold
FFN's selected / firing neurons and its in-situ read rate.
"""
from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_runtime.errors import UserError, check_number, check_output_path  # noqa: E402

GiB = 1024 ** 3
REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK = Path(os.environ.get("HYBRID_RUNTIME_CACHE", Path.home() / ".cache" / "hybrid-runtime")) / "bench"
SYNTHETIC_PREFIX = "synthetic-"
PROMPT_TEXT = ("The history of computing is a story of trade-offs between memory and speed. Early machines "
               "kept their programs on punched cards and their data on magnetic drums; every generation since "
               "has added a faster, smaller layer of memory closer to the processor. Large language models "
               "turned this old problem around: their weights are far larger than the fast memory of a "
               "consumer graphics card, yet most of those weights are not needed for any given word. ")

# --------------------------------------------------------------------------------------- systems


@dataclass(frozen=True)
class SystemSpec:
    name: str
    description: str
    needs_cuda: bool
    budgeted: bool          # runs under --gpu-memory
    baseline: bool          # a column of the speedup table
    needs_hybrid: bool      # needs a hybrid model directory
    needs_hf: bool          # needs an HF checkpoint transformers can read


SYSTEMS: dict[str, SystemSpec] = {s.name: s for s in [
    SystemSpec("dense-gpu", "this engine, dense, whole model on the GPU, CUDA-graph decode", True, False, True, False, False),
    SystemSpec("hybrid", "hybrid runtime under the budget (predictor mode)", True, True, False, True, False),
    SystemSpec("dense-offload", "this engine, dense, first N layers on the GPU, rest on the CPU", True, True, True, False, False),
    SystemSpec("hybrid-gpu", "hybrid runtime, every neuron on the GPU (predictor mode)", True, False, False, True, False),
    SystemSpec("hf-gpu", "transformers generate(), whole model on the GPU", True, False, True, False, True),
    SystemSpec("hf-offload", "transformers + accelerate device_map=auto, max_memory = budget", True, True, True, False, True),
    SystemSpec("llamacpp-gpu", "llama.cpp (llama-cpp-python), all layers on the GPU", True, False, True, False, True),
    SystemSpec("llamacpp-offload", "llama.cpp (llama-cpp-python), n_gpu_layers fitting the budget", True, True, True, False, True),
    SystemSpec("llamacpp-cpu", "llama.cpp (llama-cpp-python), CPU only", False, False, True, False, True),
    SystemSpec("dense-cpu", "this engine, dense, on the CPU", False, False, True, False, False),
    SystemSpec("hybrid-cpu", "hybrid runtime on the CPU only (predictor mode, Numba kernels)", False, False, False, True, False),
    SystemSpec("hf-cpu", "transformers generate() on the CPU", False, False, True, False, True),
]}
GPU_DEFAULT = ["dense-gpu", "hybrid", "dense-offload", "hybrid-gpu", "hf-gpu", "hf-offload", "llamacpp-gpu",
               "llamacpp-offload"]
CPU_DEFAULT = ["dense-cpu", "hybrid-cpu", "hf-cpu"]
REFERENCE_FIGURES = {  # issue 7, measured on the H100 machine (2026-11-22) with the 7B shape: context only
    "llama.cpp, whole model on the GPU": 143.6, "llama.cpp, 20/32 layers on the GPU (~8 GiB)": 18.3,
    "llama.cpp, CPU only": 7.6, "PowerInfer, 8 GiB": 27.4, "PowerInfer, whole model on the GPU": 66.3,
    "transformers generate, GPU": 38.2, "transformers + accelerate, 8 GiB": 1.33,
}


def parse_systems(text: str, cuda: bool) -> list[str]:
    if text in ("auto", ""):
        return list(GPU_DEFAULT if cuda else CPU_DEFAULT)
    if text == "all":
        return list(SYSTEMS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in SYSTEMS]
    if bad:
        raise UserError(f"--systems: unknown system {bad[0]!r} (known: {', '.join(SYSTEMS)}; or auto, all)")
    return list(dict.fromkeys(names))


def parse_budgets(text: str) -> list[float]:
    if text.strip().lower() in ("", "none", "off"):
        return []
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--sweep must be comma-separated GiB values (e.g. 4,6,8,12,16) or none, got {text!r}") from None
    if any(v <= 0 for v in vals):
        raise UserError(f"--sweep budgets must be positive, got {text!r}")
    return vals


# --------------------------------------------------------------------------------------- options


@dataclass
class BenchOptions:
    model: str = "auto"                 # synthetic-{7b,13b,small,tiny}, a hybrid dir or an HF dir; auto by CUDA
    systems: str = "auto"
    gpu_memory: str = "8GiB"
    prompt_tokens: int = 64
    new_tokens: int = 128
    runs: int = 3
    out: str = str(REPO / "bench" / "results")
    profile_time: bool = False
    profile_tokens: int = 32            # decode tokens of the --profile-time pass
    sweep: str = "4,6,8,12,16"
    sweep_new_tokens: int = 32
    slow_new_tokens: int = 16           # for hf-offload (~1 tok/s at 7B): fewer tokens, said so
    time_budget_s: float = 540.0
    work: str = str(DEFAULT_WORK)
    seed: int = 0
    threads: int | None = None
    cold_format: str = "auto"
    rebuild: bool = False
    force: bool = False
    pipeline: dict = field(default_factory=dict)   # PipelineConfig overrides for the synthetic model
    sparsity_profile: str = "prosparse"  # synthetic model: bench.synthetic.SPARSITY_PROFILES preset
    target_density: float | None = None  # synthetic model: override the preset's mean density
    freq_sigma: float | None = None      # synthetic model: override the preset's log-normal sigma
    clean_work: bool = False             # remove other cached builds (and GGUFs) in --work first


# --------------------------------------------------------------------------------------- logging


class BenchLog:
    """Timestamped progress on stderr, kept for the results file and a log beside them."""

    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.lines: list[str] = []
        self.notes: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def __call__(self, msg: str) -> None:
        for line in str(msg).splitlines() or [""]:
            stamped = f"[{self.elapsed():7.1f}s] {line}"
            self.lines.append(stamped)
            print(stamped, file=sys.stderr, flush=True)

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self(f"note: {msg}")


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


# --------------------------------------------------------------------------------------- runners


@dataclass
class RunResult:
    prefill_s: float
    decode_s: float
    decode_steps: int
    prompt_tokens: int
    tokens: list[int]


class EngineRunner:
    """This engine (dense, offload or hybrid) through the product's Generator."""

    def __init__(self, model, tokenizer, device: torch.device, context: int, decode_step=None):
        from hybrid_runtime.generate import Generator
        self.model, self.device = model, device
        self.gen = Generator(model, tokenizer, context, device, eos_ids=[], decode_step=decode_step)
        self.gen.eos_ids = set()   # every run generates exactly new_tokens tokens

    def generate(self, prompt: list[int], n_new: int) -> RunResult:
        from hybrid_runtime.generate import SamplingParams
        self.gen.reset()
        r = self.gen.generate(prompt, SamplingParams(max_new_tokens=n_new))
        return RunResult(r.prefill_seconds, r.decode_seconds, r.decode_steps, r.prompt_tokens, list(r.tokens))


class HFRunner:
    """transformers: prefill timed as one forward; decode = generate() time minus that prefill."""

    def __init__(self, model, input_device: torch.device):
        self.model, self.device = model, input_device
        self.cuda = torch.cuda.is_available()

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @torch.inference_mode()
    def generate(self, prompt: list[int], n_new: int) -> RunResult:
        ids = torch.tensor([prompt], device=self.device)
        mask = torch.ones_like(ids)
        self._sync()
        t0 = time.perf_counter()
        self.model(input_ids=ids, attention_mask=mask, use_cache=True)
        self._sync()
        t1 = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=False, pad_token_id=0)
        self._sync()
        t2 = time.perf_counter()
        prefill = t1 - t0
        return RunResult(prefill, max(t2 - t1 - prefill, 1e-9), n_new - 1, len(prompt),
                         out[0, len(prompt):].tolist())


class _StepOnCpu:
    """The step's RoPE rows and mask copied to the CPU once per step, shared by the offloaded blocks."""

    def __init__(self, cpu_dtype: torch.dtype):
        self.cpu_dtype = cpu_dtype
        self.mask = None          # the GPU mask these copies were made from (identity = this step)
        self.tensors = None

    def get(self, cos, sin, mask, input_pos):
        if self.mask is not mask:
            # deliberate host syncs, once per step: the CPU layers need the step's tables
            self.mask = mask
            self.tensors = (cos.cpu(), sin.cpu(), mask.to("cpu", self.cpu_dtype), input_pos.cpu())
        return self.tensors


class OffloadedBlock(torch.nn.Module):
    """A decoder block kept on the CPU (in cpu_dtype) inside a model that runs on the GPU: llama.cpp's
    -ngl split. `Transformer.forward` is unchanged; this block takes h from the GPU and gives it back
    (one D2H and one H2D copy of h per CPU layer: ~d values, negligible next to a CPU layer's weights)."""

    def __init__(self, block, step: _StepOnCpu):
        super().__init__()
        self.block, self.step = block, step

    @property
    def attn(self):               # setup_cache puts the KV cache where the attention weights are
        return self.block.attn

    @property
    def ffn(self):
        return self.block.ffn

    def forward(self, h, cos, sin, mask, input_pos):
        ccos, csin, cmask, cpos = self.step.get(cos, sin, mask, input_pos)
        y = self.block(h.to("cpu", self.step.cpu_dtype), ccos, csin, cmask, cpos)
        return y.to(h.device, h.dtype)


def build_layer_offload(path: Path, n_gpu: int, gpu: torch.device, cpu_dtype: torch.dtype):
    """The dense engine with layers [0, n_gpu) and the non-layer weights on the GPU (checkpoint dtype),
    the other layers on the CPU in cpu_dtype, each wrapped in an `OffloadedBlock`."""
    from hybrid_runtime.loading import load_model
    from hybrid_runtime.model_dir import open_model_dir
    md = open_model_dir(path)
    gpu_dtype = md.dtype

    def place(name: str):
        m = re.match(r"layers\.(\d+)\.", name)
        on_gpu = m is None or int(m.group(1)) < n_gpu
        return (gpu, gpu_dtype) if on_gpu else (torch.device("cpu"), cpu_dtype)

    model = load_model(md, dtype=gpu_dtype, place=place)
    step = _StepOnCpu(cpu_dtype)
    for i in range(n_gpu, len(model.layers)):
        model.layers[i] = OffloadedBlock(model.layers[i], step)
    return model


def offload_layers_for_budget(cfg, budget: int, context: int, wbytes: int = 2) -> int:
    """Layers that fit on the GPU: budget - (embeddings, lm_head, final norm, workspace) over the
    bytes of one layer (weights + its KV cache). Same accounting as the hybrid placement."""
    from hybrid_runtime.placement import ModelShape
    from hybrid_runtime.session import WORKSPACE_BYTES
    shape = ModelShape.from_config(cfg, weight_bytes=wbytes)
    fixed = cfg.vocab_size * cfg.dim * wbytes * (1 if cfg.tie_embeddings else 2) + cfg.dim * wbytes + WORKSPACE_BYTES
    per_layer = (shape.attention_bytes() // cfg.n_layers + 3 * cfg.dim * cfg.ffn_dim * wbytes + 2 * cfg.dim * wbytes
                 + shape.kv_cache_bytes(context) // cfg.n_layers)
    return max(0, min(cfg.n_layers, (budget - fixed) // per_layer))


# --------------------------------------------------------------------------------------- bytes / limits


def param_bytes(module: torch.nn.Module, device_type: str | None = None) -> int:
    seen, total = set(), 0
    for p in module.parameters():
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


# --------------------------------------------------------------------------------------- hybrid instrumentation


class SelectionCounter:
    """Counts predicted-active hot and cold neurons per layer (GPU accumulators, one read at the end)."""

    def __init__(self, model):
        self.layers = []
        for i, layer in enumerate(model.layers):
            ffn = layer.ffn
            if not hasattr(ffn, "predictor"):
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


# --------------------------------------------------------------------------------------- the run


@dataclass
class Ctx:
    opts: BenchOptions
    log: BenchLog
    cuda: bool
    device: torch.device
    hf_dir: Path | None          # transformers-readable checkpoint
    dense_dir: Path              # what the engine's dense systems load
    hybrid_dir: Path | None
    prompt: list[int]
    context: int
    budget: int
    bw: dict
    cpu_dtype: str
    predictor_precision: float | None
    cfg: object                   # hybrid_runtime.model.ModelConfig
    reference_tokens: list[int] | None = None


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


MIN_TIMED_TOKENS = 16     # a run shortened for the time budget keeps at least this many tokens


def _time_runs(runner, ctx: Ctx, name: str, n_new: int, runs: int,
               cap_s: float) -> tuple[list[RunResult], str, int]:
    """Warm-up (excluded), then up to `runs` timed runs of n_new tokens: fewer runs when they would not
    fit cap_s, and one shorter run (>= MIN_TIMED_TOKENS tokens) when even one would not. Returns
    (results, note for the table, tokens per run)."""
    log = ctx.log
    t0 = time.perf_counter()
    warm = runner.generate(ctx.prompt, min(n_new, 8))
    warm_s = time.perf_counter() - t0
    per_tok = warm.decode_s / max(warm.decode_steps, 1)
    est = warm.prefill_s + per_tok * n_new * 1.1 + 0.05
    note = ""
    allowed = int(cap_s // max(est, 1e-3))
    if allowed < 1:
        fit = int((cap_s - warm.prefill_s - 0.05) / max(per_tok * 1.1, 1e-9))
        n_fit = max(min(n_new, fit), min(n_new, MIN_TIMED_TOKENS))
        note = (f"1 run of {n_fit} tokens instead of {runs} x {n_new} (time budget; ~{est:.0f} s per full run, "
                f"{cap_s:.0f} s left for it)")
        runs, n_new = 1, n_fit
    elif allowed < runs:
        note = f"{allowed} run(s) instead of {runs} (time budget; ~{est:.0f} s per run)"
        runs = allowed
    log(f"{name}: warm-up {warm_s:.1f} s (~{1 / max(per_tok, 1e-9):.1f} tok/s); {runs} timed run(s) of {n_new} tokens")
    results = [runner.generate(ctx.prompt, n_new) for _ in range(runs)]
    return results, note, n_new


# Time-budget estimates per system, from the 7B H100 run of 2026-11-23 (13.5 GB of fp16 weights): load
# seconds per GB of weights and decode ms per token per GB (llama.cpp and the CPU systems: guesses).
# Used only to decide, before starting something, whether it can still fit --time-budget-s.
LOAD_S_PER_GB = {"dense-gpu": 0.25, "hybrid": 0.95, "dense-offload": 0.36, "hybrid-gpu": 0.51, "hf-gpu": 0.17,
                 "hf-offload": 0.11, "llamacpp-gpu": 1.0, "llamacpp-offload": 1.0, "llamacpp-cpu": 1.0,
                 "dense-cpu": 0.5,
                 "hybrid-cpu": 1.0, "hf-cpu": 0.5}
DECODE_MS_PER_GB = {"dense-gpu": 0.63, "hybrid": 1.64, "dense-offload": 12.3, "hybrid-gpu": 0.49, "hf-gpu": 2.2,
                    "hf-offload": 68.0, "llamacpp-gpu": 0.52, "llamacpp-offload": 4.1, "llamacpp-cpu": 10.0,
                    "dense-cpu": 30.0,
                    "hybrid-cpu": 30.0, "hf-cpu": 60.0}
GGUF_EXPORT_S_PER_GB = 4.0     # f16 GGUF export: 4.1 s/GB measured on the 2-core dev VM (mostly one core)


def dense_weight_bytes(cfg, wbytes: int = 2) -> int:
    """Bytes of every weight of a LLaMA-shaped model in a 16-bit dtype."""
    per_layer = (2 * cfg.dim * cfg.n_heads * cfg.head_dim + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim
                 + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim)
    emb = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return wbytes * (cfg.n_layers * per_layer + emb + cfg.dim)


def min_system_seconds(ctx: Ctx, name: str, new_tokens: int = MIN_TIMED_TOKENS) -> float:
    """Rough least time a system needs here: load, an 8-token warm-up and one run of new_tokens tokens
    (+ the GGUF export for llama.cpp when it is not on disk yet)."""
    gb = dense_weight_bytes(ctx.cfg) / 1e9
    s = 3.0 + LOAD_S_PER_GB.get(name, 1.0) * gb + (8 + new_tokens) * DECODE_MS_PER_GB.get(name, 30.0) * gb / 1e3
    if name.startswith("llamacpp") and ctx.hf_dir is not None and not gguf_path(ctx).is_file():
        s += GGUF_EXPORT_S_PER_GB * gb
    return s


def _summarise(results: list[RunResult]) -> dict:
    prefill = [r.prompt_tokens / r.prefill_s for r in results if r.prefill_s > 0]
    decode = [r.decode_steps / r.decode_s for r in results if r.decode_s > 0]
    d = _median(decode)
    return {"prefill_tps": _median(prefill), "decode_tps": d, "ms_per_token": 1e3 / d if d > 0 else None,
            "runs": len(results), "decode_tps_runs": decode, "prefill_tps_runs": prefill}


def _agreement(tokens: list[int], ref: list[int] | None) -> int | None:
    if ref is None:
        return None
    n = 0
    for a, b in zip(tokens, ref):
        if a != b:
            break
        n += 1
    return n


# ----- builders: each returns (runner, info dict, Limit)


def _open(ctx: Ctx, path: Path, device: str, **kw):
    from hybrid_runtime.session import open_model
    return open_model(str(path), device=device, context=ctx.context, **kw)


def _dense_limit(ctx: Ctx, model, where: str) -> Limit:
    cfg = ctx.cfg
    elem = model.tok_embeddings.weight.element_size()
    weights = param_bytes(model) - model.tok_embeddings.weight.numel() * elem   # one embedding row is read
    kv = kv_read_bytes(cfg, len(ctx.prompt) + ctx.opts.new_tokens / 2, elem)
    if where == "gpu":
        return sequential_limit(weights + kv, 0, 0, ctx.bw, "weights + KV / GPU bw")
    return sequential_limit(0, weights + kv, 0, ctx.bw, "weights + KV / CPU bw")


def build_dense_gpu(ctx: Ctx):
    lm = _open(ctx, ctx.dense_dir, "cuda", mode="dense")
    info = {"dtype": str(lm.dtype).replace("torch.", ""), "cuda_graph": lm.decode_step is not None}
    return EngineRunner(lm.model, lm.tokenizer, lm.device, lm.context, lm.decode_step), info, \
        _dense_limit(ctx, lm.model, "gpu")


def build_dense_cpu(ctx: Ctx):
    lm = _open(ctx, ctx.dense_dir, "cpu", mode="dense", dtype=ctx.cpu_dtype)
    info = {"dtype": str(lm.dtype).replace("torch.", ""), "cpu_dtype_choice": ctx.cpu_dtype}
    return EngineRunner(lm.model, lm.tokenizer, lm.device, lm.context), info, _dense_limit(ctx, lm.model, "cpu")


def build_dense_offload(ctx: Ctx, budget: int | None = None):
    from hybrid_runtime.loading import load_tokenizer
    budget = ctx.budget if budget is None else budget
    n_gpu = offload_layers_for_budget(ctx.cfg, budget, ctx.context)
    cpu_dtype = getattr(torch, ctx.cpu_dtype)
    model = build_layer_offload(ctx.dense_dir, n_gpu, ctx.device, cpu_dtype)
    model.setup_cache(1, ctx.context)
    cfg = ctx.cfg
    gpu_w = param_bytes(model, "cuda") - model.tok_embeddings.weight.numel() * 2
    cpu_w = param_bytes(model, "cpu")
    ctx_avg = len(ctx.prompt) + ctx.opts.new_tokens / 2
    lim = sequential_limit(gpu_w + kv_read_bytes(cfg, ctx_avg, 2, n_gpu),
                           cpu_w + kv_read_bytes(cfg, ctx_avg, cpu_dtype.itemsize, cfg.n_layers - n_gpu),
                           2 * cfg.dim * 4, ctx.bw, "GPU layers / GPU bw + CPU layers / CPU bw")
    info = {"gpu_layers": n_gpu, "cpu_layers": cfg.n_layers - n_gpu, "cpu_dtype": ctx.cpu_dtype,
            "budget_gib": budget / GiB}
    ctx.log(f"dense-offload: {n_gpu} of {cfg.n_layers} layers on the GPU, the rest on the CPU in {ctx.cpu_dtype}")
    return EngineRunner(model, load_tokenizer(ctx.dense_dir), ctx.device, ctx.context), info, lim


def _hybrid_limit(ctx: Ctx, lm, counts: list[tuple[float, float]], gpu: bool) -> Limit:
    """Per layer: attention + predictor + norms on the GPU, then max(hot rows / GPU bw, cold rows / CPU bw)."""
    model, cfg = lm.model, ctx.cfg
    bw = ctx.bw
    prec = ctx.predictor_precision if ctx.predictor_precision is not None else 1.0
    rows_per_selected = 1 + 2 * prec     # gate always; up + down when it fires
    elem = model.tok_embeddings.weight.element_size()
    gpu_bw = bw["gpu_copy_GBps"] * 1e9 if gpu else None
    cpu_bw = bw["cpu_read_GBps"] * 1e9
    fixed = (model.output.weight.numel() + model.norm.weight.numel()) * elem
    kv = kv_read_bytes(cfg, len(ctx.prompt) + ctx.opts.new_tokens / 2, elem)
    gpu_bytes, cpu_bytes, secs = fixed + kv, 0.0, 0.0
    for (hot_sel, cold_sel), layer in zip(counts or [(0.0, 0.0)] * cfg.n_layers, model.layers):
        ffn = layer.ffn
        seq = param_bytes(layer.attn) + param_bytes(layer.attn_norm) + param_bytes(ffn.norm)
        seq += param_bytes(ffn.predictor) if hasattr(ffn, "predictor") else 0
        hot = hot_sel * rows_per_selected * cfg.dim * elem
        cold_row = ffn.cold.cold.row_bytes if getattr(ffn, "cold", None) is not None else cfg.dim * 2
        cold = cold_sel * rows_per_selected * cold_row
        gpu_bytes += seq + hot
        cpu_bytes += cold
        if gpu:
            secs += seq / gpu_bw + max(hot / gpu_bw, cold / cpu_bw + (2 * cfg.dim * 4 / (bw["h2d_GBps"] * 1e9)
                                                                        if cold else 0.0))
        else:
            secs += (seq + hot + cold) / cpu_bw
    secs += (fixed + kv) / (gpu_bw or cpu_bw)
    return Limit(gpu_bytes if gpu else 0.0, cpu_bytes if gpu else gpu_bytes + cpu_bytes, 0.0, 1e3 * secs,
                 f"per layer attn+pred, then max(hot/GPU, cold/CPU); {rows_per_selected:.2f} rows per "
                 f"selected neuron (precision {prec:.2f})")


def _hybrid_info(lm, counts) -> dict:
    cfg = lm.config
    info = {"mode": lm.mode, "cuda_graph": lm.decode_step is not None,
            "dtype": str(lm.dtype).replace("torch.", "")}
    p = lm.placement
    if p is not None:
        info.update({"hot_fraction": p.hot_fraction, "gpu_share_expected": p.gpu_share,
                     "gpu_bytes_planned": p.gpu_bytes, "cpu_bytes": p.cpu_bytes})
    hot = [getattr(layer.ffn, "hot_gate", None) for layer in lm.model.layers]
    info["hot_neurons"] = int(sum(h.shape[0] for h in hot if h is not None))
    info["ffn_neurons"] = cfg.ffn_dim * cfg.n_layers
    ffn0 = lm.model.layers[0].ffn
    hot_ffn = getattr(ffn0, "hot_ffn", None)
    info["hot_path"] = getattr(hot_ffn, "__name__", "?")
    cold = [getattr(layer.ffn, "cold", None) for layer in lm.model.layers]
    cold = [c for c in cold if c is not None]
    if cold:
        info["cold_format"] = cold[0].cold.fmt
    if lm.device.type == "cuda":
        from hybrid_runtime import kernels
        info["kernels"] = kernels.kernel_status()
    if counts:
        info["selected_hot_per_token"] = float(sum(c[0] for c in counts))
        info["selected_cold_per_token"] = float(sum(c[1] for c in counts))
    return info


def _selection_counts(ctx: Ctx, lm) -> list[tuple[float, float]]:
    counter = SelectionCounter(lm.model)
    if not counter.layers:
        return []
    _decode_loop(lm.model, ctx.prompt, 8, lm.device, after_prefill=counter.reset)   # decode tokens only
    return counter.restore()


def build_hybrid(ctx: Ctx, budget: int | None = None, full_gpu: bool = False, device: str = "cuda"):
    cold_format = None if ctx.opts.cold_format == "auto" else ctx.opts.cold_format
    if device == "cpu":
        lm = _open(ctx, ctx.hybrid_dir, "cpu", mode="predictor", cold_format=cold_format)
    elif full_gpu:
        lm = _open(ctx, ctx.hybrid_dir, "cuda", mode="predictor", hot_fraction=1.0, cold_format=cold_format)
    else:
        b = ctx.budget if budget is None else budget
        lm = _open(ctx, ctx.hybrid_dir, "cuda", mode="predictor", gpu_memory=str(int(b)), cold_format=cold_format)
    counts = _selection_counts(ctx, lm)
    info = _hybrid_info(lm, counts)
    lim = _hybrid_limit(ctx, lm, counts, gpu=device != "cpu")
    runner = EngineRunner(lm.model, lm.tokenizer, lm.device, lm.context, lm.decode_step)
    runner.lm = lm
    return runner, info, lim


def _hf_limit(ctx: Ctx, model) -> Limit:
    gpu_w, cpu_w = 0, 0       # accelerate's CPU offload leaves meta tensors on the module: counted as CPU
    emb = model.get_input_embeddings().weight
    for p in model.parameters():
        if p is emb:
            continue
        nb = p.numel() * p.element_size()
        if p.device.type == "cuda":
            gpu_w += nb
        else:
            cpu_w += nb
    elem = 2 if ctx.cuda else 4
    kv = kv_read_bytes(ctx.cfg, len(ctx.prompt) + ctx.opts.new_tokens / 2, elem)
    if not ctx.cuda:
        return sequential_limit(0, cpu_w + kv, 0, ctx.bw, "weights + KV / CPU bw")
    return sequential_limit(gpu_w + kv, 0, cpu_w, ctx.bw,
                            "GPU weights / GPU bw + offloaded weights / H2D bw")


def build_hf(ctx: Ctx, offload: bool = False, device: str = "cuda"):
    from transformers import AutoModelForCausalLM
    if ctx.hf_dir is None:
        raise _Skip("no HF checkpoint for this model (a hybrid directory whose source is gone)")
    cfg = json.loads((ctx.hf_dir / "config.json").read_text())
    if cfg.get("hidden_act") not in ("relu", "silu", "gelu", "swish", "relu2"):
        raise _Skip(f"transformers has no activation {cfg.get('hidden_act')!r}")
    kw: dict = {}
    if device == "cpu":
        kw = {"dtype": torch.float32}
    elif offload:
        if importlib.util.find_spec("accelerate") is None:
            raise _Skip("accelerate is not installed (pip install accelerate)")
        kw = {"dtype": torch.float16, "device_map": "auto",
              "max_memory": {0: int(ctx.budget - 512 * 1024 ** 2), "cpu": 200 * GiB}}
    else:
        kw = {"dtype": torch.float16, "device_map": "cuda"}
    model = AutoModelForCausalLM.from_pretrained(str(ctx.hf_dir), **kw).eval()
    info = {"dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    dm = getattr(model, "hf_device_map", None)
    if offload and dm:
        info["device_map"] = {str(k): str(v) for k, v in list(dm.items())[:64]}
        info["modules_on_gpu"] = sum(1 for v in dm.values() if str(v) in ("0", "cuda", "cuda:0"))
        info["modules_off_gpu"] = sum(1 for v in dm.values() if str(v) not in ("0", "cuda", "cuda:0"))
    input_device = torch.device("cuda" if device != "cpu" else "cpu")
    return HFRunner(model, input_device), info, _hf_limit(ctx, model)


def physical_cores() -> int:
    """Physical cores (not hyper-threads) from /proc/cpuinfo; os.cpu_count() where that is unreadable."""
    try:
        cores, phys = set(), "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = val.strip()
            elif key == "core id":
                cores.add((phys, val.strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def gguf_path(ctx: Ctx) -> Path:
    """Where the f16 GGUF of ctx.hf_dir lives: beside the checkpoint when it is in the bench work dir,
    else under <work>/gguf/."""
    hf = ctx.hf_dir.resolve()
    work = Path(ctx.opts.work).expanduser().resolve()
    if work in hf.parents:
        return hf.parent / "llamacpp" / "model-f16.gguf"
    return work / "gguf" / f"{hf.name}-{hashlib.sha1(str(hf).encode()).hexdigest()[:10]}-f16.gguf"


def drop_gguf(ctx: Ctx, reason: str | None) -> None:
    """Delete the exported GGUF (after the llama.cpp systems): always when `reason` is given, else
    only when the disk is short, i.e. another file of its size would not fit any more."""
    from bench.synthetic import free_bytes, need_with_margin
    if ctx.hf_dir is None:
        return
    out = gguf_path(ctx)
    if not out.is_file():
        return
    size, free = out.stat().st_size, free_bytes(out.parent)
    if reason is None and free >= need_with_margin(size):
        return
    out.unlink()
    out.with_name(out.name + ".source.json").unlink(missing_ok=True)
    why = reason or f"disk short: {free / GiB:.1f} GiB free"
    ctx.log(f"llama.cpp: deleted {out} ({size / GiB:.1f} GiB; {why})")


def llamacpp_gguf(ctx: Ctx) -> Path:
    """The f16 GGUF of ctx.hf_dir, exported once and cached (gguf_path). Re-exported when the
    checkpoint's files change. _Skip when the disk or the time budget cannot take the export."""
    from bench.gguf_export import export_gguf
    from bench.synthetic import free_bytes, need_with_margin
    hf = ctx.hf_dir.resolve()
    out = gguf_path(ctx)
    srcs = sorted(p for p in hf.iterdir() if p.suffix in (".json", ".safetensors"))
    fingerprint = {"source": str(hf), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in srcs}}
    stamp = out.with_name(out.name + ".source.json")
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == fingerprint:
        ctx.log(f"llama.cpp: reusing {out} ({out.stat().st_size / GiB:.2f} GiB)")
        return out
    need, free = dense_weight_bytes(ctx.cfg), free_bytes(out.parent)
    if free < need_with_margin(need):
        raise _Skip(f"not enough disk for the f16 GGUF: needs {need_with_margin(need) / GiB:.1f} GiB, "
                    f"{free / GiB:.1f} GiB free in {out.parent}")
    est = GGUF_EXPORT_S_PER_GB * need / 1e9
    if ctx.log.remaining() < est + 20:
        raise _Skip(f"time budget: the GGUF export needs ~{est:.0f} s, {max(ctx.log.remaining(), 0):.0f} s left")
    t0 = time.perf_counter()
    ctx.log(f"llama.cpp: exporting {hf} to an f16 GGUF at {out}")
    export_gguf(hf, out, "f16")
    stamp.write_text(json.dumps(fingerprint))
    ctx.log(f"llama.cpp: GGUF written in {time.perf_counter() - t0:.1f} s ({out.stat().st_size / GiB:.2f} GiB)")
    return out


class LlamaCppChild:
    """llama.cpp in a child process (bench/llamacpp_child.py, which imports no torch): on the H100 image a
    model load segfaults in any process that has imported torch (bench/llamacpp_diag.sh), fresh processes
    load it fine. JSON lines over the
    child's stdin/stdout; every reply waits at most `timeout_s()` seconds (the bench's time budget), and a
    child that dies or hangs becomes one clear RuntimeError (a failed row; the bench goes on)."""

    command = [sys.executable, "-m", "bench.llamacpp_child"]

    def __init__(self, load_request: dict, timeout_s, env: dict | None = None):
        import collections
        import queue
        import subprocess
        self.timeout_s = timeout_s
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        self.proc = subprocess.Popen(self.command, cwd=str(REPO), env=child_env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self._lines: queue.Queue = queue.Queue()
        self.stderr_tail: collections.deque = collections.deque(maxlen=40)

        def pump(stream, put, at_end):
            for line in stream:
                put(line)
            at_end()
        threading.Thread(target=pump, args=(self.proc.stdout, self._lines.put, lambda: self._lines.put(None)),
                         daemon=True).start()
        threading.Thread(target=pump, args=(self.proc.stderr, self.stderr_tail.append, lambda: None),
                         daemon=True).start()
        self.loaded = self.request(load_request, "loading the model")

    def request(self, req: dict, what: str) -> dict:
        import queue
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass                               # the child is gone: reported below from its exit status
        timeout = self.timeout_s()
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.close(kill=True)
            raise RuntimeError(f"llama.cpp child process: no reply after {timeout:.0f} s while {what} "
                               "(time budget); killed") from None
        if line is None:                       # stdout closed: the child exited or crashed
            raise RuntimeError(self._death(what))
        reply = json.loads(line)
        if not reply.get("ok"):
            self.close()
            if reply.get("skip"):
                raise _Skip(reply.get("error", "?"))
            raise RuntimeError(f"llama.cpp child process while {what}: {reply.get('error', '?')}")
        return reply

    def _death(self, what: str) -> str:
        import signal
        try:
            rc = self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.close(kill=True)
            rc = self.proc.returncode
        time.sleep(0.1)                        # let the stderr pump take the last lines
        if rc is not None and rc < 0:
            try:
                how = f"killed by signal {signal.Signals(-rc).name} (exit status {rc})"
            except ValueError:
                how = f"killed by signal {-rc} (exit status {rc})"
        else:
            how = f"exited with status {rc} without a reply"
        last = next((l.strip() for l in reversed(self.stderr_tail) if l.strip()), "")
        return f"llama.cpp child process {how} while {what}" + (f"; last stderr line: {last[:300]}" if last else "")

    def close(self, kill: bool = False) -> None:
        import subprocess
        proc = self.proc
        if proc.poll() is None:
            if not kill:
                try:
                    proc.stdin.close()         # end of requests: the child exits and frees its memory
                    proc.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    kill = True
            if kill and proc.poll() is None:
                proc.kill()
                proc.wait()

    def __del__(self):
        if getattr(self, "proc", None) is not None:
            self.close()


class LlamaCppRunner:
    """llama.cpp (through llama-cpp-python's Llama, in a LlamaCppChild): the prompt ids evaluated as one
    batch (prefill, which ends with the first token's logits), then one llm.eval([token]) per decode
    step; greedy = argmax of the last position's logits (llama_get_logits_ith); EOS is never checked, so
    every run generates exactly n_new tokens. After each call, info holds the child's device-wide GPU
    memory in use (gpu_used_gib, when measured) and its peak RSS (cpu_rss_gib)."""

    def __init__(self, child: LlamaCppChild, info: dict):
        self.child, self.info = child, info
        self._update(child.loaded)

    def _update(self, reply: dict) -> None:
        if reply.get("gpu_used_mib") is not None:   # llama.cpp allocates outside torch: device-wide
            self.info["gpu_used_gib"] = round(reply["gpu_used_mib"] * 2 ** 20 / GiB, 3)
        if reply.get("rss_peak_gib") is not None:
            self.info["cpu_rss_gib"] = reply["rss_peak_gib"]

    def generate(self, prompt: list[int], n_new: int) -> RunResult:
        reply = self.child.request({"prompt": list(prompt), "n_new": n_new, "runs": 1}, f"generating {n_new} tokens")
        self._update(reply)
        r = reply["runs"][0]
        return RunResult(r["prefill_s"], r["decode_s"], r["decode_steps"], r["prompt_tokens"], r["tokens"])

    def close(self) -> None:
        self.child.close()


def build_llamacpp(ctx: Ctx, offload: bool = False, cpu_only: bool = False):
    """llama.cpp on the same weights: the HF checkpoint exported to an f16 GGUF (bench/gguf_export.py).
    Whole model on the GPU (n_gpu_layers=-1), or the layer count that fits ctx.budget by the same
    accounting as dense-offload (llama.cpp puts the LAST N layers on the GPU, and keeps the output
    matrix on the CPU unless every layer is offloaded, so it uses somewhat less than the budget), or
    (cpu_only, or no CUDA) every layer on the CPU with no GPU visible to it.
    llama.cpp's llama architecture computes SiLU(gate) * up whatever the checkpoint's activation: same
    bytes and FLOPs as ReLU, so a fair dense speed baseline, but its tokens differ from the others'.
    llama.cpp runs in a child process (LlamaCppChild); this process never imports llama_cpp."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise _Skip("llama_cpp is not importable (pip install llama-cpp-python built with CUDA, and gguf)")
    if importlib.util.find_spec("gguf") is None:
        raise _Skip("llama_cpp is importable but the gguf package (to write the f16 GGUF) is not")
    if ctx.hf_dir is None:
        raise _Skip("no HF checkpoint for this model (a hybrid directory whose source is gone) to export to GGUF")
    t_export = time.perf_counter()
    path = llamacpp_gguf(ctx)
    export_s = time.perf_counter() - t_export      # ~0 when reused; not part of the system's run time
    cfg = ctx.cfg
    gpu = ctx.cuda and not cpu_only
    n_gpu = offload_layers_for_budget(cfg, ctx.budget, ctx.context) if offload else cfg.n_layers
    n_gpu = n_gpu if gpu else 0
    n_gpu_layers = n_gpu if (offload or not gpu) else -1
    threads = ctx.opts.threads or physical_cores()
    request = {"gguf": str(path), "n_gpu_layers": n_gpu_layers, "n_ctx": ctx.context,
               "n_batch": max(512, len(ctx.prompt)), "threads": threads, "flash_attn": gpu,
               "require_gpu_offload": gpu, "measure_gpu": gpu}
    where = f"{n_gpu} of {cfg.n_layers} layers on the GPU" if gpu else "CPU only"
    ctx.log(f"llama.cpp: starting its child process ({where}, {threads} threads)")
    child = LlamaCppChild(request, lambda: max(60.0, ctx.log.remaining()),
                          env=None if gpu else {"CUDA_VISIBLE_DEVICES": ""})
    act = getattr(cfg, "act", "silu")
    info = {"gguf": str(path), "gguf_gib": round(path.stat().st_size / GiB, 3), "gguf_export_s": round(export_s, 1),
            "dtype": "f16",
            "n_gpu_layers": n_gpu_layers, "gpu_layers": n_gpu, "cpu_layers": cfg.n_layers - n_gpu,
            "threads": threads, "flash_attn": gpu, "llama_cpp_python": child.loaded.get("llama_cpp_python", "?"),
            "child_load_s": round(child.loaded.get("load_s", 0.0), 2), "process": "child (bench/llamacpp_child.py)",
            "activation": "silu (llama.cpp's llama arch)" + ("" if act == "silu" else f"; the model's is {act}: "
                                                              "same bytes/FLOPs, different tokens")}
    if offload:
        info["budget_gib"] = ctx.budget / GiB
    note = (f"llama.cpp computes SiLU(gate) * up (its llama architecture has no {act}): the same weight bytes "
            "and FLOPs per token, so a fair dense decode-speed baseline, but its tokens are not the model's")
    if act != "silu" and note not in ctx.log.notes:
        ctx.log.note(note)
    runner = LlamaCppRunner(child, info)
    # bytes per token: f16 weights (one embedding row) + f16 KV cache; GPU layers / GPU bw, the rest / CPU bw
    per_layer = 2 * (2 * cfg.dim * cfg.n_heads * cfg.head_dim + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim
                     + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim)
    out_bytes = 2 * (cfg.vocab_size * cfg.dim + cfg.dim)
    ctx_avg = len(ctx.prompt) + ctx.opts.new_tokens / 2
    gpu_b = n_gpu * per_layer + kv_read_bytes(cfg, ctx_avg, 2, n_gpu)
    cpu_b = (cfg.n_layers - n_gpu) * per_layer + kv_read_bytes(cfg, ctx_avg, 2, cfg.n_layers - n_gpu)
    if gpu and n_gpu == cfg.n_layers:
        gpu_b += out_bytes
    else:
        cpu_b += out_bytes
    if not gpu:
        cpu_b, gpu_b = cpu_b + gpu_b, 0
    lim = sequential_limit(gpu_b, cpu_b, 2 * cfg.dim * 4 if 0 < n_gpu < cfg.n_layers else 0, ctx.bw,
                           "GPU layers / GPU bw + CPU layers (+ output) / CPU bw")
    return runner, info, lim


class _Skip(Exception):
    """A system that cannot run here: reported as a 'skipped' line, not an error."""


BUILDERS = {
    "dense-gpu": build_dense_gpu,
    "hybrid": lambda ctx: build_hybrid(ctx),
    "dense-offload": lambda ctx: build_dense_offload(ctx),
    "hybrid-gpu": lambda ctx: build_hybrid(ctx, full_gpu=True),
    "hf-gpu": lambda ctx: build_hf(ctx),
    "hf-offload": lambda ctx: build_hf(ctx, offload=True),
    "llamacpp-gpu": lambda ctx: build_llamacpp(ctx),
    "llamacpp-offload": lambda ctx: build_llamacpp(ctx, offload=True),
    "llamacpp-cpu": lambda ctx: build_llamacpp(ctx, cpu_only=True),
    "dense-cpu": build_dense_cpu,
    "hybrid-cpu": lambda ctx: build_hybrid(ctx, device="cpu"),
    "hf-cpu": lambda ctx: build_hf(ctx, device="cpu"),
}


def run_system(ctx: Ctx, name: str, budget_s: float | None = None) -> dict:
    """Load, warm up, time one system; return its row (status ok / skipped / failed)."""
    spec = SYSTEMS[name]
    log, opts = ctx.log, ctx.opts
    row: dict = {"system": name, "description": spec.description, "status": "ok",
                 "budget_gib": ctx.budget / GiB if spec.budgeted else None, "notes": []}
    if spec.needs_cuda and not ctx.cuda:
        return {**row, "status": "skipped", "reason": "needs CUDA (no GPU visible to torch)"}
    if spec.needs_hybrid and ctx.hybrid_dir is None:
        return {**row, "status": "skipped", "reason": "the model is not a hybrid model directory (hybrid.json)"}
    n_new = opts.slow_new_tokens if name == "hf-offload" else opts.new_tokens
    if n_new != opts.new_tokens:
        row["notes"].append(f"{n_new} new tokens instead of {opts.new_tokens} (~1 tok/s system)")
    free_memory(ctx.cuda)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    log(f"--- {name}: {spec.description}")
    t0 = time.perf_counter()
    runner = None
    try:
        runner, info, lim = BUILDERS[name](ctx)
        row["load_s"] = round(time.perf_counter() - t0, 2)
        row["info"] = info
        log(f"{name}: loaded in {row['load_s']:.1f} s; {json.dumps({k: v for k, v in info.items() if k != 'device_map'})}")
        spent = time.perf_counter() - t0 - info.get("gguf_export_s", 0.0)   # a one-off export is not load time
        # what is left of this system's share for the timed runs (_time_runs trims them to fit), never more
        # than what is left of the whole budget
        share = budget_s if budget_s is not None else ctx.log.remaining()
        cap = max(2.0, min(share - spent - 5.0, ctx.log.remaining() - 15.0))
        results, note, n_new = _time_runs(runner, ctx, name, n_new, opts.runs, cap)
        if note:
            row["notes"].append(note)
        row.update(_summarise(results))
        row["new_tokens"] = n_new
        row["limit"] = asdict(lim)
        row["limit_tps"] = lim.tps
        row["achieved_of_limit"] = row["decode_tps"] / lim.tps if lim.tps else None
        if ctx.reference_tokens is None and name in ("dense-gpu", "dense-cpu"):
            ctx.reference_tokens = results[0].tokens
        row["same_tokens_as_dense"] = _agreement(results[0].tokens, ctx.reference_tokens)
        if opts.profile_time and name in ("hybrid", "hybrid-cpu") and hasattr(runner, "lm"):
            prof = run_profile_time(ctx, runner.lm, row)
            if prof is not None:
                row["profile_time"] = prof
    except _Skip as e:
        row.update(status="skipped", reason=str(e))
    except UserError as e:
        row.update(status="failed", reason=str(e))
    except Exception as e:  # one system failing must not stop the others
        row.update(status="failed", reason=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        log(traceback.format_exc())
    finally:
        if hasattr(runner, "close"):   # llama.cpp's child process: ends now, freeing its memory
            runner.close()
        runner = None
        if ctx.cuda:
            torch_peak = torch.cuda.max_memory_allocated() / GiB
            device_wide = (row.get("info") or {}).get("gpu_used_gib")
            if device_wide is not None:   # llama.cpp allocates outside torch: its runner measures device-wide
                row.update(peak_gpu_gib=device_wide, peak_gpu_source="device-wide", torch_peak_gpu_gib=torch_peak)
            else:
                row.update(peak_gpu_gib=torch_peak, peak_gpu_source="torch")
        # llama.cpp runs in a child process: its own peak RSS
        row["cpu_rss_gib"] = ((row.get("info") or {}).get("cpu_rss_gib")
                              or _proc_status("VmHWM") or _proc_status("VmRSS"))
        free_memory(ctx.cuda)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    if row["status"] == "ok":
        log(f"{name}: decode {row['decode_tps']:.2f} tok/s, prefill {row['prefill_tps']:.1f} tok/s "
            f"({row['runs']} runs, {row['seconds']:.0f} s)")
    else:
        log(f"{name}: {row['status']}: {row.get('reason')}")
    return row


def run_profile_time(ctx: Ctx, lm, row: dict) -> dict | None:
    """--profile-time for a hybrid system: the CUDA-graphed step when the runtime decodes with one (its
    real decode path), else the eager phase profiler (the CPU runtime; a failed graph capture)."""
    from hybrid_runtime.hybrid_graph import HybridGraphedDecodeStep
    n = ctx.opts.profile_tokens
    step = lm.decode_step
    ms = row.get("ms_per_token") or 100.0
    est = n * ms * 2.5 / 1e3 + 0.1 * ctx.cfg.n_layers + 3.0       # eager is slower; + the firing recompute
    if ctx.log.remaining() < est + 10:
        ctx.log.note(f"{row['system']}: --profile-time pass skipped (time budget: ~{est:.0f} s needed, "
                     f"{max(ctx.log.remaining(), 0):.0f} s left)")
        return None
    if isinstance(step, HybridGraphedDecodeStep):
        t0 = time.perf_counter()
        prof = profile_graphed_step(step, lm.model, ctx.prompt, n, lm.device)
        t1 = time.perf_counter()
        firing = prof.firing_counts()
        t2 = time.perf_counter()
        raw = prof.raw()
        raw["firing_tokens"] = min(prof.n, prof.keep)
        out = summarise_graphed_profile(raw, firing, ctx.predictor_precision, ctx.bw.get("cpu_read_GBps"),
                                        row.get("ms_per_token"))
        out["seconds"] = {"profiling_pass": round(t1 - t0, 2), "firing_recompute": round(t2 - t1, 2)}
        ctx.log(format_graphed_profile(out))
        return out
    out = PhaseProfiler(lm.model, ctx.cuda).run(lm.model, ctx.prompt, n, lm.device)
    out["kind"] = "eager"
    ctx.log(format_profile(out))
    return out


class _Points(list):
    """A list that reports every appended point (partial results are written as the sweep goes)."""

    def __init__(self, on_point):
        super().__init__()
        self.on_point = on_point

    def append(self, p) -> None:
        super().append(p)
        if self.on_point:
            self.on_point(p)


def run_sweep(ctx: Ctx, budgets: list[float], main_rows: dict, min_budget: int, on_point=None) -> list[dict]:
    """Hybrid vs layer offload across GPU budgets: 1 timed run of sweep_new_tokens each."""
    log, opts = ctx.log, ctx.opts
    points = _Points(on_point)
    saved = (ctx.budget, opts.new_tokens, opts.runs, opts.profile_time)
    try:
        opts.new_tokens, opts.runs, opts.profile_time = opts.sweep_new_tokens, 1, False
        for b in budgets:
            for name in ("hybrid", "dense-offload"):
                key = {"budget_gib": b, "system": name}
                main = main_rows.get(name)
                if main and main.get("status") == "ok" and abs(main["budget_gib"] - b) < 1e-9:
                    points.append({**key, "decode_tps": main["decode_tps"], "source": "main run"})
                    continue
                if name == "hybrid" and b * GiB < min_budget:
                    points.append({**key, "status": "skipped",
                                   "reason": f"below the hybrid minimum {min_budget / GiB:.2f} GiB"})
                    log(f"sweep {b:g} GiB {name}: skipped (below the minimum {min_budget / GiB:.2f} GiB)")
                    continue
                need = min_system_seconds(ctx, name, opts.sweep_new_tokens)
                if log.remaining() < need + 10:
                    reason = f"time budget: ~{need:.0f} s needed, {max(log.remaining(), 0):.0f} s left"
                    points.append({**key, "status": "skipped", "reason": reason})
                    log.note(f"sweep {b:g} GiB {name} skipped ({reason})")
                    continue
                ctx.budget = int(b * GiB)
                row = run_system(ctx, name, budget_s=min(max(45.0, 1.5 * need), log.remaining() - 10))
                points.append({**key, "status": row["status"], "decode_tps": row.get("decode_tps"),
                               "reason": row.get("reason"), "source": f"sweep ({row.get('new_tokens')} tokens, 1 run)",
                               "peak_gpu_gib": row.get("peak_gpu_gib"), "notes": row.get("notes", [])})
    finally:
        ctx.budget, opts.new_tokens, opts.runs, opts.profile_time = saved
    return points


# --------------------------------------------------------------------------------------- reporting


def _f(v, fmt: str = ".1f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return none
    return format(v, fmt)


def speedups(rows: list[dict]) -> dict:
    ok = {r["system"]: r for r in rows if r.get("status") == "ok"}
    base = [n for n in ok if SYSTEMS[n].baseline]
    return {n: {b: ok[n]["decode_tps"] / ok[b]["decode_tps"] for b in base if b != n and ok[b]["decode_tps"]}
            for n in ok}


def format_tables(res: dict, markdown: bool = False) -> str:
    rows = res["systems"]
    head = ["system", "budget", "prefill tok/s", "decode tok/s", "ms/token", "peak GPU GiB", "CPU RSS GiB",
            "limit tok/s", "achieved", "runs", "same tokens"]
    body = []
    for r in rows:
        if r.get("status") != "ok":
            body.append([r["system"], _f(r.get("budget_gib"), "g"), f"{r['status']}: {r.get('reason', '')}"])
            continue
        same = r.get("same_tokens_as_dense")
        peak = _f(r.get("peak_gpu_gib"), ".2f") + ("*" if r.get("peak_gpu_source") == "device-wide" else "")
        body.append([r["system"], _f(r.get("budget_gib"), "g"), _f(r["prefill_tps"]), _f(r["decode_tps"], ".2f"),
                     _f(r["ms_per_token"], ".2f"), peak, _f(r.get("cpu_rss_gib"), ".2f"),
                     _f(r.get("limit_tps")), _f(100 * r["achieved_of_limit"] if r.get("achieved_of_limit") else None,
                                                ".0f") + ("%" if r.get("achieved_of_limit") else ""),
                     str(r["runs"]), "-" if same is None else f"{same}/{r['new_tokens']}"])
    sp = res.get("speedups", {})
    bases = sorted({b for v in sp.values() for b in v}, key=list(SYSTEMS).index)
    sp_head = ["decode speedup"] + [f"vs {b}" for b in bases]
    sp_body = [[n] + [_f(sp[n].get(b), ".2f") + "x" if sp[n].get(b) else "-" for b in bases] for n in sp]
    out = [_table(head, body, markdown)]
    if bases:
        out += ["", _table(sp_head, sp_body, markdown)]
    lim_head = ["system", "GPU MB/token", "CPU MB/token", "H2D MB/token", "limit ms/token", "limit model"]
    lim_body = [[r["system"], _f(r["limit"]["gpu_bytes"] / 1e6, ".1f"), _f(r["limit"]["cpu_bytes"] / 1e6, ".1f"),
                 _f(r["limit"]["h2d_bytes"] / 1e6, ".2f"), _f(r["limit"]["ms"], ".2f"), r["limit"]["model"]]
                for r in rows if r.get("status") == "ok" and r.get("limit")]
    if lim_body:
        out += ["", _table(lim_head, lim_body, markdown)]
    sweep = res.get("sweep") or []
    if sweep:
        budgets = sorted({p["budget_gib"] for p in sweep})
        sw_body = []
        for name in ("hybrid", "dense-offload"):
            vals = {p["budget_gib"]: p for p in sweep if p["system"] == name}
            sw_body.append([name] + [_f(vals[b].get("decode_tps"), ".2f") if b in vals else "-" for b in budgets])
        out += ["", _table(["decode tok/s at budget"] + [f"{b:g} GiB" for b in budgets], sw_body, markdown)]
    return "\n".join(out)


def _table(head: list[str], body: list[list[str]], markdown: bool) -> str:
    """Rows shorter than the header are (name, budget, message) lines: skipped or failed systems."""
    full = [b for b in body if len(b) == len(head)]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(b + [""] * (len(head) - len(b))) + " |" for b in body]
        return "\n".join(lines)
    widths = [max([len(head[i])] + [len(b[i]) for b in full]) for i in range(len(head))]
    widths[0] = max([widths[0]] + [len(b[0]) for b in body])

    def row(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [row(head)]
    for b in body:
        lines.append(row(b) if len(b) == len(head) else
                     b[0].ljust(widths[0]) + "  " + b[1].rjust(widths[1]) + "  " + "  ".join(b[2:]))
    return "\n".join(lines)


def checks(res: dict) -> list[str]:
    """The issue's targets, where this run measured both sides."""
    ok = {r["system"]: r for r in res["systems"] if r.get("status") == "ok"}
    out = []

    def ratio(a, b):
        return ok[a]["decode_tps"] / ok[b]["decode_tps"]
    if "hybrid" in ok and "llamacpp-offload" in ok:
        out.append(f"hybrid vs llama.cpp at the same budget: {ratio('hybrid', 'llamacpp-offload'):.2f}x "
                   "(target >= 4.5x, goal >= 8x)")
    if "hybrid" in ok and "dense-offload" in ok:
        out.append(f"hybrid vs dense layer offload at the same budget: {ratio('hybrid', 'dense-offload'):.2f}x "
                   "(targets vs llama.cpp at the same budget: >= 4.5x, goal >= 8x)")
    if "hybrid" in ok and "llamacpp-gpu" in ok:
        out.append(f"hybrid at the budget vs llama.cpp with the whole model on the GPU: "
                   f"{ratio('hybrid', 'llamacpp-gpu'):.2f}x (goal: >= 1x)")
    if "hybrid-gpu" in ok and "llamacpp-gpu" in ok:
        out.append(f"hybrid fully on the GPU vs llama.cpp fully on the GPU: {ratio('hybrid-gpu', 'llamacpp-gpu'):.2f}x "
                   "(target >= 2x)")
    if "dense-gpu" in ok and "llamacpp-gpu" in ok:
        out.append(f"this engine dense on the GPU vs llama.cpp on the GPU: {ratio('dense-gpu', 'llamacpp-gpu'):.2f}x "
                   "(target >= 1x)")
    if "hybrid" in ok and ok["hybrid"].get("achieved_of_limit"):
        out.append(f"hybrid decode at {100 * ok['hybrid']['achieved_of_limit']:.0f}% of its physical limit "
                   "(target >= 60%)")
    if "hybrid-gpu" in ok and "dense-gpu" in ok:
        out.append(f"hybrid fully on the GPU vs this engine dense on the GPU: {ratio('hybrid-gpu', 'dense-gpu'):.2f}x "
                   "(target vs dense llama.cpp on the GPU: >= 2x)")
    if "dense-gpu" in ok and "hf-gpu" in ok:
        out.append(f"this engine dense on the GPU vs transformers generate: {ratio('dense-gpu', 'hf-gpu'):.2f}x")
    if "hybrid" in ok and "hybrid-gpu" in ok:
        out.append(f"hybrid at the budget reaches {100 * ratio('hybrid', 'hybrid-gpu'):.0f}% of hybrid fully on the GPU")
    return out


CPU_FLAGS = ("f16c", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16")


def cpu_flags(cpuinfo: str) -> dict[str, bool]:
    """The /proc/cpuinfo flags that matter to the CPU kernels (16-bit conversion, vector width)."""
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    return {f: f in flags for f in CPU_FLAGS}


def numba_runtime_info() -> dict:
    """Numba's threads and threading layer (known only after a parallel kernel ran), and which fp16
    widening the cold kernels compiled (F16C instructions or integer bit manipulation)."""
    import numba
    out = {"numba_threads": numba.get_num_threads(), "numba_max_threads": numba.config.NUMBA_NUM_THREADS}
    try:
        out["numba_threading_layer"] = numba.threading_layer()
    except ValueError:      # no parallel kernel has run yet
        out["numba_threading_layer"] = None
    from hybrid_runtime import cpu_ffn
    has = getattr(cpu_ffn, "HAS_F16C", None)
    out["numba_fp16_widening"] = None if has is None else ("F16C (vcvtph2ps)" if has else "integer bit manipulation")
    return out


def device_info(cuda: bool, work: str | None = None) -> dict:
    import transformers
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_cores": os.cpu_count(), "physical_cores": physical_cores(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    try:
        import numba
        info.update(numba=numba.__version__, numba_threads=numba.get_num_threads())
    except ImportError:
        pass
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                            if line.startswith("model name")), platform.processor())
        info["cpu_flags"] = cpu_flags(cpuinfo)
        info["ram_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 ** 2, 1)
    except (OSError, IndexError, ValueError):
        pass
    if work is not None:
        from bench.synthetic import free_bytes
        info["work_disk_free_gib"] = round(free_bytes(Path(work)) / GiB, 1)
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / GiB, 1),
                    cuda=torch.version.cuda)
    return info


def _note_cold_format(res: dict, row: dict) -> None:
    """Device info: the cold-row format the hybrid systems really used (--cold-format auto picks it)."""
    fmt = (row.get("info") or {}).get("cold_format")
    if row.get("status") == "ok" and fmt:
        rows = res["device"].setdefault("cold_rows", {"requested": res["settings"].get("cold_format"), "used": {}})
        rows["used"][row["system"]] = fmt


def result_stem(res: dict) -> str:
    dev = res["device"].get("gpu") or "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", dev.lower()).strip("-")
    return f"{slug}-{res['date']}"


def write_results(res: dict, out_dir: Path, stem: str, final: bool, log: BenchLog) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    res["log"] = log.lines[-2000:]
    res["notes"] = log.notes
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "log": out_dir / f"{stem}.log"}
    tmp = paths["json"].with_name(paths["json"].name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(paths["json"])
    paths["md"].write_text(format_markdown(res))
    paths["log"].write_text("\n".join(log.lines) + "\n")
    if final:
        png = out_dir / f"{stem}.png"
        msg = write_plot(res, png)
        if msg:
            log(msg)
        else:
            paths["png"] = png
    return paths


def format_model(m: dict) -> str:
    """The model's record as a few lines: shape, measured sparsity, predictors, pipeline settings."""
    if "synthetic" not in m:
        return f"model: {m.get('name')} ({m.get('path')})"
    sy, pr, pd, pp = m["synthetic"], m["profile"], m["predictors"], m["pipeline"]
    b = m["build"]
    n_params = 2 * sy["vocab_size"] * sy["dim"] + sy["n_layers"] * (4 * sy["dim"] ** 2 + 3 * sy["dim"] * sy["ffn_dim"])
    lines = [
        f"- {m['name']}: d={sy['dim']}, f={sy['ffn_dim']}, {sy['n_layers']} layers, {sy['n_heads']} heads, vocab "
        f"{sy['vocab_size']}, {n_params / 1e9:.2f} B parameters, fp16 (bf16-representable), act={sy['act']}; seed "
        f"{sy['seed']}; {'reused from an earlier build' if m.get('reused') else 'built in this run'} ({m['path']})",
        f"- sparsity: target {100 * (1 - sy['mean_density']):.1f}%; on the calibration text {100 * b['calibration_sparsity']:.1f}%; "
        f"measured by the profile on {pr['tokens']} other tokens {100 * pr['sparsity']:.1f}%",
        f"- frequency skew (profile): top 10% of neurons serve {100 * pr['top10']:.1f}% of activations, top 20% "
        f"{100 * pr['top20']:.1f}%" + (f", top 32% {100 * pr['top32']:.1f}%" if "top32" in pr else "")
        + f", top 50% {100 * pr['top50']:.1f}%; never-active neurons: {pr['dead']} "
        f"(sparsity profile {sy.get('sparsity_profile', 'prosparse')}: log-normal sigma {sy['freq_sigma']}; latent dim "
        f"{sy['latent_dim']}, noise {sy['noise']})",
        f"- predictors (project pipeline, time-budget settings: {pp['samples_per_layer']} samples/layer from "
        f"{pp['profile_tokens']} profiled tokens, fixed rank {pd['rank']}, {pd['max_epochs']} epochs, input "
        f"{pd['input']}): test recall {pd['recall']:.3f}, precision {pd['precision']:.3f}, predicted density "
        f"{pd['pred_density']:.3f} vs true {pd['true_density']:.3f} "
        f"({pd['pred_density'] / max(pd['true_density'], 1e-9):.2f}x); {pd['params'] / 1e6:.1f} M parameters",
        "- pipeline phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in m.get("pipeline_phases_s", {}).items()),
    ]
    return "\n".join(lines)


def format_sparsity_profile(m: dict) -> str:
    """The synthetic model's sparsity preset next to what this run measured on it."""
    from bench.synthetic import PROFILE_TARGETS
    sy, pr, pd = m["synthetic"], m["profile"], m["predictors"]
    name = sy.get("sparsity_profile", "prosparse")
    target = PROFILE_TARGETS.get(name.split("+")[0], {})
    top32 = pr.get("top32")
    lines = [f"Preset `{name}`: {target.get('source', 'custom')}; construction targets mean density "
             f"{sy['mean_density']:.3f} (sparsity {100 * (1 - sy['mean_density']):.1f}%), log-normal sigma "
             f"{sy['freq_sigma']}.",
             "",
             "| | this run's model (measured) | preset's reference figure |",
             "|---|---|---|",
             f"| activation density (profile, {pr['tokens']} unseen tokens) | {1 - pr['sparsity']:.3f} | "
             + (f"{1 - target['sparsity']:.3f}" if "sparsity" in target else "-") + " |",
             f"| predicted density (predictors mark active per token) | {pd['pred_density']:.3f} | "
             + (f"~{target['predicted_density']:.2f}" if "predicted_density" in target else "-") + " |",
             "| share of activations on the top 32% of neurons | " + (f"{top32:.3f}" if top32 is not None else "-")
             + " | " + (f"{target['top32']:.2f}" if "top32" in target else "-") + " |",
             f"| share on the top 20% | {pr['top20']:.3f} | - |", ""]
    if "predicted_density" in target:
        lines.append("PowerInfer's figures in the reference list (27.4 tok/s at 8 GiB, 66.3 tok/s on the GPU) were "
                     "measured on PowerInfer's own synthetic model with this profile, in a separate run: a comparison "
                     "with them is by profile, not side by side (different model weights, predictors and run).")
    else:
        lines.append("The reference figures below were measured in separate runs (PowerInfer on a different "
                     "sparsity profile: predictors marking ~24% active, top 32% serving 61%; run "
                     "`--sparsity-profile powerinfer` for that profile); they are not side by side with this table.")
    return "\n".join(lines)


def format_machine(dev: dict) -> str:
    flags = dev.get("cpu_flags") or {}
    cold = dev.get("cold_rows") or {}
    used = sorted(set((cold.get("used") or {}).values()))
    flag_text = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()) or "unknown"
    lines = [f"- CPU: {dev.get('cpu', '?')}, {dev.get('cpu_cores')} logical / {dev.get('physical_cores')} physical "
             f"cores, {dev.get('ram_gib')} GiB RAM; flags: {flag_text}",
             f"- Numba {dev.get('numba', '?')}: {dev.get('numba_threads')} threads "
             f"(max {dev.get('numba_max_threads')}), "
             f"threading layer {dev.get('numba_threading_layer')}; fp16 cold rows widened by "
             f"{dev.get('numba_fp16_widening')}; torch {dev.get('torch')} with {dev.get('torch_threads')} threads",
             f"- cold rows: requested {cold.get('requested', '-')}, used {', '.join(used) if used else '-'}"
             + (" (" + ", ".join(f"{k}: {v}" for k, v in cold.get("used", {}).items()) + ")" if used else ""),
             f"- GPU: {dev.get('gpu', 'none')}" + (f", {dev.get('gpu_memory_gib')} GiB, CUDA {dev.get('cuda')}"
                                                    if dev.get("gpu") else ""),
             f"- disk free in --work at the start: {dev.get('work_disk_free_gib', '?')} GiB; "
             f"Python {dev.get('python')}, transformers {dev.get('transformers')}"]
    return "\n".join(lines)


def _all_notes(res: dict) -> list[str]:
    """Every note of the run, as markdown list items: per system, per sweep point, then the run's own."""
    return [f"- {r['system']}: {n}" for r in res["systems"] for n in r.get("notes", [])] + \
        [f"- sweep {p['budget_gib']:g} GiB {p['system']}: {n}" for p in res.get("sweep") or []
         for n in p.get("notes", [])] + [f"- {n}" for n in res.get("notes", [])]


def format_markdown(res: dict) -> str:
    s = res.get("settings", {})
    m = res.get("model", {})
    notes = _all_notes(res)
    trimmed = sum("time budget" in n for n in notes)
    status = ("Run finished" if res.get("complete") else "PARTIAL (written while running)") + \
        (f"; {trimmed} item(s) shortened or skipped for the time budget (Notes)." if trimmed else ".")
    lines = [f"# Benchmark: {m.get('name', '?')} on {res['device'].get('gpu', 'CPU')} ({res['date']})", "",
             f"Prompt {s.get('prompt_tokens')} tokens, {s.get('new_tokens')} generated, batch 1, greedy, EOS ignored; "
             f"warm-up excluded; median of up to {s.get('runs')} runs; GPU budget {s.get('gpu_memory')}. {status}", "",
             format_tables(res, markdown=True), "",
             "\"same tokens\": generated tokens equal to the dense engine's before the first difference. The "
             "synthetic model's logits are random, with tiny top-1 margins: the approximate predictor mode diverges "
             "within a few tokens there, so this column checks the dense/exact systems, not the hybrid's quality.",
             "",
             "\"peak GPU GiB\": `torch.cuda.max_memory_allocated()` over the system's load and runs for this engine "
             "and transformers (tensors torch allocated, not its reserved cache); for llama.cpp (marked *), which "
             "allocates outside torch in its own child process, the device-wide use read by `nvidia-smi`: the most "
             "memory in use after loading and after each run, minus what was in use before loading (its weights, "
             "KV cache, compute buffers and CUDA context).",
             ""]
    if res.get("checks"):
        lines += ["## Targets (issue 7)", ""] + [f"- {c}" for c in res["checks"]] + [""]
    bw = res.get("bandwidth") or {}
    if bw:
        lines += ["## Bandwidths measured in this run", ""] + [f"- {k}: {_f(v, '.1f') if isinstance(v, float) else v}"
                                                             for k, v in bw.items()] + [""]
    lines += ["## Machine", "", format_machine(res.get("device", {})), ""]
    if m.get("synthetic") and m.get("profile"):
        lines += ["## Sparsity profile", "", format_sparsity_profile(m), ""]
    if m:
        lines += ["## Model", "", format_model(m), ""]
        if m.get("construction"):
            lines += ["Construction of the synthetic model (bench/synthetic.py):", "", m["construction"], ""]
    prof = [r for r in res["systems"] if r.get("profile_time")]
    for r in prof:
        pt = r["profile_time"]
        title = "CUDA-graphed step" if pt.get("kind") == "graphed" else "eager step, phase timers"
        lines += [f"## Decode time breakdown ({r['system']}, {title})", "", "```", format_any_profile(pt, True),
                  "```", ""]
    if notes:
        lines += ["## Notes", ""] + notes + [""]
    lines += ["## Reference figures (issue 7: H100 machine, 7B shape, random weights; NOT this run)", ""] + \
             [f"- {k}: {v} tok/s" for k, v in REFERENCE_FIGURES.items()] + [""]
    if res.get("phases"):
        lines += ["## Where the time went", ""] + [f"- {k}: {v:.1f} s" for k, v in res["phases"].items()] + [""]
    return "\n".join(lines)


def write_plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    ok = [r for r in res["systems"] if r.get("status") == "ok"]
    sweep = [p for p in res.get("sweep") or [] if p.get("decode_tps")]
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(13 if sweep else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    names = [r["system"] + (f"\n{r['budget_gib']:g} GiB" if r.get("budget_gib") else "") for r in ok]
    ax.bar(names, [r["decode_tps"] for r in ok], color=["tab:orange" if "hybrid" in r["system"] else "tab:blue"
                                                        for r in ok])
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{res.get('model', {}).get('name', '')}: decode, batch 1")
    ax.tick_params(axis="x", labelsize=7)
    if sweep:
        ax2 = axes[0][1]
        for name, color in (("hybrid", "tab:orange"), ("dense-offload", "tab:blue")):
            pts = sorted((p["budget_gib"], p["decode_tps"]) for p in sweep if p["system"] == name)
            if pts:
                ax2.plot(*zip(*pts), marker="o", label=name, color=color)
        ax2.set_xlabel("GPU budget (GiB)")
        ax2.set_ylabel("decode tokens/s")
        ax2.set_title("tokens/s vs GPU budget")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------- main


def _prewarm(cuda: bool, log: BenchLog) -> threading.Thread:
    """Compile the Numba kernels (and JIT-build the CUDA extension) in the background while the
    model is built: their first-use cost stays out of the pipeline's critical path."""
    def work():
        t0 = time.perf_counter()
        try:
            from hybrid_runtime.cpu_ffn import ColdFFN, ColdRows
            w = torch.randn(8, 64).to(torch.bfloat16)
            ffn = ColdFFN(ColdRows.from_torch(w, w, w, fmt="bf16"), "relu")
            x = np.random.rand(64).astype(np.float32)
            ffn.decode(x, np.arange(8, dtype=np.int32), np.empty(64, np.float32))
            ffn.batch(np.random.rand(2, 64).astype(np.float32), np.arange(8, dtype=np.int32),
                      np.empty((2, 64), np.float32))
            _parallel_sum(np.ones(16, np.float32))
            msg = f"prewarm: Numba kernels ready in {time.perf_counter() - t0:.1f} s"
            if cuda:
                from hybrid_runtime import kernels
                kernels.cuda_kernels_ready()
                msg += f"; {kernels.kernel_status()} ({time.perf_counter() - t0:.1f} s)"
            log(msg)
        except Exception as e:  # reported; the systems will hit (and report) the same problem
            log(f"prewarm failed: {type(e).__name__}: {e}")
    th = threading.Thread(target=work, name="bench-prewarm", daemon=True)
    th.start()
    return th


def _synthetic_configs(opts: BenchOptions, cuda: bool):
    """(name, SyntheticConfig, PipelineConfig) of a synthetic --model, or None for a model directory."""
    from bench.synthetic import SHAPES, shape_configs
    name = opts.model
    if name == "auto":
        name = SYNTHETIC_PREFIX + ("7b" if cuda else "small")
    if not name.startswith(SYNTHETIC_PREFIX):
        return None
    shape = name[len(SYNTHETIC_PREFIX):]
    if shape not in SHAPES:
        raise UserError(f"--model {name}: unknown synthetic shape (choose from "
                        f"{', '.join(SYNTHETIC_PREFIX + s for s in SHAPES)}, or a model directory)")
    over = dict(opts.pipeline)
    if opts.target_density is not None:
        over["mean_density"] = opts.target_density
    if opts.freq_sigma is not None:
        over["freq_sigma"] = opts.freq_sigma
    syn, pipe = shape_configs(shape, seed=opts.seed, sparsity_profile=opts.sparsity_profile, **over)
    return name, syn, pipe


def _prepare_synthetic(opts: BenchOptions, name: str, syn, pipe, cuda: bool, log: BenchLog, phases: dict,
                       before_pack=None):
    """Build (or reuse) the synthetic model -> (model record, hf_dir, dense_dir, hybrid_dir, precision)."""
    from bench.synthetic import prepare_bench_model
    log(f"model: synthetic {syn.name} (d={syn.dim}, f={syn.ffn_dim}, {syn.n_layers} layers, "
        f"{syn.n_params() / 1e9:.2f} B params), sparsity profile {syn.sparsity_profile} (mean density "
        f"{syn.mean_density}, sigma {syn.freq_sigma}); pipeline {asdict(pipe)}")

    def on_phase(n, s):
        phases[f"model: {n}"] = s
        log(f"model: {n} done in {s:.1f} s")
    bm = prepare_bench_model(syn, pipe, Path(opts.work), "cuda" if cuda else "cpu", rebuild=opts.rebuild,
                             progress=False, on_phase=on_phase, before_pack=before_pack)
    man = bm.manifest
    record = {"name": name, "path": str(bm.work), "synthetic": man["synthetic"], "pipeline": man["pipeline"],
              "construction": man["construction"], "build": man["build"],
              "profile": {k: v for k, v in man["profile"].items() if k != "layers"},
              "predictors": {k: v for k, v in man["predictors"].items() if k != "per_layer"},
              "pipeline_phases_s": man["phases"], "reused": "model: build+calibrate" not in phases}
    return record, bm.hf_dir, bm.hf_dir, bm.hybrid_dir, man["predictors"]["precision"]


def _resolve_dir(opts: BenchOptions, log: BenchLog):
    """A model directory -> (model record, hf_dir, dense_dir, hybrid_dir, prompt ids, predictor precision)."""
    from bench.synthetic import SHAPES
    path = Path(opts.model).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"--model {opts.model}: not a model directory (no config.json) and not one of "
                        f"{', '.join(SYNTHETIC_PREFIX + s for s in SHAPES)}")
    from hybrid_runtime.loading import load_tokenizer
    from hybrid_runtime.model_dir import open_model_dir
    hybrid_dir, hf_dir, precision = None, path, None
    meta = open_model_dir(path).hybrid
    if meta is not None:
        hybrid_dir = path
        src = Path(meta.raw.get("source_model", ""))
        hf_dir = src if (src / "config.json").is_file() else None
        layers = meta.raw.get("layers") or []
        precs = [lay["precision"] for lay in layers if isinstance(lay, dict) and "precision" in lay]
        precision = float(np.mean(precs)) if precs else None
        if hf_dir is None:
            log.note(f"the hybrid directory's source checkpoint {src} is not here: transformers systems are skipped, "
                     "the dense engine loads the hybrid directory")
    tok = load_tokenizer(path)
    ids = tok(PROMPT_TEXT * (1 + opts.prompt_tokens // 40), add_special_tokens=True).input_ids[:opts.prompt_tokens]
    record = {"name": path.name, "path": str(path)}
    return record, hf_dir, hf_dir or path, hybrid_dir, ids, precision


def hybrid_min_budget_for(cfg, predictor_file_bytes: int, context: int) -> int:
    """GPU bytes the hybrid needs before any FFN neuron (the placement solver's fixed part); the
    predictors are stored fp32 and run in the 16-bit model dtype (half the file)."""
    from hybrid_runtime.placement import ModelShape, solve_placement
    from hybrid_runtime.session import WORKSPACE_BYTES
    pred = predictor_file_bytes // cfg.n_layers // 2
    p = solve_placement(ModelShape.from_config(cfg), [np.zeros(cfg.ffn_dim)] * cfg.n_layers, 2 ** 62,
                        context=context, predictor_bytes=pred, workspace_bytes=WORKSPACE_BYTES)
    return int(sum(p.fixed_bytes.values()))


def hybrid_min_budget(hybrid_dir: Path, context: int) -> int:
    from hybrid_runtime.model_dir import open_model_dir
    md = open_model_dir(hybrid_dir)
    pred = md.hybrid.predictors_file
    return hybrid_min_budget_for(md.config, pred.stat().st_size if pred else 0, context)


def _check_budgets(opts: BenchOptions, systems: list[str], budget: int, cfg, min_budget: int | None) -> None:
    """UserError when --gpu-memory is below what a requested budgeted system needs (before any build)."""
    budgeted = [s for s in systems if SYSTEMS[s].budgeted]
    if "hybrid" in budgeted and min_budget is not None and budget < min_budget:
        raise UserError(f"--gpu-memory {opts.gpu_memory} is below the minimum for the hybrid on this model: "
                        f"{math.ceil(min_budget / GiB * 100) / 100:.2f} GiB (embeddings, lm_head, attention, KV cache, "
                        "predictors, workspace)")
    if budgeted and budget < offload_layers_min(cfg):
        raise UserError(f"--gpu-memory {opts.gpu_memory} is below the minimum for layer offload on this model: "
                        f"{math.ceil(offload_layers_min(cfg) / GiB * 100) / 100:.2f} GiB (embeddings, lm_head, workspace)")


def run_bench(opts: BenchOptions) -> dict:
    """The whole benchmark; returns the results dict (also written to opts.out)."""
    from hybrid_runtime.placement import parse_size
    from hybrid_runtime.session import set_threads
    log = BenchLog(opts.time_budget_s)
    cuda = torch.cuda.is_available()
    for name, v, lo in (("--prompt-tokens", opts.prompt_tokens, 2), ("--new-tokens", opts.new_tokens, 2),
                        ("--runs", opts.runs, 1), ("--sweep-new-tokens", opts.sweep_new_tokens, 2)):
        if v < lo:
            raise UserError(f"{name} must be >= {lo}, got {v}")
    systems = parse_systems(opts.systems, cuda)
    budgets = parse_budgets(opts.sweep)
    budget = parse_size(opts.gpu_memory)
    if budget <= 0:
        raise UserError(f"--gpu-memory must be positive, got {opts.gpu_memory!r}")
    if opts.cold_format not in ("auto", "bf16", "fp16", "int8"):
        raise UserError(f"--cold-format must be auto, bf16, fp16 or int8, got {opts.cold_format!r}")
    check_number("--time-budget-s", opts.time_budget_s, low=0, low_open=True)
    check_number("--target-density", opts.target_density, low=0, high=1, low_open=True, high_open=True)
    if not (opts.model == "auto" or opts.model.startswith(SYNTHETIC_PREFIX)
            or (Path(opts.model).expanduser() / "config.json").is_file()):
        raise UserError(f"--model {opts.model}: not a model directory (no config.json) and not a synthetic shape "
                        f"({SYNTHETIC_PREFIX}<shape>)")
    model_input = [("--model", opts.model)] if Path(opts.model).expanduser().exists() else []
    check_output_path(opts.out, model_input)
    check_output_path(opts.work, model_input, what="--work")
    set_threads(opts.threads)
    synthetic = _synthetic_configs(opts, cuda)
    log(f"bench: systems {', '.join(systems)}; budget {budget / GiB:g} GiB; prompt {opts.prompt_tokens}, "
        f"new {opts.new_tokens}, runs {opts.runs}; time budget {opts.time_budget_s:.0f} s; CUDA {cuda}")
    if not cuda:
        skipped = [s for s in systems if SYSTEMS[s].needs_cuda]
        if skipped:
            log(f"no CUDA: skipping the GPU systems ({', '.join(skipped)}); the CPU systems still run")
    phases: dict[str, float] = {}
    date = time.strftime("%Y-%m-%d")
    res: dict = {"format": "hybrid-bench-results", "version": 1, "date": date, "complete": False,
                 "device": device_info(cuda, opts.work), "systems": [], "phases": phases,
                 "settings": {k: v for k, v in asdict(opts).items()}}
    out_dir = Path(opts.out)
    stem = result_stem(res)
    if (out_dir / f"{stem}.json").exists() and not opts.force:
        stem += time.strftime("-%H%M%S")
    prewarm = _prewarm(cuda, log)
    try:
        return _run(opts, log, cuda, systems, budgets, budget, phases, res, stem, prewarm, synthetic)
    finally:
        prewarm.join(timeout=60)   # an early error: let the background compile finish quietly


def _run(opts: BenchOptions, log: BenchLog, cuda: bool, systems: list[str], budgets: list[float], budget: int,
         phases: dict, res: dict, stem: str, prewarm: threading.Thread, synthetic) -> dict:
    from hybrid_runtime.model_dir import open_model_dir
    out_dir = Path(opts.out)
    n_ctx = max(opts.new_tokens, opts.profile_tokens, opts.sweep_new_tokens) + 8
    rows_done: dict[str, dict] = {}      # systems run before the main loop (disk: llama.cpp before the pack)

    def ensure_bandwidths() -> None:
        """Measured once, after the background compile (it would compete for the CPU)."""
        if "bandwidth" in res:
            return
        t = time.perf_counter()
        prewarm.join()
        phases["wait for prewarm"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        nbytes = 1 * GiB if cuda else 128 * 1024 ** 2
        bw = {"cpu_read_GBps": measure_cpu_read_bw(nbytes), "cpu_read_buffer_bytes": nbytes}
        res["device"].update(numba_runtime_info())     # the threading layer is known after a parallel call
        if cuda:
            bw.update(measure_gpu_bw(1 * GiB))
            free_memory(True)
        mv = measure_cpu_matvec(cfg.dim, cfg.ffn_dim, 640 * 1024 ** 2 if cuda else 32 * 1024 ** 2)
        bw.update({f"cpu_matvec_{k}_GBps": v for k, v in mv.items()})
        cpu_dtype, cpu_gbps = pick_cpu_dtype(mv)
        bw["dense_cpu_dtype"] = cpu_dtype
        phases["bandwidths"] = round(time.perf_counter() - t, 2)
        res["bandwidth"] = bw
        write_results(res, out_dir, stem, final=False, log=log)
        log("bandwidths: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in bw.items()))
        log(f"dense CPU path: torch {cpu_dtype} matvec ({cpu_gbps:.1f} GB/s; "
            + ", ".join(f"{k} {_f(v)} GB/s" for k, v in mv.items()) + ") -> CPU layers of dense-offload/dense-cpu in "
            + cpu_dtype)
        log(f"CPU: {res['device'].get('cpu')}; numba {res['device'].get('numba_threads')} threads, threading layer "
            f"{res['device'].get('numba_threading_layer')}; fp16 widening {res['device'].get('numba_fp16_widening')}")

    def make_ctx(hf_dir, dense_dir, hybrid_dir, precision) -> Ctx:
        ensure_bandwidths()
        return Ctx(opts, log, cuda, torch.device("cuda" if cuda else "cpu"), hf_dir, dense_dir, hybrid_dir, prompt,
                   context, budget, res["bandwidth"], res["bandwidth"]["dense_cpu_dtype"], precision, cfg)

    t = time.perf_counter()
    if synthetic is not None:
        from bench.synthetic import disk_sizes, hf_config, prompt_token_ids, work_dir
        from hybrid_runtime.model import ModelConfig
        name, syn, pipe = synthetic
        cfg = ModelConfig.from_hf(hf_config(syn))
        prompt = prompt_token_ids(opts.prompt_tokens, syn.vocab_size, opts.seed)
        context = len(prompt) + n_ctx
        sizes = disk_sizes(syn, pipe)
        min_budget = hybrid_min_budget_for(cfg, sizes["hybrid"] - 2 * syn.n_params(), context)
        _check_budgets(opts, systems, budget, cfg, min_budget)
        if opts.clean_work:
            _clean_work(opts, log, keep=work_dir(syn, pipe, Path(opts.work)))

        def before_pack(bm) -> None:   # disk: run llama.cpp while only the checkpoint is on disk
            ctx0 = None
            for n in _llamacpp_before_pack(opts, cuda, systems, bm, sizes, log):
                ctx0 = ctx0 or make_ctx(bm.hf_dir, bm.hf_dir, None, None)
                rows_done[n] = _run_one(ctx0, n, systems, rows_done, phases)
                res["systems"][:] = [rows_done[s] for s in systems if s in rows_done]
                write_results(res, out_dir, stem, final=False, log=log)
            if ctx0 is not None:
                drop_gguf(ctx0, "the hybrid directory is written next and both do not fit")
        record, hf_dir, dense_dir, hybrid_dir, precision = _prepare_synthetic(opts, name, syn, pipe, cuda, log,
                                                                              phases, before_pack)
    else:
        if opts.sparsity_profile != "prosparse" or opts.target_density is not None or opts.freq_sigma is not None:
            log.note("--sparsity-profile / --target-density / --freq-sigma apply to synthetic models only: ignored")
        if opts.clean_work:
            _clean_work(opts, log, keep=None)
        record, hf_dir, dense_dir, hybrid_dir, prompt, precision = _resolve_dir(opts, log)
        cfg = open_model_dir(dense_dir).config
        context = len(prompt) + n_ctx
        min_budget = hybrid_min_budget(hybrid_dir, context) if hybrid_dir is not None else 0
        _check_budgets(opts, systems, budget, cfg, min_budget if hybrid_dir is not None else None)
    phases["model total"] = round(time.perf_counter() - t, 2)
    res["model"] = record
    ctx = make_ctx(hf_dir, dense_dir, hybrid_dir, precision)
    rows = res["systems"]
    last_llamacpp = max((i for i, s in enumerate(systems) if s.startswith("llamacpp")), default=None)
    for i, name in enumerate(systems):
        row = rows_done.get(name) or _run_one(ctx, name, systems, rows_done, phases)
        rows_done[name] = row
        rows[:] = [rows_done[s] for s in systems if s in rows_done]
        _note_cold_format(res, row)
        if i == last_llamacpp:
            drop_gguf(ctx, None)
        res["speedups"] = speedups(rows)
        res["checks"] = checks(res)
        write_results(res, out_dir, stem, final=False, log=log)
    if budgets and cuda and any(s in systems for s in ("hybrid", "dense-offload")):
        t = time.perf_counter()
        main = {r["system"]: r for r in rows}
        res["sweep"] = []

        def on_point(p):
            res["sweep"].append(p)
            write_results(res, out_dir, stem, final=False, log=log)
        run_sweep(ctx, budgets, main, min_budget, on_point)
        phases["sweep"] = round(time.perf_counter() - t, 2)
    elif budgets and not cuda:
        log("sweep skipped: needs CUDA")
    res["speedups"] = speedups(rows)
    res["checks"] = checks(res)
    res["complete"] = True
    phases["total"] = round(log.elapsed(), 2)
    paths = write_results(res, out_dir, stem, final=True, log=log)
    table = format_tables(res)
    print(format_model(res["model"]))
    print(table)
    for c in res["checks"]:
        print("check: " + c)
    log("results: " + ", ".join(str(p) for p in paths.values()))
    res["paths"] = {k: str(v) for k, v in paths.items()}
    res["table"] = table
    return res


def _run_one(ctx: Ctx, name: str, systems: list[str], rows_done: dict, phases: dict) -> dict:
    """One system of the main list under the time budget: skipped with a note when even its minimum
    (load, warm-up, one short run) would not fit; else it gets a share of what is left."""
    log = ctx.log
    spec = SYSTEMS[name]
    left = [s for s in systems if s not in rows_done]
    need = min_system_seconds(ctx, name)
    runnable = ctx.cuda or not spec.needs_cuda          # (run_system reports the others at once)
    if runnable and log.remaining() < need + 5:
        reason = f"time budget: ~{need:.0f} s needed, {max(log.remaining(), 0):.0f} s left"
        log.note(f"{name} skipped ({reason})")
        return {"system": name, "description": spec.description, "status": "skipped", "reason": reason,
                "budget_gib": ctx.budget / GiB if spec.budgeted else None, "notes": []}
    t = time.perf_counter()
    share = (log.remaining() - 10) / max(len(left), 1)    # slow systems may use more than an equal share
    row = run_system(ctx, name, budget_s=min(max(30.0, 1.6 * share), log.remaining() - 10))
    phases[f"system {name}"] = round(time.perf_counter() - t, 2)
    return row


def _clean_work(opts: BenchOptions, log: BenchLog, keep: Path | None) -> None:
    from bench.synthetic import clean_work, free_bytes
    removed = clean_work(Path(opts.work), keep)
    for path, size in removed:
        log(f"--clean-work: removed {path} ({size / GiB:.1f} GiB)")
    log(f"--clean-work: {len(removed)} cached build(s) removed; {free_bytes(Path(opts.work)) / GiB:.1f} GiB free "
        f"in {opts.work}")


def _llamacpp_before_pack(opts: BenchOptions, cuda: bool, systems: list[str], bm, sizes: dict,
                          log: BenchLog) -> list[str]:
    """The llama.cpp systems to run before the hybrid directory is written: when the checkpoint, the
    hybrid directory and the GGUF do not fit on the disk together but the GGUF fits now (13B on a
    64 GiB disk). Empty when they all fit (the normal order), or llama.cpp cannot run here anyway."""
    from bench.synthetic import free_bytes, need_with_margin
    names = [s for s in systems if s.startswith("llamacpp")]
    if not names or not cuda or importlib.util.find_spec("llama_cpp") is None \
            or importlib.util.find_spec("gguf") is None:
        return []
    free = free_bytes(bm.work)
    if free >= need_with_margin(sizes["gguf"] + sizes["hybrid"]):
        return []
    if free < need_with_margin(sizes["gguf"]):
        return []     # the export's own disk check skips them with the numbers
    log(f"disk: the GGUF ({sizes['gguf'] / GiB:.1f} GiB) and the hybrid directory ({sizes['hybrid'] / GiB:.1f} GiB) "
        f"do not both fit ({free / GiB:.1f} GiB free): running {', '.join(names)} now, before the pack, then deleting "
        "the GGUF")
    log.note(f"{', '.join(names)} ran before the hybrid directory was packed (disk), i.e. first")
    return names


def offload_layers_min(cfg, wbytes: int = 2) -> int:
    from hybrid_runtime.session import WORKSPACE_BYTES
    return cfg.vocab_size * cfg.dim * wbytes * (1 if cfg.tie_embeddings else 2) + WORKSPACE_BYTES


if __name__ == "__main__":
    from bench.cli_bench import bench
    from hybrid_runtime.errors import console_main
    console_main(bench)
