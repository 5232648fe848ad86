"""The one reader of a model directory: an HF checkpoint, a hybrid model directory, or a GGUF file
(llama.cpp's format, read by gguf_reader.py).

`open_model_dir(path)` reads `config.json`, finds the weight files and (for a hybrid directory)
reads and checks `hybrid.json` — once — into a `ModelDir` that the rest of the runtime receives.
Nothing else opens these files. Writing a hybrid directory is `hybrid_format.pack_hybrid_model`.

A model directory is untrusted input (it may come from the internet): every file name taken from
its metadata (`hybrid.json`, a shard index) must resolve inside the directory.

The hybrid model directory (format `hybrid-runtime-model`, version 1):

    hybrid.json               format name + version, source, activation, per-layer statistics,
                              "activity": {"kind": "exact_zero"} or {"kind": "magnitude", "cett",
                              "thresholds": [per-layer cut]} (activations.py: rows rescaled for it)
    config.json, tokenizer*   copied from the source checkpoint
    model.safetensors         native tensor names (loading.HF_TO_NATIVE), FFN rows permuted per layer
                              by activation frequency (descending); gate/up/down (f, d); a mixture of
                              experts: each expert's rows permuted on their own
    neuron_stats.safetensors  layers.{i}.frequency (F,) fp32, sorted descending (per expert),
                              layers.{i}.source_index (F,) int64: original neuron of each row;
                              F = f, or E * f expert-major for a mixture of experts ("n_experts" E)
    predictors.safetensors    hybrid_runtime/predictor.py format, F outputs in the permuted order
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hybrid_runtime.activations import Activation
from hybrid_runtime.errors import UserError
from hybrid_runtime.model import ModelConfig

FORMAT_NAME = "hybrid-runtime-model"
FORMAT_VERSION = 1


def inside(root: Path, name, where: str) -> Path:
    """root / name, refused unless it resolves inside root (no '..', absolute path or symlink out)."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: expected a file name, got {name!r}")
    p = root / name
    try:
        p.resolve().relative_to(root.resolve())
    except ValueError:
        raise UserError(f"{where}: file name {name!r} resolves outside the model directory {root}") from None
    return p


def read_config(model_dir: Path) -> dict:
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model directory does not exist")
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path}: missing (not a Hugging Face model directory?)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: expected a JSON object")
    return cfg


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of an HF checkpoint: sharded or single, safetensors preferred over .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = list(dict.fromkeys(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{index}: malformed shard index ({e})") from None
            files = [inside(model_dir, n, f"{index_name}: weight_map") for n in names]
            for f in files:
                if not f.is_file():
                    raise UserError(f"{f}: shard listed in {index_name} is missing")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise UserError(f"{model_dir}: no weights found (model.safetensors, model.safetensors.index.json, "
                    "pytorch_model.bin or pytorch_model.bin.index.json)")


def iter_checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (name, tensor, file) for every tensor; safetensors are memory-mapped, .bin files are
    read with weights_only=True (never unpickled otherwise)."""
    from safetensors import safe_open
    for f in files:
        if f.suffix == ".safetensors":
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
                names = list(handle.keys())
            except Exception as e:
                raise UserError(f"{f}: not a valid safetensors file ({str(e).splitlines()[0]})") from None
            for n in names:
                try:
                    t = handle.get_tensor(n)
                except Exception as e:
                    raise UserError(f"{f}: tensor {n!r} is unreadable (truncated or corrupt file?: "
                                    f"{str(e).splitlines()[0]})") from None
                yield n, t, f
        else:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise UserError(f"{f}: cannot read PyTorch checkpoint ({str(e).splitlines()[0]})") from None
            for n, t in state.items():
                yield n, t, f


def checkpoint_dtype(files: list[Path]) -> torch.dtype:
    """The floating dtype of the first floating weight tensor."""
    for _, t, _ in iter_checkpoint_tensors(files[:1]):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


@dataclass
class HybridMeta:
    """`hybrid.json`, checked: format and version, required fields, file names inside the directory."""
    path: Path
    raw: dict

    @property
    def n_layers(self) -> int:
        return int(self.raw["n_layers"])

    @property
    def weights_file(self) -> Path:
        return inside(self.path, self.raw["weights"], "hybrid.json: 'weights'")

    @property
    def predictors_file(self) -> Path | None:
        name = self.raw.get("predictors")
        return inside(self.path, name, "hybrid.json: 'predictors'") if name else None

    def layer_activations(self, base: Activation) -> list[Activation]:
        """Each layer's activation as the sparse modes compute it: the model's own, or for a magnitude
        (CETT) profile the model's with that layer's cut (see activations.py)."""
        activity = self.raw.get("activity") or {"kind": "exact_zero"}
        if activity.get("kind") != "magnitude":
            return [base] * self.n_layers
        eps = activity.get("thresholds")
        if not isinstance(eps, list) or len(eps) != self.n_layers:
            raise UserError(f"{self.path / 'hybrid.json'}: 'activity' is magnitude but has no {self.n_layers} "
                            "per-layer 'thresholds'; re-run `hybrid-convert pack`")
        return [Activation(base.name, base.threshold, eps=e) for e in eps]

    @property
    def stored_dtype(self) -> str:
        """The dtype the weights are stored in ("float16", "bfloat16", "float32")."""
        return str(self.raw.get("dtype", "bfloat16"))

    @property
    def stats_file(self) -> Path:
        return inside(self.path, self.raw["neuron_stats"], "hybrid.json: 'neuron_stats'")

    def frequencies(self) -> list[np.ndarray]:
        """Per layer (f,) activation frequencies, sorted descending (the stored neuron order)."""
        from safetensors.numpy import load_file
        try:
            data = load_file(str(self.stats_file))
            return [data[f"layers.{i}.frequency"] for i in range(self.n_layers)]
        except Exception as e:
            raise UserError(f"{self.stats_file}: unreadable neuron statistics ({str(e).splitlines()[0]})") from None


def read_hybrid_meta(path: Path) -> HybridMeta:
    meta_path = Path(path) / "hybrid.json"
    try:
        raw = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path}: unreadable ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        fmt = raw.get("format") if isinstance(raw, dict) else None
        raise UserError(f"{meta_path}: not a hybrid model directory (format {fmt!r})")
    version = raw.get("version")
    if version != FORMAT_VERSION:
        raise UserError(f"{meta_path}: format version {version!r} is not supported by this runtime "
                        f"(it reads version {FORMAT_VERSION}); re-run `hybrid-convert pack`")
    for key in ("n_layers", "weights", "neuron_stats"):
        if key not in raw:
            raise UserError(f"{meta_path}: field {key!r} missing")
    if not isinstance(raw["n_layers"], int) or raw["n_layers"] <= 0:
        raise UserError(f"{meta_path}: field 'n_layers' must be a positive integer, got {raw['n_layers']!r}")
    meta = HybridMeta(Path(path), raw)
    for listed in (meta.weights_file, meta.stats_file):
        if not listed.is_file():
            raise UserError(f"{listed}: missing (listed in hybrid.json)")
    if meta.predictors_file is not None and not meta.predictors_file.is_file():
        raise UserError(f"{meta.predictors_file}: missing (listed in hybrid.json); re-run "
                        "`hybrid-convert pack` with --predictors, or run with --exact")
    return meta


@dataclass
class ModelDir:
    """A model directory, read once: its config, weight files and (hybrid) metadata."""
    path: Path
    hf_config: dict
    config: ModelConfig
    weight_files: list[Path]
    hybrid: HybridMeta | None          # None: a plain HF checkpoint (HF tensor names)
    gguf: object | None = None         # a GGUF file's reader (path is then the file)
    _dtype: torch.dtype | None = field(default=None, repr=False)

    @property
    def is_hybrid(self) -> bool:
        return self.hybrid is not None

    @property
    def native_names(self) -> bool:
        """Tensors are stored under native names (hybrid directory), not HF names."""
        return self.hybrid is not None

    @property
    def activation(self) -> Activation:
        return self.config.activation

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's floating dtype (read from the first weight file's header, once)."""
        if self._dtype is None:
            if self.gguf is not None:
                from hybrid_runtime.gguf_reader import float_dtype
                self._dtype = float_dtype(self.gguf)
            else:
                self._dtype = checkpoint_dtype(self.weight_files)
        return self._dtype

    def tensors(self) -> Iterator[tuple[str, torch.Tensor, Path]]:
        if self.gguf is not None:
            from hybrid_runtime.gguf_reader import iter_gguf_tensors
            return iter_gguf_tensors(self.gguf, self.hf_config, self.path)
        return iter_checkpoint_tensors(self.weight_files)


def open_model_dir(path: str | os.PathLike | ModelDir) -> ModelDir:
    """Read a model directory (see the module docstring); UserError names what is wrong."""
    if isinstance(path, ModelDir):
        return path
    path = Path(path)
    if path.suffix.lower() == ".gguf" and path.is_file():
        from hybrid_runtime.gguf_reader import gguf_config, open_gguf
        reader = open_gguf(path)
        hf = gguf_config(reader, path)
        return ModelDir(path, hf, ModelConfig.from_hf(hf), [path], None, gguf=reader)
    hf = read_config(path)
    cfg = ModelConfig.from_hf(hf)
    hybrid = read_hybrid_meta(path) if (path / "hybrid.json").is_file() else None
    if hybrid is not None and hybrid.n_layers != cfg.n_layers:
        raise UserError(f"{path / 'hybrid.json'}: n_layers {hybrid.n_layers} but config.json has {cfg.n_layers}")
    files = [hybrid.weights_file] if hybrid is not None else checkpoint_files(path)
    return ModelDir(path, hf, cfg, files, hybrid)
