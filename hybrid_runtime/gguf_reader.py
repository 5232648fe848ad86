"""Reading a LLaMA-family GGUF file (llama.cpp's format) with the `gguf` package: config and tensors.

`model_dir.open_model_dir` calls this for a `.gguf` path; the rest of the runtime then sees an ordinary
checkpoint: an HF `config.json`-style dict built from the file's metadata, and tensors under HF names
(`loading.HF_TO_NATIVE` maps them on), de-quantized to float32 (F16 / BF16 files keep their dtype). The
runtime has no 4-bit or 8-bit weight format yet, so quantized blocks are converted, and the loader says so.
llama.cpp stores q and k with their rows permuted for its RoPE layout; they are permuted back here.
The tokenizer and chat template come from the same file (transformers reads them: `loading.load_tokenizer`).
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from hybrid_runtime.errors import UserError

# GGUF tensor name -> HF name ("{0}" is the layer index)
GGUF_TO_HF = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", "model.layers.{0}.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", "model.layers.{0}.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", "model.layers.{0}.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{0}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{0}.mlp.down_proj.weight"),
]
_COMPILED = [(re.compile(p + r"$"), t) for p, t in GGUF_TO_HF]
_IGNORED = re.compile(r"rope_freqs\.weight$")
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def open_gguf(path: Path):
    """The file's reader; UserError for a file that is not a readable GGUF."""
    try:
        import gguf
    except ImportError:
        raise UserError("reading a GGUF file needs the gguf package: pip install gguf") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:   # the package raises ValueError / struct errors / IndexError on bad files
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:
        raise UserError(f"GGUF metadata {key!r} is unreadable") from None


def gguf_config(reader, path: Path) -> dict:
    """An HF config.json dict from the file's metadata (LLaMA architecture only)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (supported: llama)")

    def need(key: str):
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise UserError(f"{path}: GGUF metadata 'llama.{key}' is missing")
        return v

    n_heads = int(need("attention.head_count"))
    dim = int(need("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if not vocab:
        raise UserError(f"{path}: GGUF metadata names no vocabulary size")
    names = {t.name for t in reader.tensors}
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": dim, "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")), "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        "head_dim": int(_field(reader, "llama.attention.key_length", dim // n_heads)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "vocab_size": int(vocab), "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise UserError(f"{path}: GGUF rope scaling {scaling!r} is not supported (supported: linear)")
        cfg["rope_scaling"] = {"type": "linear", "factor": float(_field(reader, "llama.rope.scaling.factor", 1.0))}
    return cfg


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rows 2j, 2j+1 of a head <- rows j, j + head_dim/2)."""
    half = w.shape[0] // n_heads // 2
    return np.ascontiguousarray(w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def quantized_types(reader) -> list[str]:
    return sorted({t.tensor_type.name for t in reader.tensors} - set(FLOAT_TYPES))


def float_dtype(reader) -> torch.dtype:
    """The run dtype the file's weights map to: their own float type, float32 where any is quantized."""
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    if len(types) == 1 and next(iter(types)) in FLOAT_TYPES:
        return FLOAT_TYPES[next(iter(types))]
    return torch.float32


BLOCK_TYPES = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}


def _dequantized(t, path: Path) -> np.ndarray:
    from gguf import quants
    kind = t.tensor_type.name
    try:
        if kind in FLOAT_TYPES and kind != "BF16":
            a = np.asarray(t.data)
        else:
            a = quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, KeyError, ValueError) as e:
        raise UserError(f"{path}: tensor {t.name!r} has type {kind}, which the gguf package cannot "
                        f"de-quantize ({e})") from None
    if kind == "BF16":   # the package returns bf16 as its float32 values
        a = np.asarray(a, np.float32)
    return np.asarray(a).reshape(tuple(int(n) for n in reversed(t.shape.tolist())))   # GGUF lists dims fastest first


def _hf_name(t, path: Path) -> str | None:
    name = next((tmpl.format(*m.groups()) for rx, tmpl in _COMPILED if (m := rx.match(t.name))), None)
    if name is None and not _IGNORED.match(t.name):
        raise UserError(f"{path}: GGUF tensor {t.name!r} is not part of a LLaMA model")
    return name


class FileBlocks:
    """A matrix (rows, d) as blocks: `data` uint8 (rows, row bytes) in `fmt` (quant.FORMATS)."""

    def __init__(self, data: torch.Tensor, fmt: str, d: int):
        self.data, self.fmt, self.d = data, fmt, d


def file_blocks(t) -> FileBlocks | None:
    """A GGUF tensor's own blocks when its type is one the kernels read (the file's read-only map, used as it
    is and never written; no copy), else None."""
    if t.tensor_type.name not in BLOCK_TYPES:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # torch warns about the read-only map
        data = torch.from_numpy(np.asarray(t.data))    # (rows, row bytes)
    return FileBlocks(data, BLOCK_TYPES[t.tensor_type.name], int(t.shape[0]))


def iter_gguf_blocks(reader, cfg: dict, path: Path, converted: list[str]):
    """(HF name, FileBlocks or float32 tensor, path): every 2-D matrix but the token embeddings as blocks
    (the file's own when Q8_0 / Q4_0 / Q4_1, else quantized to Q8_0 and its name appended to `converted`),
    the embeddings and norms as float32."""
    from hybrid_runtime.quant import to_blocks
    for t in reader.tensors:
        name = _hf_name(t, path)
        if name is None:
            continue
        if len(t.shape) < 2 or name == "model.embed_tokens.weight":
            yield name, torch.from_numpy(np.array(_dequantized(t, path), np.float32)), path
            continue
        blocks = file_blocks(t)
        if blocks is None:
            blocks = FileBlocks(to_blocks(torch.from_numpy(np.array(_dequantized(t, path), np.float32)), "q8_0"),
                                "q8_0", int(t.shape[0]))
            converted.append(f"{t.name} ({t.tensor_type.name})")
        if name.endswith(("q_proj.weight", "k_proj.weight")):   # rows are whole blocks: permute them as rows
            heads = cfg["num_attention_heads"] if name.endswith("q_proj.weight") else cfg["num_key_value_heads"]
            blocks.data = torch.from_numpy(unpermute_rope_rows(blocks.data.numpy(), heads))
        yield name, blocks, path


def iter_gguf_tensors(reader, cfg: dict, path: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(HF name, tensor, path) for every tensor; quantized blocks de-quantized to float32."""
    for t in reader.tensors:
        name = _hf_name(t, path)
        if name is None:
            continue
        a = _dequantized(t, path)
        if name.endswith("q_proj.weight"):
            a = unpermute_rope_rows(a, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            a = unpermute_rope_rows(a, cfg["num_key_value_heads"])
        a = np.ascontiguousarray(a)
        tensor = torch.from_numpy(a if a.flags.writeable else a.copy())   # F32/F16 data is the read-only file map
        if t.tensor_type.name == "BF16":
            tensor = tensor.to(torch.bfloat16)
        yield name, tensor, path
