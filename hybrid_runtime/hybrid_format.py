"""Writing a hybrid model directory: versioned, self-describing, neurons sorted most-frequent-first.

The layout is documented in model_dir.py, which reads it. Any GPU budget is then a per-layer
prefix: hot = rows [0, k_l), cold = rows [k_l, f) (a mixture of experts: a prefix per expert, k_le). The format name and version are also in
model.safetensors' header metadata.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from hybrid_runtime import __version__
from hybrid_runtime.errors import UserError
from hybrid_runtime.loading import load_model, load_tokenizer
from hybrid_runtime.model_dir import FORMAT_NAME, FORMAT_VERSION, open_model_dir
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


def frequency_order(freq: np.ndarray) -> np.ndarray:
    """Neuron order most-frequent-first; ties keep the original order (stable, deterministic)."""
    return np.argsort(-np.asarray(freq, dtype=np.float64), kind="stable")


def pack_hybrid_model(source_dir: Path, out_dir: Path, frequencies: list[np.ndarray],
                      predictors=None, calibration: dict | None = None,
                      layer_stats: list[dict] | None = None) -> Path:
    """Write a hybrid model directory from an HF checkpoint, per-layer neuron frequencies
    (original neuron order) and optionally a `hybrid_runtime.predictor.PredictorSet` (original order)."""
    from safetensors.torch import save_file

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    src = open_model_dir(source_dir)
    hf_cfg = src.hf_config
    src_dtype = src.dtype
    model = load_model(src, device="cpu", dtype=src_dtype)   # the checkpoint's own dtype, bit for bit
    cfg = model.config
    activity = (calibration or {}).get("activity") or {"kind": "exact_zero"}
    magnitude = activity.get("kind") == "magnitude"
    if not cfg.activation.has_exact_zeros and not magnitude:
        raise UserError(f"{source_dir}: the model uses SiLU (no exact zeros); profile it with --cett (magnitude "
                        "sparsity) or convert it with `hybrid-convert prosparse` first")
    if magnitude and cfg.n_experts:
        raise UserError(f"{source_dir}: magnitude (CETT) activity is for one dense FFN per layer; this model has "
                        f"{cfg.n_experts} experts")
    if magnitude:
        eps = activity.get("magnitude_thresholds")
        if cfg.act != "silu":
            raise UserError(f"{source_dir}: magnitude (CETT) activity is for SiLU models; this one is {cfg.act}")
        if not isinstance(eps, list) or len(eps) != cfg.n_layers:
            raise UserError(f"profile: magnitude activity needs {cfg.n_layers} per-layer thresholds, got {eps!r}")
    if len(frequencies) != cfg.n_layers:
        raise UserError(f"profile has {len(frequencies)} layers but the model has {cfg.n_layers}")
    state = {n: t.to(src_dtype) if t.is_floating_point() else t for n, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
    if magnitude:
        # |a_i| * ||down_i|| is neuron i's output magnitude; store up_i * ||down_i|| and down_i / ||down_i||
        # (the same function: a is linear in u) so that |a_i| itself is compared with the layer's eps
        for i in range(cfg.n_layers):
            up, down = state[f"layers.{i}.ffn.up"], state[f"layers.{i}.ffn.down"]
            norm = down.double().norm(dim=1, keepdim=True)                           # (f, 1)
            safe = torch.where(norm > 0, norm, torch.ones_like(norm))
            state[f"layers.{i}.ffn.up"] = (up.double() * norm).to(up.dtype)
            state[f"layers.{i}.ffn.down"] = (down.double() / safe).to(down.dtype)
    stats: dict[str, torch.Tensor] = {}
    f = cfg.ffn_dim
    for i, freq in enumerate(frequencies):
        if len(freq) != cfg.layer_neurons:
            raise UserError(f"profile layer {i} has {len(freq)} neurons but the model has {cfg.layer_neurons}")
        # a mixture of experts: each expert's rows sorted on their own (the router picks whole experts), the
        # layer's order expert-major as the profile numbers them
        prefixes = ([f"layers.{i}.ffn.experts.{e}." for e in range(cfg.n_experts)] if cfg.n_experts
                    else [f"layers.{i}.ffn."])
        order = np.concatenate([e * f + frequency_order(freq[e * f:(e + 1) * f]) for e in range(len(prefixes))])
        perm = torch.from_numpy(order)
        for e, prefix in enumerate(prefixes):
            for part in ("gate", "up", "down"):
                state[prefix + part] = state[prefix + part][perm[e * f:(e + 1) * f] - e * f].contiguous()
        stats[f"layers.{i}.frequency"] = torch.from_numpy(np.asarray(freq, np.float32)[order].copy())
        stats[f"layers.{i}.source_index"] = perm.clone()
        if predictors is not None:
            predictors.permute_neurons(i, perm)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"), metadata=header)
    save_file(stats, str(out_dir / "neuron_stats.safetensors"), metadata=header)
    if predictors is not None:
        predictors.save(out_dir / "predictors.safetensors")
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if source_dir.is_file():   # a GGUF file: its tokenizer and chat template, as transformers builds them
        load_tokenizer(source_dir).save_pretrained(str(out_dir))
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out_dir / name)
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "created_by": f"hybrid-runtime {__version__}",
        "source_model": str(source_dir), "architecture": cfg.architecture,
        "activation": cfg.act, "threshold": cfg.act_threshold,
        # which neurons are active: exact zeros of the activation, or |a| above a per-layer cut (CETT)
        "activity": ({"kind": "magnitude", "cett": activity.get("cett"), "thresholds": [float(e) for e in eps],
                      "rows": "up scaled by ||down||, down unit-norm"} if magnitude else {"kind": "exact_zero"}),
        "n_layers": cfg.n_layers, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "n_experts": cfg.n_experts,
        "dtype": str(src_dtype).replace("torch.", ""),
        "weights": "model.safetensors", "neuron_stats": "neuron_stats.safetensors",
        "predictors": "predictors.safetensors" if predictors is not None else None,
        "predictor_input": getattr(predictors, "input_kind", None),
        "calibration": calibration or {},
        "mean_sparsity": float(np.mean([1 - np.mean(f) for f in frequencies])),
        "layers": layer_stats or [{"sparsity": float(1 - np.mean(f))} for f in frequencies],
    }
    (out_dir / "hybrid.json").write_text(json.dumps(meta, indent=2))
    return out_dir
