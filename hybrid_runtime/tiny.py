"""Small deterministic models and tokenizers built locally (no download).

Used by the tests, by `hybrid-run` when no demo model is installed, and as a starting point
for training small models: a byte-level tokenizer (256 byte tokens + specials, optionally
BPE merges learned from text) and a random LLaMA checkpoint written in HF format.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_byte_tokenizer(out_dir: str | Path, train_texts: list[str] | None = None,
                         vocab_size: int = 256 + len(SPECIAL_TOKENS)):
    """A byte-level BPE tokenizer saved as a `PreTrainedTokenizerFast` in `out_dir`.

    Without `train_texts` it has no merges (one token per byte); with them it learns merges
    up to `vocab_size` with the `tokenizers` library. Deterministic either way.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if train_texts:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=alphabet, show_progress=False)
        tok.train_from_iterator(train_texts, trainer=trainer)
    else:
        vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
        for ch in sorted(alphabet):
            vocab[ch] = len(vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.ByteLevel()
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def tiny_llama_config(vocab_size: int, dim: int = 64, n_layers: int = 2, n_heads: int = 4,
                      n_kv_heads: int = 2, ffn_dim: int = 172, act: str = "relu",
                      threshold: float = 0.0, tie: bool = False, max_seq_len: int = 512) -> dict:
    """An HF `config.json` dict for a small LLaMA model."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": dim, "intermediate_size": ffn_dim, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
        "vocab_size": vocab_size, "max_position_embeddings": max_seq_len, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": act, "tie_word_embeddings": tie,
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "torch_dtype": "float32",
    }
    if act == "fatrelu":
        cfg["hidden_act_param"] = threshold
    return cfg


def write_random_checkpoint(out_dir: str | Path, config: dict, seed: int = 0,
                            dtype: torch.dtype = torch.float32) -> Path:
    """Random weights in HF layout (`model.safetensors`) + `config.json`, from a seed."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    d, f, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    nh, nkv, V = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    hd = config.get("head_dim") or d // nh

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    t = {"model.embed_tokens.weight": rnd(V, d, scale=1.0), "model.norm.weight": torch.ones(d, dtype=dtype)}
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(d, dtype=dtype)
        t[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=dtype)
        t[p + "self_attn.q_proj.weight"] = rnd(nh * hd, d)
        t[p + "self_attn.k_proj.weight"] = rnd(nkv * hd, d)
        t[p + "self_attn.v_proj.weight"] = rnd(nkv * hd, d)
        t[p + "self_attn.o_proj.weight"] = rnd(d, nh * hd)
        t[p + "mlp.gate_proj.weight"] = rnd(f, d)
        t[p + "mlp.up_proj.weight"] = rnd(f, d)
        t[p + "mlp.down_proj.weight"] = rnd(d, f)
    if not config.get("tie_word_embeddings"):
        t["lm_head.weight"] = rnd(V, d)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def build_tiny_model(out_dir: str | Path, seed: int = 0, **config_kwargs) -> Path:
    """A random tiny LLaMA + byte tokenizer in `out_dir`: a complete HF model directory."""
    out = Path(out_dir)
    tok = build_byte_tokenizer(out)
    cfg = tiny_llama_config(vocab_size=len(tok), **config_kwargs)
    return write_random_checkpoint(out, cfg, seed=seed)
