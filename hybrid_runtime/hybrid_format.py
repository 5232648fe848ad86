"""The hybrid model directory: versioned, self-describing, neurons sorted most-frequent-first.

    hybrid.json               format name + version, source, activation, per-layer statistics
    config.json, tokenizer*   copied from the source checkpoint
    model.safetensors         native tensor names (see loading.HF_TO_NATIVE), FFN rows permuted
                              per layer by activation frequency (descending); gate/up/down (f, d)
    neuron_stats.safetensors  layers.{i}.frequency (f,) fp32 sorted descending,
                              layers.{i}.source_index (f,) int64: original neuron of each row
    predictors.safetensors    predictors/model.py format, outputs in the permuted order

Any GPU budget is then a per-layer prefix: hot = rows [0, k_l), cold = rows [k_l, f).
The format name and version are also in model.safetensors' header metadata.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybrid_runtime import __version__
from hybrid_runtime.errors import UserError

FORMAT_NAME = "hybrid-runtime-model"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


@dataclass
class HybridMeta:
    path: Path
    raw: dict

    @property
    def n_layers(self) -> int:
        return int(self.raw["n_layers"])

    @property
    def predictors_file(self) -> Path | None:
        name = self.raw.get("predictors")
        return self.path / name if name else None

    def frequencies(self) -> list[np.ndarray]:
        """Per layer (f,) activation frequencies, sorted descending (the stored neuron order)."""
        from safetensors.numpy import load_file
        stats = self.path / self.raw["neuron_stats"]
        if not stats.is_file():
            raise UserError(f"{stats}: missing (listed in hybrid.json)")
        data = load_file(str(stats))
        return [data[f"layers.{i}.frequency"] for i in range(self.n_layers)]


def is_hybrid_dir(path: Path) -> bool:
    return (Path(path) / "hybrid.json").is_file()


def read_hybrid_meta(path: Path) -> HybridMeta:
    meta_path = Path(path) / "hybrid.json"
    try:
        raw = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{meta_path}: unreadable ({e})") from None
    if raw.get("format") != FORMAT_NAME:
        raise UserError(f"{meta_path}: not a hybrid model directory (format {raw.get('format')!r})")
    version = raw.get("version")
    if version != FORMAT_VERSION:
        raise UserError(f"{meta_path}: format version {version!r} is not supported by this runtime "
                        f"(it reads version {FORMAT_VERSION}); re-run `hybrid-convert pack`")
    for key in ("n_layers", "weights", "neuron_stats"):
        if key not in raw:
            raise UserError(f"{meta_path}: field {key!r} missing")
    meta = HybridMeta(Path(path), raw)
    if meta.predictors_file is not None and not meta.predictors_file.is_file():
        raise UserError(f"{meta.predictors_file}: missing (listed in hybrid.json); re-run "
                        "`hybrid-convert pack` with --predictors, or run with --exact")
    return meta


def frequency_order(freq: np.ndarray) -> np.ndarray:
    """Neuron order most-frequent-first; ties keep the original order (stable, deterministic)."""
    return np.argsort(-np.asarray(freq, dtype=np.float64), kind="stable")


def pack_hybrid_model(source_dir: Path, out_dir: Path, frequencies: list[np.ndarray],
                      predictors=None, calibration: dict | None = None,
                      layer_stats: list[dict] | None = None) -> Path:
    """Write a hybrid model directory from an HF checkpoint, per-layer neuron frequencies
    (original neuron order) and optionally a `predictors.model.PredictorSet` (original order)."""
    from safetensors.torch import save_file

    from hybrid_runtime.loading import checkpoint_dtype, checkpoint_files, load_model, read_config

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    hf_cfg = read_config(source_dir)
    # Keep the checkpoint's own dtype, bit for bit. load_model runs float16 as bfloat16 on the CPU
    # (a lossy cast), so float16 goes through float32 (exact) and is cast back below.
    src_dtype = checkpoint_dtype(checkpoint_files(source_dir))
    model = load_model(source_dir, device="cpu",
                       dtype=torch.float32 if src_dtype == torch.float16 else src_dtype)
    cfg = model.config
    if cfg.act == "silu":
        raise UserError(f"{source_dir}: the model uses SiLU (no exact zeros); convert it with "
                        "`hybrid-convert prosparse` first")
    if len(frequencies) != cfg.n_layers:
        raise UserError(f"profile has {len(frequencies)} layers but the model has {cfg.n_layers}")
    state = {n: t.to(src_dtype) if t.is_floating_point() else t for n, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
    stats: dict[str, torch.Tensor] = {}
    for i, freq in enumerate(frequencies):
        if len(freq) != cfg.ffn_dim:
            raise UserError(f"profile layer {i} has {len(freq)} neurons but the model has {cfg.ffn_dim}")
        order = frequency_order(freq)
        perm = torch.from_numpy(order)
        for part in ("gate", "up", "down"):
            key = f"layers.{i}.ffn.{part}"
            state[key] = state[key][perm].contiguous()
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
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out_dir / name)
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "created_by": f"hybrid-runtime {__version__}",
        "source_model": str(source_dir), "architecture": cfg.architecture,
        "activation": cfg.act, "threshold": cfg.act_threshold,
        "n_layers": cfg.n_layers, "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
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
