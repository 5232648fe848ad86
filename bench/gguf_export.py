"""HF LLaMA checkpoint (safetensors) -> LLaMA-architecture GGUF for llama.cpp, with the `gguf` package.

    python -m bench.gguf_export HF_DIR OUT.gguf [--dtype f16|f32]

Used by `bench/run_bench.py` to run llama.cpp (llama-cpp-python) on exactly the weights the other
systems run. What is written, and why:

- **Metadata**: `general.architecture = llama`, context/embedding/feed-forward lengths, block count,
  head counts (q and kv), rope dimension count (= head_dim) and freq base, RMS-norm eps, vocab size,
  file type (MOSTLY_F16 or ALL_F32).
- **Tensors** under llama.cpp's names (`token_embd`, `blk.N.attn_norm`, `blk.N.attn_q/k/v/output`,
  `blk.N.ffn_norm`, `blk.N.ffn_gate/up/down`, `output_norm`, `output`). An HF `Linear` weight (out, in)
  is stored as-is: GGUF lists dimensions innermost first, so it reads as {in, out} there, which is
  what llama.cpp expects. Matrices in `dtype`; 1-D norm weights in f32 (llama.cpp's own converter
  does the same). A tied lm_head is omitted (llama.cpp then reuses token_embd).
- **q/k permutation**: HF LLaMA applies RoPE with `rotate_half` (dimension i of a head pairs with
  i + head_dim/2); llama.cpp's llama architecture rotates adjacent pairs (2i, 2i+1). So the rows of
  each head of q_proj and k_proj (k: per kv head) are reordered: new row 2j <- old row j, new row
  2j+1 <- old row j + head_dim/2 (`permute_rope_rows`). q.k is then unchanged; v and o are untouched.
- **Tokenizer**: llama.cpp refuses a file without `tokenizer.ggml.model` + tokens/scores/types. The
  bench feeds token ids, never text, so a placeholder SentencePiece-style ('llama') vocab of exactly
  vocab_size entries is written: the config's bos/eos/pad/unk ids as control tokens, then the 256
  byte tokens `<0x00>`..`<0xFF>` where the vocab has room (llama.cpp looks up `<0x0A>` for its
  newline token and fails to load without it), then `<tok_N>` fillers. Text through this vocab is
  meaningless; token ids are exact.
- **Activation**: llama.cpp's llama architecture always computes SiLU(gate) * up. A ReLU/FATReLU
  checkpoint (the synthetic bench model) therefore runs with SiLU in llama.cpp: the same weight bytes
  and the same FLOPs per token (dense, it reads every row either way), so decode speed is a fair
  dense baseline, but its tokens are not comparable with the ReLU model's. The exporter says so in
  `general.description`; the bench notes it in its results.

Writing is streamed (header, then one tensor at a time), so a 7B model needs one tensor in memory.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch

from hybrid_runtime.errors import UserError
from hybrid_runtime.quant import BLOCK, block_row_bytes, to_blocks

GGUF_DTYPES = {"f16": np.float16, "f32": np.float32, "q8_0": np.uint8, "q4_0": np.uint8, "q4_1": np.uint8}
# block formats: every matrix quantized by hybrid_runtime.quant.to_blocks (byte-equal to llama.cpp's own
# quantizer for these types, tests/test_quant.py), vectors float32
BLOCK_DTYPES = ("q8_0", "q4_0", "q4_1")

# HF per-layer name -> llama.cpp name (after "model.layers.{i}." / "blk.{i}.")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """(n_heads * head_dim, in) rows from HF's rotate_half layout to llama.cpp's adjacent-pair layout."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise UserError(f"q/k projection with {rows} rows cannot be split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    # (heads, 2 halves, half, in) -> (heads, half, 2, in): row 2j of a head is old j, 2j+1 is old j + half
    return np.ascontiguousarray(w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise UserError(f"{index}: not a safetensors index (no 'weight_map'): {e}") from None
        return [hf_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{hf_dir}: no *.safetensors weights (GGUF export reads safetensors checkpoints only)")
    return files


def _config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir}: no config.json (not an HF checkpoint)")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") not in ("llama", "mistral", "mixtral"):
        raise UserError(f"{path}: model_type {cfg.get('model_type')!r} is not a LLaMA-architecture model")
    # transformers >= 5 keeps RoPE settings in `rope_parameters`; older configs in rope_theta/rope_scaling
    rope = dict(cfg.get("rope_parameters") or {})
    cfg["rope_theta"] = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = dict(cfg.get("rope_scaling") or {}) or rope
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise UserError(f"{path}: rope scaling {scaling!r} is not supported by this exporter")
    if cfg.get("sliding_window") and cfg["sliding_window"] < cfg.get("max_position_embeddings", 0):
        raise UserError(f"{path}: sliding_window attention is not expressible in a llama GGUF")
    return cfg


def _id(cfg: dict, key: str) -> int | None:
    v = cfg.get(key)
    if isinstance(v, list):
        v = v[0] if v else None
    return int(v) if v is not None else None


def placeholder_vocab(vocab_size: int, special: dict[str, int | None]) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of a placeholder 'llama' vocab; see the module docstring."""
    from gguf import TokenType
    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.NORMAL)] * vocab_size
    names = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
    for kind, tid in special.items():
        if tid is None or not 0 <= tid < vocab_size or tokens[tid] is not None:
            continue
        tokens[tid] = names[kind]
        types[tid] = int(TokenType.UNKNOWN if kind == "unk" else TokenType.CONTROL)
    free = [i for i, t in enumerate(tokens) if t is None]
    byte_values = list(range(256)) if len(free) >= 256 else [0x0A][:len(free)]   # at least the newline
    for i, b in zip(free, byte_values):
        tokens[i] = f"<0x{b:02X}>"
        types[i] = int(TokenType.BYTE)
    out = [t if t is not None else f"<tok_{i}>" for i, t in enumerate(tokens)]
    scores = [0.0 if ty != TokenType.NORMAL else -float(i) for i, ty in enumerate(types)]
    return out, scores, types


def export_gguf(hf_dir: str | Path, out_path: str | Path, dtype: str = "f16") -> Path:
    """Write `out_path` (a llama GGUF) from the HF LLaMA checkpoint in `hf_dir`; returns the path.

    The file is written to `out_path`.tmp and renamed at the end, so an interrupted export never
    leaves a truncated GGUF behind.
    """
    import gguf
    from safetensors import safe_open

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if dtype not in GGUF_DTYPES:
        raise UserError(f"GGUF dtype {dtype!r}: choose from {', '.join(GGUF_DTYPES)}")
    cfg = _config(hf_dir)
    np_dtype = GGUF_DTYPES[dtype]
    d, L, n_heads = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or d // n_heads)
    vocab = int(cfg["vocab_size"])
    act = cfg.get("hidden_act", "silu")

    # name -> safetensors file, and the (HF name, GGUF name) plan in llama.cpp's order
    where: dict[str, Path] = {}
    for f in _safetensors_files(hf_dir):
        with safe_open(str(f), framework="np") as sf:
            for k in sf.keys():
                where[k] = f
    n_exp = int(cfg.get("num_local_experts") or 0)       # Mixtral: router + stacked experts per layer
    plan: list[tuple[str | tuple[str, ...], str]] = [("model.embed_tokens.weight", "token_embd.weight")]
    for i in range(L):
        plan += [(f"model.layers.{i}.{hf}", f"blk.{i}.{gg}") for hf, gg in _LAYER_NAMES.items()
                 if not (n_exp and hf.startswith("mlp."))]
        if n_exp:
            moe = f"model.layers.{i}.block_sparse_moe"
            plan.append((f"{moe}.gate.weight", f"blk.{i}.ffn_gate_inp.weight"))
            for w_name, gg in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
                plan.append((tuple(f"{moe}.experts.{e}.{w_name}.weight" for e in range(n_exp)), f"blk.{i}.{gg}.weight"))
    plan.append(("model.norm.weight", "output_norm.weight"))
    tied = "lm_head.weight" not in where
    if tied and not cfg.get("tie_word_embeddings", False):
        raise UserError(f"{hf_dir}: no lm_head.weight and config.json does not tie the embeddings")
    if not tied:
        plan.append(("lm_head.weight", "output.weight"))
    missing = [hf for src, _ in plan for hf in ((src,) if isinstance(src, str) else src) if hf not in where]
    if missing:
        raise UserError(f"{hf_dir}: tensor {missing[0]} missing from the safetensors files "
                        f"({len(missing)} missing in all)")

    expected = {"attn_q": (n_heads * head_dim, d), "attn_k": (n_kv * head_dim, d), "attn_v": (n_kv * head_dim, d),
                "attn_output": (d, n_heads * head_dim), "ffn_gate": (int(cfg["intermediate_size"]), d),
                "ffn_up": (int(cfg["intermediate_size"]), d), "ffn_down": (d, int(cfg["intermediate_size"])),
                "token_embd": (vocab, d), "output": (vocab, d)}
    if n_exp:
        f = int(cfg["intermediate_size"])
        expected.update({"ffn_gate_inp": (n_exp, d), "ffn_gate_exps": (n_exp, f, d), "ffn_up_exps": (n_exp, f, d),
                         "ffn_down_exps": (n_exp, d, f)})

    def tensor(hf: str):
        with safe_open(str(where[hf]), framework="pt") as sf:   # pt: bf16 checkpoints have no numpy dtype
            return sf.get_tensor(hf)

    def load(src: str | tuple[str, ...], gg: str) -> np.ndarray:
        t = tensor(src) if isinstance(src, str) else torch.stack([tensor(hf) for hf in src])   # experts stacked
        kind = gg.split(".")[-2]
        if kind in expected and tuple(t.shape) != expected[kind]:
            first = src if isinstance(src, str) else src[0]
            raise UserError(f"{where[first]}: {first} has shape {tuple(t.shape)}, config.json implies {expected[kind]}")
        a = t.float().numpy()
        if kind == "attn_q":
            a = permute_rope_rows(a, n_heads)
        elif kind == "attn_k":
            a = permute_rope_rows(a, n_kv)
        if a.ndim == 1:
            return np.ascontiguousarray(a.astype(np.float32))
        if dtype in BLOCK_DTYPES:
            rows = to_blocks(torch.from_numpy(np.ascontiguousarray(a.reshape(-1, a.shape[-1]))), dtype)
            return rows.numpy().reshape(*a.shape[:-1], -1)
        return np.ascontiguousarray(a.astype(np_dtype))

    shapes = {}
    for src, gg in plan:
        first = src if isinstance(src, str) else src[0]
        with safe_open(str(where[first]), framework="pt") as sf:
            one = tuple(sf.get_slice(first).get_shape())
        shapes[gg] = one if isinstance(src, str) else (len(src), *one)

    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(hf_dir.name)
    w.add_description(f"exported by bench/gguf_export.py from {hf_dir}; source activation {act!r}"
                      + ("" if act == "silu" else " (llama.cpp computes SiLU: a speed baseline, not the same model)"))
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(d)
    w.add_block_count(L)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(vocab)
    if n_exp:
        w.add_expert_count(n_exp)
        w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                     "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[dtype])

    special = {"bos": _id(cfg, "bos_token_id"), "eos": _id(cfg, "eos_token_id"),
               "pad": _id(cfg, "pad_token_id"), "unk": None}
    tokens, scores, types = placeholder_vocab(vocab, special)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    for kind, tid in special.items():
        if tid is not None and 0 <= tid < vocab:
            getattr(w, f"add_{kind}_token_id")(tid)
    w.add_add_bos_token(False)     # the bench passes complete id sequences
    w.add_add_eos_token(False)

    for _, gg in plan:
        shape = shapes[gg]
        if len(shape) > 1 and dtype in BLOCK_DTYPES:
            if shape[-1] % BLOCK:
                raise UserError(f"{gg}: rows of {shape[-1]} weights cannot be {dtype} blocks (a multiple of {BLOCK})")
            byte_shape = (*shape[:-1], block_row_bytes(shape[-1], dtype))
            w.add_tensor_info(gg, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=gguf.GGMLQuantizationType[dtype.upper()])
            continue
        t_dtype = np.dtype(np.float32 if len(shape) == 1 else np_dtype)
        w.add_tensor_info(gg, shape, t_dtype, int(np.prod(shape)) * t_dtype.itemsize)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for src, gg in plan:
            w.write_tensor_data(load(src, gg))
        w.close()
        tmp.replace(out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path


@click.command(help="Write a llama GGUF (for llama.cpp) from an HF LLaMA safetensors checkpoint.")
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--dtype", default="f16", show_default=True, type=click.Choice(sorted(GGUF_DTYPES)))
@click.option("--force", is_flag=True, help="overwrite an existing output file")
def main(hf_dir: str, out: str, dtype: str, force: bool) -> None:
    if Path(out).exists() and not force:
        raise UserError(f"{out} exists (pass --force to overwrite)")
    click.echo(export_gguf(hf_dir, out, dtype))


if __name__ == "__main__":
    from hybrid_runtime.errors import console_main
    console_main(main)
