"""Reading real checkpoints: model names, config.json, safetensors / .bin shards, tokenizers.

HF -> native weight names live in one table (`HF_TO_NATIVE`). Native names are the on-disk
names of hybrid model directories and of the engine's `state_dict()`. Two reshapings happen
here, at load time: `down_proj` is transposed to neuron-major, and each layer's q/k/v
(`attn.wq`, `attn.wk`, `attn.wv`) become row blocks q, k, v of the fused `attn.wqkv`
(`model.fuse_qkv_`, the same function the engine's `load_state_dict` uses).
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from hybrid_runtime.errors import UserError
from hybrid_runtime.model import ModelConfig, Transformer, fuse_qkv_

# Aliases resolve to Hugging Face repo ids, and then only to the local HF cache.
MODEL_ALIASES = {
    "prosparse-7b": "SparseLLM/prosparse-llama-2-7b",
    "prosparse-13b": "SparseLLM/prosparse-llama-2-13b",
    "minicpm-s-1b": "openbmb/MiniCPM-S-1B-sft",
    "relullama-7b": "SparseLLM/ReluLLaMA-7B",
}

# (HF regex, native name template, transpose?) — the single place weight names are mapped.
# q/k/v keep their own names here and on disk; load_model fuses them into attn.wqkv (see above).
HF_TO_NATIVE: list[tuple[str, str, bool]] = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight", False),
    (r"model\.norm\.weight", "norm.weight", False),
    (r"lm_head\.weight", "output.weight", False),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.attn_norm.weight", False),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "layers.{0}.attn.wq.{1}", False),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "layers.{0}.attn.wk.{1}", False),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "layers.{0}.attn.wv.{1}", False),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", "layers.{0}.attn.wo.{1}", False),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.ffn.norm.weight", False),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{0}.ffn.gate", False),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{0}.ffn.up", False),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{0}.ffn.down", True),
]
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_COMPILED = [(re.compile(p + r"$"), t, tr) for p, t, tr in HF_TO_NATIVE]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r} (use one of: auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def native_name(hf_name: str) -> tuple[str, bool] | None:
    """Map an HF tensor name to (native name, needs transpose); None for ignorable tensors."""
    for rx, template, transpose in _COMPILED:
        m = rx.match(hf_name)
        if m:
            return template.format(*m.groups()), transpose
    return None


# ----------------------------------------------------------------------------- model names

def resolve_model(name: str | os.PathLike) -> Path:
    """A directory, an alias (`prosparse-7b`) or a repo id (`org/name`) -> local directory."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    name = str(name)
    repo_id = MODEL_ALIASES.get(name.lower())
    if repo_id is None and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not path.exists():
        repo_id = name
    if repo_id is None:
        if path.exists():
            raise UserError(f"{path}: is not a directory (give a model directory, an alias or org/name)")
        raise UserError(f"model {name!r}: no such directory and not a known alias "
                        f"(aliases: {', '.join(MODEL_ALIASES)}; or a Hugging Face repo id org/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise UserError(f"model {name!r} ({repo_id}) is not in the local Hugging Face cache; "
                        f"download it first with: hf download {repo_id}") from None


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


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    return ModelConfig.from_hf(read_config(Path(model_dir)))


# ----------------------------------------------------------------------------- weights

def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint: sharded or single, safetensors preferred over .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index}: malformed shard index ({e})") from None
            files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
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
    """Yield (name, tensor, file) for every tensor; safetensors are memory-mapped."""
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
    """The floating dtype of the first weight tensor (used when --dtype is auto)."""
    for _, t, _ in iter_checkpoint_tensors(files[:1]):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """Build the dense engine on the meta device and fill it from an HF checkpoint directory
    or a hybrid model directory (native names, FFN rows already permuted and neuron-major)."""
    from hybrid_runtime.hybrid_format import is_hybrid_dir, read_hybrid_meta
    model_dir = Path(path)
    cfg = ModelConfig.from_hf(read_config(model_dir))
    native = is_hybrid_dir(model_dir)
    if native:
        weights = model_dir / read_hybrid_meta(model_dir).raw["weights"]
        if not weights.is_file():
            raise UserError(f"{weights}: missing (listed in hybrid.json)")
        files = [weights]
    else:
        files = checkpoint_files(model_dir)
    dtype = dtype or checkpoint_dtype(files)
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        # half matmuls on the CPU are slow and some ops are missing; bf16 keeps the range
        print("note: float16 weights run as bfloat16 on the CPU", file=sys.stderr)
        dtype = torch.bfloat16
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {n: t.shape for n, t in model.state_dict().items()}  # native names (q/k/v split)
    state: dict[str, torch.Tensor] = {}
    for hf_name, t, f in iter_checkpoint_tensors(files):
        mapped = (hf_name, False) if native else native_name(hf_name)
        if mapped is None:
            if not _IGNORED.match(hf_name):
                print(f"warning: {f.name}: ignoring unknown tensor {hf_name!r}", file=sys.stderr)
            continue
        name, transpose = mapped
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        if name not in expected:
            raise UserError(f"{f}: tensor {hf_name!r} does not fit config.json "
                            f"(layer index or bias not in the config)")
        if transpose:
            t = t.t()
        if tuple(t.shape) != tuple(expected[name]):
            raise UserError(f"{f}: tensor {hf_name!r} has shape {tuple(t.shape)} but config.json implies "
                            f"{tuple(expected[name])}")
        state[name] = t.to(device=device, dtype=dtype).contiguous()
    if cfg.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = [n for n in expected if n not in state]
    if missing:
        raise UserError(f"{model_dir}: checkpoint lacks {len(missing)} tensors required by config.json, "
                        f"e.g. {missing[0]!r}")
    for i in range(cfg.n_layers):  # layer by layer: only one layer's q/k/v exist twice at a time
        fuse_qkv_(state, f"layers.{i}.attn.")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval().requires_grad_(False)


def load_tokenizer(model_dir: str | os.PathLike):
    """The model's own tokenizer, from its directory only (no network)."""
    from transformers import AutoTokenizer
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                    "tokenizer_config.json", "vocab.json")):
        raise UserError(f"{model_dir}: no tokenizer files (tokenizer.json / tokenizer.model)")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise UserError(f"{model_dir}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
