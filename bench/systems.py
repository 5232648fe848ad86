"""The benchmarked systems: how each is built, run and timed (dense, hybrid, layer offload, transformers,
llama.cpp), and the budget sweep."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hybrid_runtime.errors import UserError
from bench.options import BLOCK_CPU_FORMATS, CPU_FORMATS, BenchLog, BenchOptions, GiB, REPO, SYSTEMS
from bench.limits import (Limit, _proc_status, free_memory, kv_read_bytes, param_bytes, reset_peak_rss,
                          sequential_limit)
from bench.step_profile import (FiringCounter, PhaseProfiler, SelectionCounter, _decode_loop, format_graphed_profile,
                                format_profile, profile_graphed_step, summarise_graphed_profile)

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
                 "hybrid-cpu": 1.0, "hybrid-cpu-exact": 1.0, "hf-cpu": 0.5}
DECODE_MS_PER_GB = {"dense-gpu": 0.63, "hybrid": 1.64, "dense-offload": 12.3, "hybrid-gpu": 0.49, "hf-gpu": 2.2,
                    "hf-offload": 68.0, "llamacpp-gpu": 0.52, "llamacpp-offload": 4.1, "llamacpp-cpu": 10.0,
                    "dense-cpu": 30.0,
                    "hybrid-cpu": 30.0, "hybrid-cpu-exact": 30.0, "hf-cpu": 60.0}
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
    if name.startswith("llamacpp") and ctx.hf_dir is not None and \
            not gguf_path(ctx, gguf_type(ctx, name == "llamacpp-cpu")).is_file():
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
    # one embedding row is read; a tied lm_head is the same tensor, read whole (a block lm_head is its own
    # tensor: the float embeddings are then one row); an MoE layer reads top-k experts
    emb_is_head = cfg.tie_embeddings and getattr(model.output, "weight", None) is model.tok_embeddings.weight
    experts = getattr(model.layers[0].ffn, "experts", None)   # float or block experts: their own bytes
    unrouted = 0 if experts is None else cfg.n_layers * (len(experts) - cfg.experts_per_token) * param_bytes(experts[0])
    weights = param_bytes(model) - (0 if emb_is_head else model.tok_embeddings.weight.numel() * elem) - unrouted
    kv = kv_read_bytes(cfg, len(ctx.prompt) + ctx.opts.new_tokens / 2, elem)
    if where == "gpu":
        return sequential_limit(weights + kv, 0, 0, ctx.bw, "weights + KV / GPU bw")
    return sequential_limit(0, weights + kv, 0, ctx.bw, "weights + KV / CPU bw")


def build_dense_gpu(ctx: Ctx):
    lm = _open(ctx, ctx.dense_dir, "cuda", mode="dense")
    info = {"dtype": str(lm.dtype).replace("torch.", ""), "cuda_graph": lm.decode_step is not None}
    return EngineRunner(lm.model, lm.tokenizer, lm.device, lm.context, lm.decode_step), info, \
        _dense_limit(ctx, lm.model, "gpu")


def unrouted_expert_bytes(cfg, elem: int) -> int:
    """Bytes of the experts a token is not routed to (mixture of experts; 0 for a dense model)."""
    n_experts = getattr(cfg, "n_experts", 0)
    if not n_experts:
        return 0
    return cfg.n_layers * (n_experts - cfg.experts_per_token) * 3 * cfg.dim * cfg.ffn_dim * elem


def _decode_info(lm) -> str:
    """How a loaded model decodes: its decode step's own description, or the eager forward."""
    return "torch (eager)" if lm.decode_step is None else lm.decode_step.describe()


def cpu_format_dtype(ctx: Ctx) -> str:
    """The torch dtype of this engine's CPU-only systems (--cpu-format)."""
    return CPU_FORMATS[ctx.opts.cpu_format]


def build_dense_cpu(ctx: Ctx):
    fmt = ctx.opts.cpu_format
    if fmt in BLOCK_CPU_FORMATS:
        lm = _open(ctx, ctx.dense_dir, "cpu", mode="dense", weights=fmt)
    else:
        lm = _open(ctx, ctx.dense_dir, "cpu", mode="dense", dtype=cpu_format_dtype(ctx))
    info = {"dtype": str(lm.dtype).replace("torch.", "") + (f", matrices {fmt} blocks" if fmt in BLOCK_CPU_FORMATS else ""),
            "decode": _decode_info(lm)}
    return EngineRunner(lm.model, lm.tokenizer, lm.device, lm.context, lm.decode_step), info, \
        _dense_limit(ctx, lm.model, "cpu")


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


def _hybrid_limit(ctx: Ctx, lm, counts: list[tuple], gpu: bool) -> Limit:
    """Per layer: attention + predictor + norms on the GPU, then max(hot rows / GPU bw, cold rows / CPU bw).
    counts per layer: (hot selected, cold selected) in predictor mode, a selected neuron costing its gate row
    and, at the predictors' precision, its up and down rows; (0, cold rows, firing cold rows) in exact mode."""
    model, cfg = lm.model, ctx.cfg
    if cfg.n_experts:   # the selection counters and this byte model know one FFN per layer
        return Limit(model="none yet for the hybrid mixture of experts")
    bw = ctx.bw
    prec = ctx.predictor_precision if ctx.predictor_precision is not None else 1.0
    rows_per_selected = 1 + 2 * prec     # gate always; up + down when it fires
    elem = model.tok_embeddings.weight.element_size()
    gpu_bw = bw["gpu_copy_GBps"] * 1e9 if gpu else None
    cpu_bw = bw["cpu_read_GBps"] * 1e9
    fixed = param_bytes(model.output) + param_bytes(model.norm)      # lm_head: float or blocks
    kv = kv_read_bytes(cfg, len(ctx.prompt) + ctx.opts.new_tokens / 2, elem)
    gpu_bytes, cpu_bytes, secs = fixed + kv, 0.0, 0.0
    for c, layer in zip(counts or [(0.0, 0.0)] * cfg.n_layers, model.layers):
        hot_sel, cold_sel = c[0], c[1]
        fired = c[2] if len(c) > 2 else None
        ffn = layer.ffn
        seq = param_bytes(layer.attn) + param_bytes(layer.attn_norm) + param_bytes(ffn.norm)
        seq += param_bytes(ffn.predictor) if hasattr(ffn, "predictor") else 0
        hot = hot_sel * rows_per_selected * cfg.dim * elem
        cold_row = ffn.cold.cold.row_bytes if getattr(ffn, "cold", None) is not None else cfg.dim * 2
        cold = (cold_sel + 2 * fired if fired is not None else cold_sel * rows_per_selected) * cold_row
        gpu_bytes += seq + hot
        cpu_bytes += cold
        if gpu:
            secs += seq / gpu_bw + max(hot / gpu_bw, cold / cpu_bw + (2 * cfg.dim * 4 / (bw["h2d_GBps"] * 1e9)
                                                                        if cold else 0.0))
        else:
            secs += (seq + hot + cold) / cpu_bw
    secs += (fixed + kv) / (gpu_bw or cpu_bw)
    rows = ("every gate row + up/down rows of the firing neurons" if lm.mode == "exact" else
            f"{rows_per_selected:.2f} rows per selected neuron (precision {prec:.2f})")
    return Limit(gpu_bytes if gpu else 0.0, cpu_bytes if gpu else gpu_bytes + cpu_bytes, 0.0, 1e3 * secs,
                 f"per layer attn+pred, then max(hot/GPU, cold/CPU); {rows}")


def _hybrid_info(lm, counts) -> dict:
    cfg = lm.config
    info = {"mode": lm.mode, "decode": _decode_info(lm), "dtype": str(lm.dtype).replace("torch.", "")}
    p = lm.placement
    if p is not None:
        info.update({"hot_fraction": p.hot_fraction, "gpu_share_expected": p.gpu_share,
                     "gpu_bytes_planned": p.gpu_bytes, "cpu_bytes": p.cpu_bytes})
    ffns = [layer.ffn for layer in lm.model.layers]
    if cfg.n_experts:       # HybridMoEFFN: a hot prefix and cold rows per expert
        info["hot_neurons"] = int(sum(sum(ffn.n_hot) for ffn in ffns))
        info["hot_path"] = "torch (mixture of experts)"
        cold = [c for ffn in ffns for c in ffn.cold if c is not None]
    else:
        hot = [getattr(ffn, "hot_gate", None) for ffn in ffns]
        info["hot_neurons"] = int(sum(h.shape[0] for h in hot if h is not None))
        info["hot_path"] = getattr(getattr(ffns[0], "hot_ffn", None), "__name__", "?")
        cold = [c for c in (getattr(ffn, "cold", None) for ffn in ffns) if c is not None]
    info["ffn_neurons"] = cfg.layer_neurons * cfg.n_layers
    if cold:
        info["cold_format"] = cold[0].cold.fmt
    if lm.device.type == "cuda":
        from hybrid_runtime import kernels
        info["kernels"] = kernels.kernel_status()
    if counts:
        info["selected_hot_per_token"] = float(sum(c[0] for c in counts))
        info["selected_cold_per_token"] = float(sum(c[1] for c in counts))
        if len(counts[0]) > 2:
            info["firing_cold_per_token"] = float(sum(c[2] for c in counts))
    return info


def _selection_counts(ctx: Ctx, lm) -> list[tuple]:
    counter = FiringCounter(lm.model) if lm.mode == "exact" else SelectionCounter(lm.model)
    if not counter.layers:
        return []
    _decode_loop(lm.model, ctx.prompt, 8, lm.device, after_prefill=counter.reset)   # decode tokens only
    return counter.restore()


def build_hybrid(ctx: Ctx, budget: int | None = None, full_gpu: bool = False, device: str = "cuda",
                 mode: str = "predictor"):
    cold_format = None if ctx.opts.cold_format == "auto" else ctx.opts.cold_format
    if device == "cpu" and ctx.opts.cpu_format in BLOCK_CPU_FORMATS:   # attention, lm_head and cold rows as blocks
        fmt = ctx.opts.cpu_format
        lm = _open(ctx, ctx.hybrid_dir, "cpu", mode=mode, cold_format=cold_format or fmt, weights=fmt)
    elif device == "cpu":
        lm = _open(ctx, ctx.hybrid_dir, "cpu", mode=mode, cold_format=cold_format, dtype=cpu_format_dtype(ctx))
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
    tied = model.get_output_embeddings().weight is emb     # then the lm_head reads it whole
    for p in model.parameters():
        if p is emb and not tied:
            continue
        nb = p.numel() * p.element_size()
        if p.device.type == "cuda":
            gpu_w += nb
        else:
            cpu_w += nb
    elem = emb.element_size()
    unrouted = unrouted_expert_bytes(ctx.cfg, elem)  # MoE: experts a token does not read (off the side holding them)
    if cpu_w >= unrouted:
        cpu_w -= unrouted
    else:
        gpu_w -= unrouted
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
        kw = {"dtype": getattr(torch, cpu_format_dtype(ctx))}   # the same format as the engine's CPU systems
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


def gguf_type(ctx: Ctx, cpu_only: bool = True) -> str:
    """The GGUF weight type llama.cpp runs: on the CPU alone --cpu-format's (F32 for f32, the block format for
    q8_0 / q4_0 / q4_1), else F16."""
    fmt = ctx.opts.cpu_format
    if (cpu_only or not ctx.cuda) and fmt in BLOCK_CPU_FORMATS:
        return fmt
    return "f32" if (cpu_only or not ctx.cuda) and fmt == "f32" else "f16"


def gguf_weight_bytes(kind: str) -> float:
    """Bytes a weight of a GGUF of `kind` (f32, f16, or a block format: its scales included)."""
    from hybrid_runtime.quant import BLOCK, BLOCK_BYTES
    return {"f32": 4, "f16": 2}.get(kind) or BLOCK_BYTES[kind] / BLOCK


def gguf_path(ctx: Ctx, kind: str = "f16") -> Path:
    """Where the `kind` (f16/f32) GGUF of ctx.hf_dir lives: beside the checkpoint when it is in the bench
    work dir, else under <work>/gguf/."""
    hf = ctx.hf_dir.resolve()
    work = Path(ctx.opts.work).expanduser().resolve()
    if work in hf.parents:
        return hf.parent / "llamacpp" / f"model-{kind}.gguf"
    return work / "gguf" / f"{hf.name}-{hashlib.sha1(str(hf).encode()).hexdigest()[:10]}-{kind}.gguf"


def drop_gguf(ctx: Ctx, reason: str | None) -> None:
    """Delete the exported GGUF (after the llama.cpp systems): always when `reason` is given, else
    only when the disk is short, i.e. another file of its size would not fit any more."""
    if ctx.hf_dir is None:
        return
    for kind in ("f16", "f32", *BLOCK_CPU_FORMATS):
        _drop_gguf(ctx, gguf_path(ctx, kind), reason)


def _drop_gguf(ctx: Ctx, out: Path, reason: str | None) -> None:
    from bench.synthetic import free_bytes, need_with_margin
    if not out.is_file():
        return
    size, free = out.stat().st_size, free_bytes(out.parent)
    if reason is None and free >= need_with_margin(size):
        return
    out.unlink()
    out.with_name(out.name + ".source.json").unlink(missing_ok=True)
    why = reason or f"disk short: {free / GiB:.1f} GiB free"
    ctx.log(f"llama.cpp: deleted {out} ({size / GiB:.1f} GiB; {why})")


def llamacpp_gguf(ctx: Ctx, kind: str = "f16") -> Path:
    """The `kind` (f16/f32) GGUF of ctx.hf_dir, exported once and cached (gguf_path). Re-exported when the
    checkpoint's files change. _Skip when the disk or the time budget cannot take the export."""
    from bench.gguf_export import export_gguf
    from bench.synthetic import free_bytes, need_with_margin
    hf = ctx.hf_dir.resolve()
    out = gguf_path(ctx, kind)
    srcs = sorted(p for p in hf.iterdir() if p.suffix in (".json", ".safetensors"))
    fingerprint = {"source": str(hf), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in srcs}}
    stamp = out.with_name(out.name + ".source.json")
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == fingerprint:
        ctx.log(f"llama.cpp: reusing {out} ({out.stat().st_size / GiB:.2f} GiB)")
        return out
    need, free = dense_weight_bytes(ctx.cfg, gguf_weight_bytes(kind)), free_bytes(out.parent)
    if free < need_with_margin(need):
        raise _Skip(f"not enough disk for the {kind} GGUF: needs {need_with_margin(need) / GiB:.1f} GiB, "
                    f"{free / GiB:.1f} GiB free in {out.parent}")
    est = GGUF_EXPORT_S_PER_GB * need / 1e9
    if ctx.log.remaining() < est + 20:
        raise _Skip(f"time budget: the GGUF export needs ~{est:.0f} s, {max(ctx.log.remaining(), 0):.0f} s left")
    t0 = time.perf_counter()
    ctx.log(f"llama.cpp: exporting {hf} to an {kind} GGUF at {out}")
    export_gguf(hf, out, kind)
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
    kind = gguf_type(ctx, cpu_only)
    path = llamacpp_gguf(ctx, kind)
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
            "dtype": kind,
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
    # bytes per token: weights (one embedding row) + KV cache (f16 either way); GPU layers / GPU bw, the rest / CPU bw
    wb = gguf_weight_bytes(kind)
    routed = max(getattr(cfg, "experts_per_token", 0), 1)   # MoE: the top-k experts and the router
    per_layer = wb * (2 * cfg.dim * cfg.n_heads * cfg.head_dim + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim
                     + routed * 3 * cfg.dim * cfg.ffn_dim + getattr(cfg, "n_experts", 0) * cfg.dim + 2 * cfg.dim)
    out_bytes = wb * (cfg.vocab_size * cfg.dim + cfg.dim)
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
    "hybrid-cpu-exact": lambda ctx: build_hybrid(ctx, device="cpu", mode="exact"),
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
