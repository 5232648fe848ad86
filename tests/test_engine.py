"""The dense engine against HF transformers: logits for a prompt and 16 decode steps, greedy tokens."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hybrid_runtime.activations import Activation
from hybrid_runtime.errors import UserError
from hybrid_runtime.loading import load_model
from hybrid_runtime.model import ModelConfig

PROMPT_LEN, DECODE_STEPS = 12, 16


def engine_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Prefill ids[:, :PROMPT_LEN] then feed the rest one token at a time; logits (T, V)."""
    model.setup_cache(1, 64)
    out = [model(ids[:, :PROMPT_LEN], torch.arange(PROMPT_LEN))[0]]
    for t in range(PROMPT_LEN, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], torch.tensor([t]))[0])
    return torch.cat(out).float()


def check_against_hf(hf_model, path, dtype=torch.float32, atol=1e-4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 262, (1, PROMPT_LEN + DECODE_STEPS), generator=g)
    with torch.no_grad():
        ref = hf_model(ids).logits[0].float()
    ours = engine_logits(load_model(path, dtype=dtype), ids)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, atol=atol, rtol=0)
    else:  # bf16: per-dtype bound, relative to the logits' scale
        rel = (ours - ref).norm() / ref.norm()
        assert rel < 2e-2, f"bf16 relative error {rel:.3e}"
    return ids


@pytest.mark.parametrize("arch,shard,tie,bin_format", [
    ("llama", False, False, False),
    ("llama", True, True, False),
    ("llama", True, False, True),
    ("llama", False, True, True),
    ("mistral", False, False, False),
    ("mistral", True, True, False),
])
def test_logits_match_hf_fp32(make_hf_model, arch, shard, tie, bin_format):
    hf, path = make_hf_model(arch=arch, shard=shard, tie=tie, bin_format=bin_format)
    assert (path / "model.safetensors.index.json").exists() or (path / "pytorch_model.bin.index.json").exists() or not shard
    check_against_hf(hf, path)


def test_logits_match_hf_bf16(make_hf_model):
    hf, path = make_hf_model(dtype=torch.bfloat16, shard=True)
    check_against_hf(hf.float(), path, dtype=torch.bfloat16)
    # the bf16 checkpoint also loads and runs as fp32 on request
    check_against_hf(hf.float(), path, dtype=torch.float32, atol=1e-4)


@pytest.mark.parametrize("act", ["relu", "relu2"])
def test_hf_supported_relu_activations(make_hf_model, act):
    hf, path = make_hf_model(hidden_act=act)
    check_against_hf(hf, path)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_rope_scaling_and_theta(make_hf_model, scaling):
    hf, path = make_hf_model(rope_parameters={"rope_theta": 500000.0, **scaling})
    check_against_hf(hf, path)


def test_old_style_rope_config_keys(make_hf_model):
    """Configs written by transformers 4.x use rope_theta + rope_scaling{"type": ...}."""
    hf, path = make_hf_model(rope_parameters={"rope_theta": 20000.0, "rope_type": "linear", "factor": 2.0})
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"], cfg["rope_scaling"] = 20000.0, {"type": "linear", "factor": 2.0}
    (path / "config.json").write_text(json.dumps(cfg))
    check_against_hf(hf, path)


class _FATReLU(torch.nn.Module):
    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, g):
        return torch.where(g >= self.t, g, torch.zeros_like(g))


def _patch_hf_activation(hf, act: str, threshold: float):
    """Reference: HF's own MLP modules with the activation replaced in plain torch."""
    for layer in hf.model.layers:
        mlp = layer.mlp
        if act == "fatrelu":
            mlp.act_fn = _FATReLU(threshold)
        elif act == "drelu":
            mlp.forward = lambda x, m=mlp: m.down_proj(F.relu(m.gate_proj(x)) * F.relu(m.up_proj(x)))


@pytest.mark.parametrize("act,threshold", [("fatrelu", 0.01), ("fatrelu", 0.2), ("drelu", 0.0)])
def test_prosparse_and_drelu_activations(make_hf_model, act, threshold):
    hf, path = make_hf_model(hidden_act="relu")
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden_act"] = act
    if act == "fatrelu":
        cfg["hidden_act_param"] = threshold  # as the released ProSparse checkpoints write it
        cfg["architectures"] = ["SparseLlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    _patch_hf_activation(hf, act, threshold)
    check_against_hf(hf, path)


def test_minicpm_scalings(make_hf_model):
    """MiniCPM (scale_emb, scale_depth, dim_model_base, tied) equals an HF LLaMA with folded weights."""
    hf, path = make_hf_model(tie=True, hidden_act="relu")
    scale_emb, scale_depth, base = 12.0, 1.4, 16
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["MiniCPMForCausalLM"], model_type="minicpm", scale_emb=scale_emb,
               scale_depth=scale_depth, dim_model_base=base)
    (path / "config.json").write_text(json.dumps(cfg))
    # Fold the scalings into an untied HF reference model
    from transformers import LlamaForCausalLM
    ref_cfg = hf.config
    ref_cfg.tie_word_embeddings = False
    ref = LlamaForCausalLM(ref_cfg).eval()
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    W = sd["model.embed_tokens.weight"]
    sd["model.embed_tokens.weight"] = W * scale_emb
    sd["lm_head.weight"] = W * (base / cfg["hidden_size"])
    res = scale_depth / cfg["num_hidden_layers"] ** 0.5
    for i in range(cfg["num_hidden_layers"]):
        sd[f"model.layers.{i}.self_attn.o_proj.weight"] *= res
        sd[f"model.layers.{i}.mlp.down_proj.weight"] *= res
    ref.load_state_dict(sd)
    check_against_hf(ref, path, atol=2e-4)


def test_greedy_tokens_match_hf_generate(make_hf_model):
    from hybrid_runtime.generate import Generator, SamplingParams
    from hybrid_runtime.loading import load_tokenizer
    hf, path = make_hf_model(hidden_act="relu", seed=3)
    model = load_model(path)
    model.setup_cache(1, 128)
    prompt = [0, 50, 60, 70, 80, 90]
    gen = Generator(model, load_tokenizer(path), context=128, device="cpu", eos_ids=[])
    ours = gen.generate(prompt, SamplingParams(max_new_tokens=20)).tokens
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=2, min_new_tokens=20)[0, len(prompt):].tolist()
    # our generator stops at EOS id 1 of the tokenizer; compare up to it
    if 1 in ref:
        ref = ref[:ref.index(1)]
    assert ours == ref


def test_activation_functions_reference():
    g = torch.tensor([-1.0, 0.0, 0.005, 0.01, 0.5])
    u = torch.tensor([2.0, 2.0, 2.0, -2.0, 2.0])
    fatrelu, relu2, drelu, relu = (Activation("fatrelu", 0.01), Activation("relu2"), Activation("drelu"),
                                   Activation("relu"))
    assert fatrelu(g, u).tolist() == pytest.approx([0.0, 0.0, 0.0, -0.02, 1.0])
    assert fatrelu.active(g, u).tolist() == [False, False, False, True, True]
    assert relu2(g, u).tolist() == pytest.approx([0, 0, 2 * 0.005 ** 2, -2 * 0.01 ** 2, 0.5])
    assert drelu(g, u).tolist() == pytest.approx([0, 0, 0.01, 0, 1.0])
    assert drelu.active(g, u).tolist() == [False, False, True, False, True]
    assert relu.active(g, u).tolist() == [False, False, True, True, True]
    for act in (fatrelu, relu2, drelu, relu, Activation("silu")):   # the numpy twin (CPU kernels' reference)
        assert act.numpy(g.double().numpy(), u.double().numpy()) == pytest.approx(act(g.double(), u.double()).numpy())
    with pytest.raises(UserError, match="no exact zeros"):
        Activation("silu").active(g, u)
    for bad in (("gelu", 0.0), ("relu", 0.1), ("fatrelu", -1.0), ("fatrelu", float("nan"))):
        with pytest.raises(UserError):
            Activation(*bad)


def test_config_derived_fields():
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                               "num_hidden_layers": 4, "num_attention_heads": 8,
                               "intermediate_size": 100, "vocab_size": 10})
    assert cfg.head_dim == 8 and cfg.n_kv_heads == 8 and cfg.residual_scale == 1.0 and cfg.act == "silu"
