"""Shared fixtures: tiny tokenizers and tiny HF checkpoints built on the fly (no download)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory) -> Path:
    from hybrid_runtime.tiny import build_byte_tokenizer
    out = tmp_path_factory.mktemp("byte_tok")
    build_byte_tokenizer(out)
    return out


def save_hf_model(model, out: Path, tokenizer_dir: Path | None = None, shard: bool = False,
                  bin_format: bool = False) -> Path:
    """Save an HF model as safetensors (single or sharded) or legacy pytorch_model*.bin."""
    out.mkdir(parents=True, exist_ok=True)
    if bin_format:
        model.config.save_pretrained(out)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        if shard:
            names = sorted(state)
            half = len(names) // 2
            parts = {"pytorch_model-00001-of-00002.bin": names[:half],
                     "pytorch_model-00002-of-00002.bin": names[half:]}
            weight_map = {}
            for fname, keys in parts.items():
                torch.save({k: state[k] for k in keys}, out / fname)
                weight_map.update({k: fname for k in keys})
            (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        else:
            torch.save(state, out / "pytorch_model.bin")
    else:
        model.save_pretrained(out, max_shard_size="60KB" if shard else "10GB")
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture
def make_hf_model(tmp_path, byte_tokenizer_dir):
    """Factory: build a random HF Llama/Mistral model, save it, return (hf_model, path)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    counter = {"n": 0}

    def make(arch: str = "llama", dtype=torch.float32, shard=False, tie=False, bin_format=False,
             seed=0, **overrides):
        torch.manual_seed(seed)
        kw = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=262, max_position_embeddings=256,
                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=2)
        kw.update(overrides)
        if arch == "mistral":
            kw.setdefault("sliding_window", 8)
            cfg, cls = MistralConfig(**kw), MistralForCausalLM
        else:
            cfg, cls = LlamaConfig(**kw), LlamaForCausalLM
        model = cls(cfg).eval()
        with torch.no_grad():  # HF init makes norms all-ones; perturb them so a mix-up shows
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        model = model.to(dtype)
        counter["n"] += 1
        path = save_hf_model(model, tmp_path / f"m{counter['n']}", byte_tokenizer_dir, shard=shard,
                             bin_format=bin_format)
        return model, path

    return make
