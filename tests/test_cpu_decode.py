"""The one-call CPU decode step (hybrid_runtime/cpu_decode.py) against Transformer.forward.

Each case builds a random model with one config feature switched on, prefills a prompt with
`Transformer.forward`, then decodes the same tokens twice from the same cache state: with the model's
forward (the reference) and with CpuDecodeStep; logits must agree at every step (fp32: to summation
order; bf16: the reference is the same bf16 weights run in fp32 by torch, since the step does not round
intermediates to bf16 as torch's bf16 forward does; only its KV cache is stored in bf16).
"""
from __future__ import annotations

import dataclasses
import sys

import numba
import pytest
import torch

from hybrid_runtime.cpu_decode import CpuDecodeStep, cpu_decode_step, unsupported_reason
from hybrid_runtime.cpu_ffn import ColdRows
from hybrid_runtime.hybrid import HybridFFN, PredictedHybridFFN, CpuStaging
from hybrid_runtime.model import ModelConfig, Transformer
from hybrid_runtime.predictor import LayerPredictor

BASE = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=80, max_seq_len=64)


def random_model(seed: int, dtype=torch.float32, **over) -> Transformer:
    cfg = ModelConfig(**{**BASE, **over})
    torch.manual_seed(seed)
    m = Transformer(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.1))
        for layer in m.layers:  # a bias channel so ReLU-family gates fire on ~30-60% of neurons
            for ffn in getattr(layer.ffn, "experts", [layer.ffn]):
                ffn.gate[:, 0] += 0.3
            if hasattr(layer.ffn, "router"):   # decisive routing: no near-ties for summation order to flip
                layer.ffn.router.mul_(40.0)
    m = m.to(dtype).eval().requires_grad_(False)
    m.setup_cache(1, cfg.max_seq_len)
    return m


def to_sparse_cpu(model: Transformer, predictor: bool, fmt: str = "bf16", seed: int = 0) -> None:
    """In place: every layer's FFN becomes an all-cold HybridFFN (as build_hybrid_model does on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    staging = CpuStaging()
    for layer in model.layers:
        ffn = layer.ffn
        empty = ffn.gate[:0]
        cold = ColdRows.from_torch(ffn.gate.data.float(), ffn.up.data.float(), ffn.down.data.float(), fmt=fmt)
        args = (ffn.norm, empty, empty, empty, cold, model.config.activation, staging)
        if predictor:
            p = LayerPredictor(model.config.dim, model.config.ffn_dim, rank=8, bias=True, threshold=0.1)
            with torch.no_grad():
                for t in (p.w1, p.w2, p.b1, p.b2):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            layer.ffn = PredictedHybridFFN(*args, predictor=p, predictor_reads_residual=seed % 2 == 1, n_hot=0)
        else:
            layer.ffn = HybridFFN(*args)


def compare(model: Transformer, steps: int = 12, prompt: int = 5, rtol: float = 1e-4, window: int | None = None):
    """Max relative logit error of the step vs the model's forward, over `steps` decode steps."""
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (1, prompt + steps), generator=gen)
    pos = torch.arange(model.max_seq_len)
    step = CpuDecodeStep(model)
    worst = 0.0
    with torch.inference_mode():
        model(tokens[:, :prompt], pos[:prompt], kv_len=prompt)
        for i in range(prompt, prompt + steps):
            snapshot = [(layer.attn.kv_cache.k.clone(), layer.attn.kv_cache.v.clone()) for layer in model.layers]
            ref = model(tokens[:, i:i + 1], pos[i:i + 1], kv_len=i + 1).float().clone()
            for layer, (k, v) in zip(model.layers, snapshot):   # the same cache state for the step
                layer.attn.kv_cache.k.copy_(k)
                layer.attn.kv_cache.v.copy_(v)
            got = step(tokens[:, i:i + 1], pos[i:i + 1], kv_len=i + 1).clone()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, err)
    assert worst < rtol, f"relative logit error {worst:.3g} >= {rtol}"
    return worst


@pytest.mark.parametrize("over", [
    {},                                                   # GQA, ReLU
    {"act": "silu", "n_kv_heads": 4},                     # MHA, SiLU
    {"act": "fatrelu", "act_threshold": 0.05, "attention_bias": True},
    {"act": "relu2", "tie_embeddings": True, "head_dim": 8},
    {"act": "drelu", "sliding_window": 4},
    {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 16, "architecture": "MiniCPMForCausalLM",
     "tie_embeddings": True},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}},
    {"n_experts": 4, "experts_per_token": 2, "act": "silu", "architecture": "MixtralForCausalLM"},
    {"n_experts": 8, "experts_per_token": 1, "act": "drelu", "sliding_window": 5,
     "architecture": "MixtralForCausalLM"},
], ids=["gqa-relu", "mha-silu", "fatrelu-bias", "relu2-tied-headdim", "drelu-window", "minicpm", "llama3-rope",
        "moe-top2-silu", "moe-top1-drelu-window"])
def test_dense_fp32_matches_forward(over):
    compare(random_model(0, **over), rtol=2e-5)


def test_dense_bf16_matches_fp32_forward_of_the_same_weights():
    bf = random_model(1, dtype=torch.bfloat16, act="silu")
    ref = random_model(1, dtype=torch.bfloat16, act="silu").float()   # the same bf16 values, run in fp32
    ref.setup_cache(1, ref.config.max_seq_len)
    # the reference cache is fp32, the step's bf16: run both and compare the logits of a greedy walk
    V, steps, prompt = bf.config.vocab_size, 16, 4
    tokens = torch.randint(0, V, (1, prompt + steps), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(64)
    step = CpuDecodeStep(bf)
    with torch.inference_mode():
        bf(tokens[:, :prompt], pos[:prompt], kv_len=prompt)
        ref(tokens[:, :prompt].clone(), pos[:prompt], kv_len=prompt)
        for layer_b, layer_r in zip(bf.layers, ref.layers):   # the same (bf16-rounded) prefill cache
            layer_r.attn.kv_cache.k.copy_(layer_b.attn.kv_cache.k.float())
            layer_r.attn.kv_cache.v.copy_(layer_b.attn.kv_cache.v.float())
        worst = 0.0
        for i in range(prompt, prompt + steps):
            want = ref(tokens[:, i:i + 1], pos[i:i + 1], kv_len=i + 1)
            for layer in ref.layers:   # the step stores k, v rounded to bf16: round the reference's too
                layer.attn.kv_cache.k[:, :, i].copy_(layer.attn.kv_cache.k[:, :, i].bfloat16().float())
                layer.attn.kv_cache.v[:, :, i].copy_(layer.attn.kv_cache.v[:, :, i].bfloat16().float())
            got = step(tokens[:, i:i + 1], pos[i:i + 1], kv_len=i + 1)
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    assert worst < 1e-2, worst          # bf16 rounding of the k/v written this step, nothing else


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "int8"])
@pytest.mark.parametrize("predictor", [False, True], ids=["exact", "predictor"])
def test_sparse_modes_match_forward(fmt, predictor):
    """All-cold hybrid layers (the CPU-only hybrid modes) against the same model's eager forward,
    whose HybridFFN runs the already-tested cold kernels through torch glue."""
    m = random_model(3, act="relu")
    to_sparse_cpu(m, predictor=predictor, fmt=fmt, seed=5 if predictor else 0)
    assert CpuDecodeStep(m).mode == ("predictor" if predictor else "exact")
    compare(m, rtol=2e-5)


def test_predictor_reading_the_residual():
    m = random_model(4, act="fatrelu", act_threshold=0.02)
    to_sparse_cpu(m, predictor=True, seed=7)                # odd seed: predictor reads the residual
    assert m.layers[0].ffn.reads_residual
    compare(m, rtol=2e-5)


def test_thread_counts_give_the_same_logits():
    m = random_model(5, act="relu")
    compare(m, rtol=2e-5)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        compare(m, rtol=2e-5)
    finally:
        numba.set_num_threads(before)


def test_greedy_tokens_equal_to_generate_with_the_eager_forward():
    from hybrid_runtime.generate import Generator, SamplingParams

    class Tok:
        eos_token_id = None

        def decode(self, ids, **kw):
            return "".join(chr(65 + i % 26) for i in ids)

    m = random_model(6, act="silu")
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    eager = Generator(m, Tok(), 64, "cpu").generate([1, 2, 3, 4], params).tokens
    fast = Generator(m, Tok(), 64, "cpu", decode_step=CpuDecodeStep(m)).generate([1, 2, 3, 4], params).tokens
    assert fast == eager and len(fast) == 20


def test_every_config_field_is_handled_or_the_model_decodes_eagerly(monkeypatch):
    from hybrid_runtime import cpu_decode
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert fields == cpu_decode.HANDLED_CONFIG_FIELDS, "a new ModelConfig field: implement it in cpu_decode.py"
    m = random_model(8)
    monkeypatch.setattr(cpu_decode, "HANDLED_CONFIG_FIELDS", cpu_decode.HANDLED_CONFIG_FIELDS - {"sliding_window"})
    assert "sliding_window" in unsupported_reason(m)


def test_unsupported_models_are_named_and_decode_stays_eager(capsys):
    m = random_model(7).to(torch.float16)
    assert "float16" in unsupported_reason(m)
    assert cpu_decode_step(m) is None
    assert "decoding with torch ops" in capsys.readouterr().err
    m = random_model(7)
    with pytest.raises(ValueError, match="kv_len"):
        CpuDecodeStep(m)(torch.tensor([[1]]), torch.tensor([3]), kv_len=9)


def test_a_model_that_does_not_fit_the_ram_is_one_line_before_loading(monkeypatch, capsys):
    from hybrid_runtime import session
    from hybrid_runtime.cli import main_group
    from hybrid_runtime.errors import console_main
    monkeypatch.setattr(session, "available_ram", lambda: 1024 ** 2)          # 1 MiB free
    monkeypatch.setattr(session, "load_model", lambda *a, **k: pytest.fail("loaded before the RAM check"))
    monkeypatch.setattr(sys, "argv", ["hybrid-run", "generate", "--device", "cpu", "--dense", "--prompt", "hi"])
    with pytest.raises(SystemExit) as e:
        console_main(main_group)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "GiB of RAM on the CPU" in err[0] and "available" in err[0] and "Traceback" not in err[0]
