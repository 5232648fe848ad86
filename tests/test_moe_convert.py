"""ProSparse on a mixture of experts: ReLU / dReLU / FATReLU experts in a Mixtral checkpoint (TurboSparse-Mixtral's
recipe), the L1 term and sparsity over the routed (token, expert) pairs, and `hybrid-convert prosparse` end to end.

The references are independent of `convert.prosparse.SparseExperts`: transformers' own experts (silu), the
runtime's engine (`hybrid_runtime.model.MoEFeedForward`, itself held to transformers in test_moe.py) and a
numpy recomputation of every routed expert's x1.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from convert.cli import main_group
from convert.data import train_bpe_tokenizer
from convert.prosparse import ActivationRecorder, SparseExperts, decoder_layers, load_hf_model, swap_activation
from hybrid_runtime.loading import load_model
from textgen import make_text

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny corpus and BPE tokenizer, and a random SiLU Mixtral (4 experts, top-2) saved by transformers."""
    from transformers import MixtralConfig, MixtralForCausalLM
    d = tmp_path_factory.mktemp("moe_convert")
    (d / "a.txt").write_text(make_text(500, seed=3))
    tok = train_bpe_tokenizer([d / "a.txt"], 300)
    torch.manual_seed(0)
    hf = MixtralForCausalLM(MixtralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)).eval()
    with torch.no_grad():   # HF's init gives a near-uniform router: make the routing matter
        for name, p in hf.named_parameters():
            if name.endswith("gate.weight"):
                p.mul_(20.0)
    hf.save_pretrained(d / "mixtral")
    tok.save_pretrained(d / "mixtral")
    return {"dir": d, "tok": tok, "model": d / "mixtral"}


def ids_for(env, n=2, t=16, seed=0):
    return torch.randint(3, len(env["tok"]), (n, t), generator=torch.Generator().manual_seed(seed))


def test_sparse_experts_compute_what_transformers_experts_do(env):
    """Swapped to SparseExperts with the model's own SiLU, a Mixtral's logits do not move."""
    from transformers import MixtralForCausalLM
    original = MixtralForCausalLM.from_pretrained(env["model"], local_files_only=True).eval()
    model = load_hf_model(env["model"]).eval()          # experts always wrapped (their probes)
    assert all(isinstance(l.mlp.experts, SparseExperts) for l in decoder_layers(model))
    ids = ids_for(env)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("act,threshold", [("relu", 0.0), ("drelu", 0.0), ("fatrelu", 0.05), ("relu2", 0.0)])
def test_swapped_mixtral_saves_a_checkpoint_the_engine_runs_identically(env, tmp_path, act, threshold):
    model = load_hf_model(env["model"]).eval()
    swap_activation(model, act, threshold)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["hidden_act"] == act and cfg["num_local_experts"] == 4
    reloaded = load_hf_model(tmp_path).eval()
    assert reloaded.model.layers[0].mlp.experts.act == act
    engine = load_model(tmp_path)
    assert (engine.config.act, engine.config.act_threshold, engine.config.n_experts) == (act, threshold, 4)
    ids = ids_for(env, 1, 12, seed=1)
    engine.setup_cache(1, 12)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(engine(ids, torch.arange(12)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["relu", "drelu"])
def test_recorder_l1_and_sparsity_over_routed_pairs_equal_hand_computation(env, act):
    """Per layer: mean |x1| and the zero share over every routed (token, expert) pair and every neuron."""
    model = load_hf_model(env["model"]).eval()
    swap_activation(model, act)
    moe_inputs = []
    hooks = [l.mlp.register_forward_pre_hook(lambda m, a: moe_inputs.append(a[0].detach().numpy()))
             for l in decoder_layers(model)]
    with ActivationRecorder(model, with_l1=True) as rec:
        model(input_ids=ids_for(env, 3, 16, seed=2))
    for h in hooks:
        h.remove()
    l1_hand, zeros_hand = 0.0, []
    for x, layer in zip(moe_inputs, decoder_layers(model)):
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)                 # (N, d)
        router = layer.mlp.gate.weight.detach().numpy().astype(np.float64)
        chosen = np.argsort(-(x @ router.T), axis=1, kind="stable")[:, :2]   # top-2 (softmax keeps the order)
        gate_up = layer.mlp.experts.gate_up_proj.detach().numpy().astype(np.float64)  # (E, 2f, d)
        f = gate_up.shape[1] // 2
        rows = []
        for n in range(x.shape[0]):
            for e in chosen[n]:
                g, u = gate_up[e, :f] @ x[n], gate_up[e, f:] @ x[n]
                rows.append(np.maximum(g, 0) * (np.maximum(u, 0) if act == "drelu" else u))
        x1 = np.stack(rows)                                               # (N * top_k, f)
        assert len(np.unique(chosen)) > 1                                 # the routing spreads tokens
        l1_hand += np.abs(x1).mean()
        zeros_hand.append((x1 == 0).mean())
    assert rec.l1().item() == pytest.approx(l1_hand, rel=1e-4)
    np.testing.assert_allclose(rec.sparsity_per_layer().numpy(), zeros_hand, rtol=1e-6)
    assert rec.l1().requires_grad


def cli(*args):
    return CliRunner().invoke(main_group, [str(a) for a in args])


@pytest.mark.parametrize("act,extra", [("drelu", ()), ("relu", ("--search-threshold", "--max-loss-increase", 0.05))],
                         ids=["drelu", "relu-fatrelu-search"])
def test_cli_prosparse_converts_a_mixtral(env, tmp_path, act, extra):
    out = tmp_path / "out"
    r = cli("prosparse", "--model", env["model"], "--data", env["dir"] / "a.txt", "--out", out, "--steps", 10,
            "--block-len", 16, "--batch-size", 4, "--lr", 3e-3, "--lambda-scale", 5, "--eval-tokens", 256,
            "--device", "cpu", "--activation", act, *extra)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert f"activation: silu -> {act} in 2 layers" in r.output
    rep = json.loads((out / "prosparse_report.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_act"] == rep["activation"] and cfg["num_local_experts"] == 4
    assert rep["eval"]["source"]["sparsity"] == 0.0                   # SiLU: no exact zeros
    assert rep["eval"]["final"]["sparsity_method"] == "exact-zero"
    assert rep["eval"]["final"]["sparsity"] > (0.7 if act == "drelu" else 0.4)
    if extra:
        assert rep["threshold_search"]["tried"]
    # the converted checkpoint: transformers (through load_hf_model) and the engine agree, and the report's
    # perplexity is what `hybrid-convert eval` measures on it
    model = load_hf_model(out).eval()
    engine = load_model(out)
    ids = ids_for(env, 1, 12, seed=4)
    engine.setup_cache(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(engine(ids, torch.arange(12)), model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    js = tmp_path / "eval.json"
    r = cli("eval", "--model", out, "--data", env["dir"] / "a.txt", "--block-len", 16, "--tokens", 256,
            "--json", js, "--device", "cpu")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert json.loads(js.read_text())["loss"] == pytest.approx(rep["eval"]["final"]["loss"], rel=1e-5)
    r = cli("eval", "--model", out, "--data", env["dir"] / "a.txt", "--block-len", 16, "--tokens", 256,
            "--sparsity", "cett", "--device", "cpu")
    assert r.exit_code != 0 and "experts" in str(r.exception)
