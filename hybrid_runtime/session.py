"""Opening a model for running: name -> directory -> device, dtype, threads, KV cache, tokenizer."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from collections.abc import Callable

from hybrid_runtime.errors import UserError, log
from hybrid_runtime.generate import Generator
from hybrid_runtime.gguf_reader import quantized_types
from hybrid_runtime.loading import load_model, load_tokenizer, parse_dtype, resolve_model
from hybrid_runtime.quant import (BLOCK_BYTES, block_formats, block_row_bytes, quantize_attention_and_head_,
                                  quantize_model_, weight_format)
from hybrid_runtime.model import ModelConfig
from hybrid_runtime.model_dir import ModelDir, open_model_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = REPO_ROOT / "models" / "demo"
TINY_MODEL_DIR = Path(os.environ.get("HYBRID_RUNTIME_CACHE", Path.home() / ".cache" / "hybrid-runtime")) / "tiny-random-v1"


def default_model_dir() -> Path:
    """The embedded demo model; until it is installed, a tiny random model built here, said so."""
    if (DEMO_MODEL_DIR / "config.json").is_file():
        return DEMO_MODEL_DIR
    if not (TINY_MODEL_DIR / "config.json").is_file():
        from hybrid_runtime.tiny import build_tiny_model
        build_tiny_model(TINY_MODEL_DIR, seed=0, dim=64, n_layers=2, ffn_dim=256, act="relu")
    print(f"note: no demo model installed; using a tiny RANDOM model built deterministically at "
          f"{TINY_MODEL_DIR} (its output is gibberish)", file=sys.stderr)
    return TINY_MODEL_DIR


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but CUDA is not available on this machine "
                        "(no GPU, or torch was built without CUDA); use --device cpu")
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    cores = os.cpu_count() or 1
    if not 1 <= threads <= cores:
        raise UserError(f"--threads must be between 1 and {cores} (the cores of this machine), got {threads}")
    torch.set_num_threads(threads)
    import numba
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # the cold-neuron kernels


@dataclass
class LoadedModel:
    path: Path
    config: ModelConfig
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    context: int
    mode: str                                  # dense, exact or predictor
    decode_step: Callable | None = None        # one decode step: CUDA-graph replay, or the one-call CPU step
    placement: object | None = None            # hybrid_runtime.placement.Placement, hybrid on CUDA
    dtypes: str = ""                           # which dtype each side runs in (said on stderr)

    def generator(self) -> Generator:
        return Generator(self.model, self.tokenizer, self.context, self.device,
                         eos_ids=self.config.eos_token_ids, decode_step=self.decode_step)


MODES = ("predictor", "exact", "dense")
WORKSPACE_BYTES = 512 * 1024 ** 2  # activations, cuBLAS workspace, allocator slack




def available_ram() -> int | None:
    """Bytes of RAM the kernel says a new allocation can take (MemAvailable); None where unreadable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cold_neuron_bytes(cfg: ModelConfig, cold_format: str | None) -> int:
    """CPU bytes of one cold neuron: gate, up and down rows (16-bit, int8 with an fp32 scale each, or blocks)."""
    if cold_format in BLOCK_BYTES:
        return 3 * block_row_bytes(cfg.dim, cold_format)
    return 3 * (cfg.dim + 4) if cold_format == "int8" else 3 * cfg.dim * 2


def check_fits_ram(md: ModelDir, run_dtype: torch.dtype, context: int, hybrid: bool, cold_format: str,
                   file_blocks: bool = False) -> None:
    """UserError, before loading, when a CPU run needs more RAM than is available: the weights in their run
    format (a hybrid's FFN rows as cold rows: 2 bytes, int8 ~1; every expert of an MoE layer; a GGUF file's
    kept blocks: the file, plus float32 embeddings), the predictors and the KV cache."""
    from hybrid_runtime.placement import ModelShape
    cfg = md.config
    wb = torch.finfo(run_dtype).bits // 8
    shape = ModelShape.from_config(cfg, weight_bytes=wb)
    neurons = cfg.n_layers * cfg.ffn_dim * max(cfg.n_experts, 1)
    neuron_bytes = cold_neuron_bytes(cfg, cold_format) if hybrid else shape.neuron_bytes
    emb = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) * wb
    pred = md.hybrid.predictors_file.stat().st_size if hybrid and md.hybrid.predictors_file else 0
    kv = shape.kv_cache_bytes(context)
    need = emb + shape.attention_bytes() + neurons * neuron_bytes + pred + kv
    if file_blocks:
        need = md.path.stat().st_size + cfg.vocab_size * cfg.dim * 4 + kv
    avail = available_ram()
    if avail is not None and need > avail:
        gib = 1024 ** 3
        raise UserError(f"{md.path.name}: needs ~{need / gib:.1f} GiB of RAM on the CPU ({_dtype_name(run_dtype)} weights"
                        f"{', ' + cold_format + ' cold rows' if hybrid else ''}, KV cache of {context} tokens "
                        f"{kv / gib:.2f} GiB), {avail / gib:.1f} GiB available; try --dtype bfloat16, a smaller "
                        "--context, or a machine with more memory")


def open_model(name: str | None, device: str | None = None, dtype: str | None = None,
               threads: int | None = None, context: int | None = None, mode: str | None = None,
               gpu_memory: str | None = None, hot_fraction: float | None = None,
               cold_format: str | None = None, cuda_graph: bool = True, weights: str = "auto") -> LoadedModel:
    """Open a plain HF checkpoint (dense) or a hybrid model directory (predictor/exact/dense)."""
    from hybrid_runtime.placement import parse_size
    # every flag is checked before the model is read
    if mode is not None and mode not in MODES:
        raise UserError(f"unknown mode {mode!r} (use one of: {', '.join(MODES)})")
    if context is not None and context < 2:
        raise UserError(f"--context must be >= 2, got {context}")
    if hot_fraction is not None and not 0.0 <= hot_fraction <= 1.0:
        raise UserError(f"--hot-fraction must be in [0, 1], got {hot_fraction}")
    if gpu_memory is not None:
        parse_size(gpu_memory)
    run_dtype = parse_dtype(dtype)
    block_fmt = None if weights in ("auto", "float") else weight_format(weights)
    dev = pick_device(device)
    set_threads(threads)
    md = open_model_dir(resolve_model(name) if name else default_model_dir())
    path, cfg = md.path, md.config
    ctx = context or min(cfg.max_seq_len, 4096)
    if ctx > cfg.max_seq_len:
        log(f"warning: --context {ctx} is beyond the model's max_position_embeddings "
            f"({cfg.max_seq_len}); quality may degrade")
    keep_blocks = (weights == "auto" and md.gguf is not None and dev.type == "cpu" and mode in (None, "dense")
                   and bool(quantized_types(md.gguf)))
    if block_fmt is not None or keep_blocks:
        if dev.type != "cpu":
            raise UserError("--weights: block-quantized weights run on --device cpu only (no GPU block kernels yet)")
        odd = {n: v for n, v in (("hidden_size", cfg.dim), ("intermediate_size", cfg.ffn_dim),
                                 ("attention width", cfg.n_heads * cfg.head_dim)) if v % 32}
        if block_fmt is not None and odd:
            raise UserError(f"--weights {weights}: blocks hold 32 weights, and this model's "
                            f"{', '.join(f'{n} {v}' for n, v in odd.items())} is not a multiple of 32")
        if run_dtype not in (None, torch.float32):
            log("note: --dtype applies to float weights; with block-quantized matrices the embeddings, norms "
                "and activations are float32")
    if mode in ("predictor", "exact") and not md.is_hybrid:
        raise UserError(f"{path}: --{mode} needs a hybrid model directory (hybrid.json); make one with "
                        "`hybrid-convert all`, or run this checkpoint with --dense")
    mode = mode or ("predictor" if md.is_hybrid and md.hybrid.predictors_file else
                    "exact" if md.is_hybrid else "dense")
    if dev.type == "cpu":
        from hybrid_runtime.loading import cpu_run_dtype
        hybrid = mode != "dense"
        ram_dtype = run_dtype or (cpu_run_dtype(md.dtype) if not hybrid else torch.float32)
        check_fits_ram(md, ram_dtype, ctx, hybrid, cold_format or _default_cold_format(md), file_blocks=keep_blocks)
    tokenizer = load_tokenizer(path)
    placement = None
    if mode == "dense":
        if gpu_memory or hot_fraction is not None:
            log("note: --gpu-memory / --hot-fraction apply to the hybrid modes; --dense loads the whole model "
                f"on {dev}")
        if keep_blocks:
            from hybrid_runtime.loading import load_block_model
            model = load_block_model(md)
        else:
            model = load_model(md, device=dev, dtype=run_dtype)   # the checkpoint's dtype (as the RAM check assumed)
            if block_fmt is not None:
                quantize_model_(model, block_fmt)     # a matrix at a time in fp32
                model.float()                         # what is left (embeddings, norms, biases): float32
        dtypes = f"dtype: {_dtype_name(model.tok_embeddings.weight.dtype)} on {dev.type}"
        if block_fmt is not None or keep_blocks:
            dtypes += (f"; matrices as {'/'.join(sorted(block_formats(model)))} blocks"
                       f"{' (as in the GGUF file)' if keep_blocks else ''}, embeddings and norms float")
    else:
        from hybrid_runtime.hybrid import build_hybrid_model
        if run_dtype is None:
            # the GPU runs the checkpoint's dtype; on the CPU torch's matmuls are fastest in fp32
            run_dtype = md.dtype if dev.type == "cuda" else torch.float32
        fmt = cold_format or block_fmt or _default_cold_format(md)
        if fmt in BLOCK_BYTES and dev.type != "cpu":
            raise UserError(f"--cold-format {fmt}: block cold rows are read on the CPU only (no GPU block kernels "
                            "yet): use --device cpu, or bf16/fp16/int8")
        hot_counts, placement = plan_hot_counts(md, dev, ctx, gpu_memory, hot_fraction, fmt, run_dtype)
        model = build_hybrid_model(md, hot_counts, dev, dtype=run_dtype, mode=mode, cold_format=fmt)
        if block_fmt is not None:        # attention and lm_head as blocks too (the cold rows are `fmt`)
            quantize_attention_and_head_(model, block_fmt)
        dtypes = (f"dtype: {_dtype_name(run_dtype)} on {dev.type} (attention, predictors, hot rows); "
                  f"cold rows {fmt} on the CPU (stored {_dtype_name(md.dtype)})"
                  + (f"; attention and lm_head as {block_fmt} blocks" if block_fmt else ""))
    model.setup_cache(max_batch=1, max_seq_len=ctx)
    model_dtype = model.tok_embeddings.weight.dtype
    decode_step = None
    if dev.type == "cuda" and cuda_graph and cfg.n_experts:
        log("note: a mixture-of-experts decode step is not captured as CUDA graphs yet (its routing is read on "
            "the host); decoding eagerly")
    elif dev.type == "cuda" and cuda_graph and _capturable(model):
        from hybrid_runtime.cuda_graph import GraphedDecodeStep
        decode_step = GraphedDecodeStep(model, dev, warmup_pos=ctx - 1)
    elif dev.type == "cuda" and cuda_graph:  # hybrid with cold rows: per-layer graphs around the CPU half
        from hybrid_runtime.hybrid_graph import HybridGraphedDecodeStep
        try:
            decode_step = HybridGraphedDecodeStep(model, dev, warmup_pos=ctx - 1)
        except RuntimeError as e:
            log(f"note: CUDA graph capture of the hybrid decode step failed ({str(e).splitlines()[0]}); "
                "decoding eagerly (slower). Please report this.")
    elif dev.type == "cpu":
        from hybrid_runtime.cpu_decode import cpu_decode_step
        decode_step = cpu_decode_step(model)
    return LoadedModel(path, cfg, model, tokenizer, dev, model_dtype, ctx, mode, decode_step, placement, dtypes)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _capturable(model: torch.nn.Module) -> bool:
    """A decode step can be captured when no layer needs the CPU (no cold rows)."""
    return all(getattr(layer.ffn, "cold", None) is None for layer in model.layers)


def _default_cold_format(md: ModelDir) -> str:
    """Cold rows keep the checkpoint's 16-bit type (no rounding); fp32 checkpoints go to bf16."""
    return "fp16" if md.dtype == torch.float16 else "bf16"


def plan_hot_counts(md: ModelDir, dev: torch.device, context: int, gpu_memory: str | None,
                    hot_fraction: float | None, cold_format: str | None, run_dtype: torch.dtype):
    """Hot neurons per layer: from --hot-fraction, else (CUDA) the placement solver under the GPU
    budget (default: the GPU's free memory), else (CPU) none: every FFN neuron goes through the
    Numba sparse kernel."""
    from hybrid_runtime.placement import ModelShape, format_placement, parse_size, solve_placement
    cfg, meta = md.config, md.hybrid
    def every_layer(k: int) -> list:
        return [[k] * cfg.n_experts if cfg.n_experts else k for _ in range(cfg.n_layers)]

    if hot_fraction is not None:
        return every_layer(int(round(cfg.ffn_dim * hot_fraction))), None
    if dev.type != "cuda":
        if gpu_memory:
            log("note: --gpu-memory is ignored on --device cpu (no GPU): all FFN neurons run on the CPU")
        return every_layer(0), None
    free, _ = torch.cuda.mem_get_info(dev)
    budget = parse_size(gpu_memory) if gpu_memory else int(free * 0.9)
    if budget > free:
        log(f"warning: --gpu-memory {gpu_memory} is more than the GPU's free memory "
            f"({free / 1024 ** 3:.2f} GiB); using what is free")
        budget = int(free * 0.95)
    wbytes = torch.finfo(run_dtype).bits // 8
    pred_bytes = meta.predictors_file.stat().st_size // cfg.n_layers if meta.predictors_file else 0
    pred_bytes = pred_bytes * wbytes // 4  # stored fp32, run in the model dtype
    cpu_per_neuron = cold_neuron_bytes(cfg, cold_format)
    placement = solve_placement(ModelShape.from_config(cfg, weight_bytes=wbytes), meta.frequencies(), budget,
                                context=context, predictor_bytes=pred_bytes, workspace_bytes=WORKSPACE_BYTES,
                                cpu_bytes_per_neuron=cpu_per_neuron)
    log(format_placement(placement))
    return placement.hot_counts, placement
