"""Loading models: model names, HF -> native tensor names, the engine filled from a model
directory (`model_dir.ModelDir`, the one reader of config.json, weight files and hybrid.json),
run dtypes, tokenizers.

HF -> native weight names live in one table (`HF_TO_NATIVE`). Native names are the on-disk
names of hybrid model directories and of the engine's `state_dict()`. Two reshapings happen
here, at load time: `down_proj` is transposed to neuron-major, and each layer's q/k/v
(`attn.wq`, `attn.wk`, `attn.wv`) become row blocks q, k, v of the fused `attn.wqkv`
(`model.fuse_qkv_`, the same function the engine's `load_state_dict` uses).
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from hybrid_runtime.errors import UserError
from hybrid_runtime.model import Transformer, fuse_qkv_
from hybrid_runtime.model_dir import ModelDir, open_model_dir

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
    # Mixtral's sparse MoE block: router, and per expert w1 = gate, w3 = up, w2 = down
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", "layers.{0}.ffn.router", False),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", "layers.{0}.ffn.experts.{1}.gate", False),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", "layers.{0}.ffn.experts.{1}.up", False),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", "layers.{0}.ffn.experts.{1}.down", True),
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


# the same table read the other way: native template (fields as regex groups) -> HF name built from the pattern
_INVERTED = [(re.compile("^" + re.escape(template).replace(r"\{0\}", r"(\d+)").replace(r"\{1\}", r"(\w+)") + "$"),
              rx.pattern, transpose) for rx, template, transpose in _COMPILED]


def hf_name(native: str) -> tuple[str, bool] | None:
    """Map a native tensor name back to (HF name in the hub layout, needs transpose); None if unknown."""
    for rx, pattern, transpose in _INVERTED:
        m = rx.match(native)
        if m:
            name = pattern.strip("^$").replace(r"\.", ".")
            for g in m.groups():
                name = re.sub(r"\([^)]*\)", g, name, count=1)
            return name, transpose
    return None


# ----------------------------------------------------------------------------- model names

def resolve_model(name: str | os.PathLike) -> Path:
    """A directory, an alias (`prosparse-7b`) or a repo id (`org/name`) -> local directory."""
    path = Path(name).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".gguf"):
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


def cpu_run_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of `dtype` runs in on the CPU: float16 becomes bfloat16 (torch's CPU half
    matmuls are slow and some ops are missing; bf16 keeps the range). Applies to what runs on the
    CPU only: on a GPU the checkpoint's dtype is kept."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


def load_model(path: str | os.PathLike | ModelDir, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None,
               place: Callable[[str], tuple[torch.device, torch.dtype]] | None = None) -> Transformer:
    """Build the dense engine on the meta device and fill it from an HF checkpoint directory
    or a hybrid model directory (native names, FFN rows already permuted and neuron-major).

    dtype None: the checkpoint's, except float16 on the CPU (`cpu_run_dtype`, said on stderr);
    a dtype given is used as it is, on any device. `place(native_name) -> (device, dtype)`, when
    given, decides per tensor instead (layer offload puts whole layers on the CPU)."""
    md = open_model_dir(path)
    model_dir, cfg, native = md.path, md.config, md.native_names
    if dtype is None:
        dtype = md.dtype
        if torch.device(device).type == "cpu" and cpu_run_dtype(dtype) != dtype:
            print(f"note: {str(dtype).replace('torch.', '')} weights run as "
                  f"{str(cpu_run_dtype(dtype)).replace('torch.', '')} on the CPU", file=sys.stderr)
            dtype = cpu_run_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {n: t.shape for n, t in model.state_dict().items()}  # native names (q/k/v split)
    state: dict[str, torch.Tensor] = {}
    for hf_name, t, f in md.tensors():
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
        dev, dt = place(name) if place is not None else (device, dtype)
        state[name] = t.to(device=dev, dtype=dt).contiguous()
    if cfg.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = [n for n in expected if n not in state]
    if missing:
        raise UserError(f"{model_dir}: checkpoint lacks {len(missing)} tensors required by config.json, "
                        f"e.g. {missing[0]!r}")
    if md.gguf is not None:
        from hybrid_runtime.gguf_reader import quantized_types
        kinds = quantized_types(md.gguf)
        if kinds:
            print(f"note: {model_dir.name}: {'/'.join(kinds)} blocks de-quantized to "
                  f"{str(dtype).replace('torch.', '')} (as asked with --weights float, or where no block kernel runs: "
                  f"conversion, the GPU)",
                  file=sys.stderr)
    for i in range(cfg.n_layers):  # layer by layer: only one layer's q/k/v exist twice at a time
        fuse_qkv_(state, f"layers.{i}.attn.")
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval().requires_grad_(False)


def load_tokenizer(model_dir: str | os.PathLike):
    """The model's own tokenizer, from its directory (or GGUF file) only (no network)."""
    from transformers import AutoTokenizer
    model_dir = Path(model_dir)
    if model_dir.suffix.lower() == ".gguf" and model_dir.is_file():
        from transformers.utils import logging as hf_logging
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:   # transformers builds the tokenizer and chat template from the file's metadata
            return AutoTokenizer.from_pretrained(str(model_dir.parent), gguf_file=model_dir.name,
                                                 local_files_only=True)
        except Exception as e:
            raise UserError(f"{model_dir}: cannot build the tokenizer from the GGUF metadata "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                    "tokenizer_config.json", "vocab.json")):
        raise UserError(f"{model_dir}: no tokenizer files (tokenizer.json / tokenizer.model)")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:
        raise UserError(f"{model_dir}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None


def load_block_model(md: ModelDir) -> Transformer:
    """A GGUF file's model with its matrices kept as blocks (quant.BlockLinear / BlockFeedForward): Q8_0,
    Q4_0 and Q4_1 as in the file, other types converted to Q8_0 (said); embeddings and norms float32.

    q, k and v become one fused block matrix when they share a format; otherwise all three are converted
    to Q8_0 (said). A tied lm_head reads the embedding's own blocks (token_embd, Q8_0 if it was float)."""
    from hybrid_runtime.gguf_reader import FileBlocks, iter_gguf_blocks
    from hybrid_runtime.quant import BlockFeedForward, BlockLinear, from_blocks, to_blocks
    cfg = md.config
    cfg.require_dense_ffn("block-quantized weights")
    converted: list[str] = []
    floats: dict[str, torch.Tensor] = {}
    blocks: dict[str, FileBlocks] = {}
    for hf_name, t, _ in iter_gguf_blocks(md.gguf, md.hf_config, md.path, converted):
        name, _ = native_name(hf_name)
        (blocks if isinstance(t, FileBlocks) else floats)[name] = t

    def take(name: str) -> FileBlocks:
        if name not in blocks:
            raise UserError(f"{md.path}: the GGUF file lacks the tensor for {name!r}")
        return blocks.pop(name)

    def as_q8_0(b: FileBlocks, what: str) -> FileBlocks:
        if b.fmt == "q8_0":
            return b
        converted.append(f"{what} ({b.fmt}, to fuse q/k/v)")
        return FileBlocks(to_blocks(from_blocks(b.data, b.fmt), "q8_0"), "q8_0", b.d)

    with torch.device("meta"):
        model = Transformer(cfg)
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        q, k, v = (take(f"{p}attn.{n}.weight") for n in ("wq", "wk", "wv"))
        if len({q.fmt, k.fmt, v.fmt}) > 1:
            q, k, v = (as_q8_0(b, f"layer {i} {n}") for b, n in ((q, "q"), (k, "k"), (v, "v")))
        bias = [floats.pop(f"{p}attn.{n}.bias", None) for n in ("wq", "wk", "wv")]
        layer.attn.wqkv = BlockLinear(torch.cat([q.data, k.data, v.data]), q.fmt, q.d,
                                      torch.cat(bias) if all(b is not None for b in bias) else None)
        o = take(f"{p}attn.wo.weight")
        layer.attn.wo = BlockLinear(o.data, o.fmt, o.d, floats.pop(f"{p}attn.wo.bias", None))
        g, u, dn = (take(f"{p}ffn.{n}") for n in ("gate", "up", "down"))
        layer.ffn = BlockFeedForward(layer.ffn.norm, BlockLinear(g.data, g.fmt, g.d), BlockLinear(u.data, u.fmt, u.d),
                                     BlockLinear(dn.data, dn.fmt, dn.d), cfg.activation)
    if cfg.tie_embeddings:
        out = _embedding_blocks(md, floats["tok_embeddings.weight"], converted)
    else:
        out = take("output.weight")
    model.output = BlockLinear(out.data, out.fmt, out.d)
    if blocks:
        raise UserError(f"{md.path}: GGUF tensor(s) for {', '.join(sorted(blocks))} do not fit the config")
    missing = [n for n, t in model.state_dict().items() if t.is_meta and n not in floats]
    if missing:
        raise UserError(f"{md.path}: the GGUF file lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    model.load_state_dict(floats, strict=False, assign=True)
    if converted:
        print(f"note: {md.path.name}: {len(converted)} matrices converted to q8_0 blocks (no kernel reads their "
              f"type), e.g. {converted[0]}", file=sys.stderr)
    return model.eval().requires_grad_(False)


def _embedding_blocks(md: ModelDir, emb: torch.Tensor, converted: list[str]):
    """The tied lm_head's blocks: the file's token_embd blocks when they are a kept format, else Q8_0."""
    from hybrid_runtime.gguf_reader import FileBlocks, file_blocks
    from hybrid_runtime.quant import to_blocks
    t = next(t for t in md.gguf.tensors if t.name == "token_embd.weight")
    blocks = file_blocks(t)
    if blocks is None:
        converted.append(f"token_embd.weight ({t.tensor_type.name}, as the tied lm_head)")
        blocks = FileBlocks(to_blocks(emb, "q8_0"), "q8_0", emb.shape[1])
    return blocks
