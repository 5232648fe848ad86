"""`hybrid-run info`: what a model directory holds and which kernels this machine can use."""
from __future__ import annotations

import json

import torch

from hybrid_runtime.loading import cpu_run_dtype, resolve_model
from hybrid_runtime.model import ModelConfig
from hybrid_runtime.model_dir import open_model_dir


def config_param_count(cfg: ModelConfig) -> int:
    d, f, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
    attn = d * hd * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)
    per_layer = attn + 3 * d * f + 2 * d
    emb = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return cfg.n_layers * per_layer + emb + d


def kernel_info() -> dict:
    out = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    try:
        from hybrid_runtime.kernels import kernel_status
        out["gpu_sparse_ffn"] = kernel_status()
    except ImportError as e:
        out["gpu_sparse_ffn"] = f"unavailable ({e})"
    try:
        import numba
        out["cpu_sparse_ffn"] = f"numba {numba.__version__} ({numba.config.NUMBA_NUM_THREADS} threads)"
    except ImportError:
        out["cpu_sparse_ffn"] = "numba not installed"
    return out


def model_info(name: str | None) -> dict:
    from hybrid_runtime.session import default_model_dir
    md = open_model_dir(resolve_model(name) if name else default_model_dir())
    path, cfg = md.path, md.config
    stored = str(md.dtype).replace("torch.", "")
    info: dict = {
        "path": str(path),
        "architecture": cfg.architecture,
        "parameters": f"{config_param_count(cfg) / 1e6:.2f} M",
        "layers": cfg.n_layers, "hidden": cfg.dim, "ffn": cfg.ffn_dim,
        "heads": f"{cfg.n_heads} (kv {cfg.n_kv_heads}, head dim {cfg.head_dim})",
        "vocab": cfg.vocab_size, "max_context": cfg.max_seq_len,
        "activation": cfg.activation.describe(),
        "tied_embeddings": cfg.tie_embeddings,
        "dtype": stored,
        "weight_files": len(md.weight_files),
        **({"gguf_tensor_types": ", ".join(sorted({t.tensor_type.name for t in md.gguf.tensors}))}
           if md.gguf is not None else {}),
        # what `generate`/`chat` run in by default (--dtype overrides)
        "run_dtype": {"cuda": stored, "cpu": str(cpu_run_dtype(md.dtype)).replace("torch.", "")} if not md.is_hybrid
        else {"cuda": f"{stored} (attention, predictors, hot rows)", "cpu": "float32 (attention, predictors, hot rows)",
              "cold_rows": "fp16" if stored == "float16" else "bf16"},
    }
    for meta_name in ("hybrid.json", "prosparse_report.json"):
        meta = path / meta_name
        if meta.is_file():
            info[meta_name] = _summarise(json.loads(meta.read_text()))
    info["kernels"] = kernel_info()
    return info


def _summarise(meta: dict) -> dict:
    """Top-level scalars of a metadata file (long per-layer lists are left out)."""
    return {k: v for k, v in meta.items() if not isinstance(v, (list, dict))}
