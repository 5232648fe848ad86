"""A random Mixtral-shaped checkpoint with ReLU-family experts, made hybrid: the benchmark model of the hybrid
mixture of experts (`bench/results/README.md`, "Mixture of experts, hybrid").

transformers builds `MixtralForCausalLM` at the given shape with random weights (its own init; the router scaled
so that routing is decisive, as a trained router is), the experts' activation set to `--act` (dReLU by default,
TurboSparse's: ReLU on gate and up), a byte-level tokenizer; the checkpoint is written in bfloat16 and then
`hybrid-convert all` profiles it on `--data`, trains the predictors and packs the hybrid directory.

    python -m bench.moe_model --out DIR --data corpus.txt
    hybrid-run bench --model DIR/hybrid --systems dense-cpu,hybrid-cpu,hybrid-cpu-exact,llamacpp-cpu

Random weights: the speed and the mechanism are real (routing, per-expert sparsity, predictors), the text
quality is not (perplexity above the vocabulary size).
"""
from __future__ import annotations

from pathlib import Path

from hybrid_runtime.errors import UserError, log, prepare_output_dir


def moe_config(dim: int, n_layers: int, ffn_dim: int, n_experts: int, top_k: int, n_heads: int, n_kv_heads: int,
               act: str):
    """The transformers `MixtralConfig`, checked by the engine's own config reader (one line naming the field)."""
    from transformers import MixtralConfig

    from hybrid_runtime.activations import Activation
    from hybrid_runtime.model import ModelConfig
    if not Activation(act).has_exact_zeros:
        raise UserError(f"--act {act!r}: the hybrid needs experts with exact zeros (relu, drelu, relu2)")
    config = MixtralConfig(hidden_size=dim, intermediate_size=ffn_dim, num_hidden_layers=n_layers,
                           num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=262,
                           max_position_embeddings=4096, num_local_experts=n_experts, num_experts_per_tok=top_k,
                           bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
                           hidden_act="relu")   # a name transformers builds; the saved config says `act`
    ModelConfig.from_hf({**config.to_dict(), "hidden_act": act})
    return config


def build_moe_checkpoint(out: Path, config, act: str, seed: int, router_scale: float = 20.0) -> Path:
    """Write the random checkpoint (bfloat16 safetensors, config.json, byte tokenizer) into `out`."""
    import torch
    from transformers import MixtralForCausalLM

    from hybrid_runtime.tiny import build_byte_tokenizer
    out.mkdir(parents=True, exist_ok=True)
    build_byte_tokenizer(out)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.mul_(router_scale)
    model.config.hidden_act = act
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def main() -> None:
    import click

    from hybrid_runtime.errors import console_main

    @click.command()
    @click.option("--out", required=True, help="Directory: OUT/checkpoint and OUT/hybrid are written there.")
    @click.option("--data", multiple=True, required=True, help="Calibration text (.txt/.jsonl), repeatable.")
    @click.option("--dim", type=int, default=1024, show_default=True)
    @click.option("--layers", type=int, default=4, show_default=True)
    @click.option("--ffn-dim", type=int, default=3584, show_default=True)
    @click.option("--experts", type=int, default=8, show_default=True)
    @click.option("--top-k", type=int, default=2, show_default=True)
    @click.option("--heads", type=int, default=16, show_default=True)
    @click.option("--kv-heads", type=int, default=4, show_default=True)
    @click.option("--act", default="drelu", show_default=True, help="The experts' activation (relu, drelu, relu2).")
    @click.option("--tokens", type=int, default=8192, show_default=True, help="Calibration tokens to profile.")
    @click.option("--samples-per-layer", type=int, default=4096, show_default=True)
    @click.option("--ranks", default="64", show_default=True)
    @click.option("--max-epochs", type=int, default=4, show_default=True)
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--force", is_flag=True, help="Replace an existing --out.")
    def build(out, data, dim, layers, ffn_dim, experts, top_k, heads, kv_heads, act, tokens, samples_per_layer,
              ranks, max_epochs, seed, force):
        """Write a random Mixtral-shaped checkpoint with ReLU-family experts and its hybrid directory."""
        from convert.cli import main_group
        # everything is checked before --out is touched
        config = moe_config(dim, layers, ffn_dim, experts, top_k, heads, kv_heads, act)
        for f in data:
            if not Path(f).is_file():
                raise UserError(f"{f}: data file not found")
        root = prepare_output_dir(Path(out), force)
        ckpt = build_moe_checkpoint(root / "checkpoint", config, act, seed)
        log(f"wrote {ckpt}; converting")
        args = ["all", "--model", str(ckpt), "--out", str(root / "hybrid"), "--tokens", str(tokens),
                "--block-len", "128", "--samples-per-layer", str(samples_per_layer), "--ranks", ranks,
                "--max-epochs", str(max_epochs), "--device", "cpu", "--dtype", "float32"]
        for f in data:
            args += ["--data", str(f)]
        main_group.main(args, standalone_mode=False)
        click.echo(root / "hybrid")

    console_main(build)


if __name__ == "__main__":
    main()
