"""ProSparse building blocks: schedule, L1 term, activations and swap, HF loading, CETT, data."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convert.data import load_token_blocks, read_documents, split_documents, train_bpe_tokenizer
from convert.evaluate import evaluate
from hybrid_runtime.activations import cett, cett_threshold
from convert.prosparse import (ACTIVATIONS, PRESETS, ActivationRecorder, LambdaSchedule, decoder_layers, fatrelu,
                               l1_regularizer, load_hf_model, preset_schedule, sine_schedule, swap_activation)
from convert.train import LlamaSpec, build_llama
from hybrid_runtime.errors import UserError
from textgen import make_text

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random SwiGLU LlamaForCausalLM + byte-level BPE tokenizer, saved as an HF directory."""
    d = tmp_path_factory.mktemp("tiny")
    (d / "text.txt").write_text(make_text(400))
    tok = train_bpe_tokenizer([d / "text.txt"], 300)
    model = build_llama(LlamaSpec(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                  vocab_size=len(tok), max_seq_len=64), tok, seed=0)
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return d, model, tok


# ----------------------------------------------------------------------------- schedule

def paper_lambda(t, lambdas, bounds):
    """Alg. 1 of the paper written out independently: stage 0 and warm-up constant, then sine ramps."""
    if t <= bounds[0]:
        return lambdas[0]
    if t <= bounds[1]:
        return lambdas[1]
    for i in range(2, len(bounds)):
        if t <= bounds[i]:
            eta = 0.5 * (np.sin(-np.pi / 2 + np.pi * (t - bounds[i - 1]) / (bounds[i] - bounds[i - 1])) + 1)
            return lambdas[i - 1] + eta * (lambdas[i] - lambdas[i - 1])
    return lambdas[-1]


@pytest.mark.parametrize("name", list(PRESETS))
def test_schedule_matches_paper_formula_and_is_monotone(name):
    s = PRESETS[name]
    lam, bnd = s.lambdas, s.boundaries
    # at every boundary the stage target is reached exactly
    for i, b in enumerate(bnd):
        assert s(b) == pytest.approx(lam[i], abs=1e-15)
    # inside stages: midpoint of a ramp is the mean of its ends, and arbitrary points follow the formula
    for i in range(2, len(bnd)):
        mid = (bnd[i - 1] + bnd[i]) / 2
        assert s(mid) == pytest.approx((lam[i - 1] + lam[i]) / 2, rel=1e-12)
    steps = np.arange(0, bnd[-1] + 200)
    vals = np.array([s(int(t)) for t in steps])
    ref = np.array([paper_lambda(int(t), lam, bnd) for t in steps])
    np.testing.assert_allclose(vals, ref, rtol=0, atol=1e-15)
    assert np.all(np.diff(vals) >= 0), "schedule must be non-decreasing"
    assert vals[0] == 0 and vals[-1] == lam[-1]


def test_schedule_hand_values_7b():
    s = PRESETS["7b"]
    assert s(0) == 0 and s(5000) == 0
    assert s(5001) == 5e-3 and s(6000) == 5e-3                 # warm-up holds lambda_1
    assert s(7000) == pytest.approx(5e-3 + (5e-2 - 5e-3) * 0.5 * (math.sin(-math.pi / 4) + 1))
    assert s(11000) == 5e-2                                      # equal targets hold lambda
    assert s(14000) == pytest.approx(0.125)
    assert s(10 ** 6) == 0.2


def test_preset_scaled_to_steps():
    s = preset_schedule("7b", steps=1650, lambda_scale=0.5)
    assert s.boundaries == [500, 600, 1000, 1200, 1600, 1650]
    assert s.lambdas == pytest.approx([0, 2.5e-3, 2.5e-2, 2.5e-2, 0.1, 0.1])
    tiny = preset_schedule("minicpm-1b", steps=5)   # stages collapse to zero length: no division by zero
    assert [tiny(t) for t in range(8)][-1] == 5e-2
    assert sine_schedule([0, 1], [1, 2]).lambdas == [0.0, 1.0]


def test_schedule_bad_input(tmp_path):
    with pytest.raises(UserError, match="5 lambda values but 6 boundaries"):
        LambdaSchedule([0, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6])
    with pytest.raises(UserError, match=">= 0"):
        LambdaSchedule([0, -0.1], [1, 2])
    with pytest.raises(UserError, match="non-decreasing"):
        LambdaSchedule([0, 0.1], [5, 2])
    with pytest.raises(UserError, match="unknown schedule preset"):
        preset_schedule("70b")
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"lambdas": [0, 0.1, 0.2], "boundaries": [10, 20, 30]}))
    assert LambdaSchedule.from_json(f)(25) == pytest.approx(0.15)
    f.write_text("{not json")
    with pytest.raises(UserError, match="s.json"):
        LambdaSchedule.from_json(f)
    f.write_text(json.dumps({"lambdas": [0, 0.1], "boundaries": [10]}))
    with pytest.raises(UserError, match="s.json.*2 lambda values but 1 boundaries"):
        LambdaSchedule.from_json(f)


# ----------------------------------------------------------------------------- activations, L1, recorder

def test_fatrelu_zeroes_exactly_below_threshold():
    t = 0.25
    below = float(np.nextafter(np.float32(t), np.float32(0)))
    x = torch.tensor([-3.0, -0.0, 0.0, 0.1, below, t, 0.2500001, 1.0, 7.5], requires_grad=True)
    y = fatrelu(x, t)
    expected = torch.tensor([0, 0, 0, 0, 0, t, 0.2500001, 1.0, 7.5])
    assert torch.equal(y.detach(), expected)
    y.sum().backward()
    assert torch.equal(x.grad, (x.detach() >= t).float())  # identity above t, zero below
    r = torch.randn(1000) * 0.3
    assert torch.equal(fatrelu(r, t), torch.where(r >= t, r, 0.0))
    assert torch.equal(fatrelu(r, 0.0), F.relu(r))


def act_ref(g, u, act, threshold):
    """The shared convention (apply_act) written out: a = act(g) * u; drelu = relu(g) * relu(u)."""
    if act == "silu":
        return g * torch.sigmoid(g) * u
    if act == "relu":
        return torch.clamp(g, min=0) * u
    if act == "fatrelu":
        return g * (g >= threshold) * u
    if act == "relu2":
        return torch.clamp(g, min=0) ** 2 * u
    if act == "drelu":
        return torch.clamp(g, min=0) * torch.clamp(u, min=0)
    raise AssertionError(act)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_swap_activation_matches_reference(tiny, act):
    _, model0, _ = tiny
    model = build_llama(LlamaSpec(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                  vocab_size=model0.config.vocab_size, max_seq_len=64), seed=0)
    threshold = 0.05 if act == "fatrelu" else 0.0
    swap_activation(model, act, threshold)
    assert model.config.hidden_act == act
    assert (getattr(model.config, "hidden_act_param", None) == threshold) == (act == "fatrelu")
    x = torch.randn(2, 5, 32)
    for layer in decoder_layers(model):
        mlp = layer.mlp
        g, u = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
        ref = act_ref(g, u, act, threshold) @ mlp.down_proj.weight.T
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)
    # state dict keys are those of transformers' LlamaMLP
    assert "model.layers.0.mlp.gate_proj.weight" in model.state_dict()


def test_swap_activation_bad_input(tiny):
    _, model, _ = tiny
    m = build_llama(LlamaSpec(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=300,
                              max_seq_len=64))
    with pytest.raises(UserError, match="threshold > 0"):
        swap_activation(m, "fatrelu")
    with pytest.raises(UserError, match="fatrelu only"):
        swap_activation(m, "relu", 0.1)
    with pytest.raises(UserError, match="not supported"):
        swap_activation(m, "gelu")
    with pytest.raises(UserError, match="not a LLaMA-family"):
        swap_activation(torch.nn.Linear(2, 2), "relu")


def test_l1_regularizer_hand_computation():
    x1 = torch.tensor([[[1.0, -2.0, 0.0], [0.5, 0.0, -0.5]]])  # (1, 2, 3)
    assert l1_regularizer(x1).item() == pytest.approx((1 + 2 + 0 + 0.5 + 0 + 0.5) / 6)


@pytest.mark.parametrize("act", ["relu", "drelu"])
def test_recorder_l1_and_sparsity_equal_hand_computation(tiny, act):
    """Sum over layers of mean |x1|, and the zero share, recomputed in numpy from each MLP's input."""
    _, model0, _ = tiny
    model = build_llama(LlamaSpec(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                  vocab_size=model0.config.vocab_size, max_seq_len=64), seed=1)
    swap_activation(model, act)
    mlp_inputs = []
    hooks = [l.mlp.register_forward_pre_hook(lambda m, a: mlp_inputs.append(a[0].detach().numpy()))
             for l in decoder_layers(model)]
    ids = torch.randint(0, model.config.vocab_size, (3, 16))
    with ActivationRecorder(model, with_l1=True) as rec:
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    l1_hand, zeros_hand = 0.0, []
    for x, layer in zip(mlp_inputs, decoder_layers(model)):
        g = x @ layer.mlp.gate_proj.weight.detach().numpy().T
        u = x @ layer.mlp.up_proj.weight.detach().numpy().T
        x1 = np.maximum(g, 0) * (np.maximum(u, 0) if act == "drelu" else u)
        l1_hand += np.abs(x1).sum() / x1.size
        zeros_hand.append((x1 == 0).mean())
    assert rec.l1().item() == pytest.approx(l1_hand, rel=1e-5)
    np.testing.assert_allclose(rec.sparsity_per_layer().numpy(), zeros_hand, rtol=1e-6)
    assert rec.l1().requires_grad


# ----------------------------------------------------------------------------- loading HF checkpoints

@pytest.mark.parametrize("act", ["fatrelu", "drelu", "relu2"])
def test_load_hf_model_with_activations_transformers_does_not_know(tiny, tmp_path, act):
    d, model0, tok = tiny
    model = load_hf_model(d / "model")
    swap_activation(model, act, 0.02 if act == "fatrelu" else 0.0)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["hidden_act"] == act and (cfg.get("hidden_act_param") == 0.02) == (act == "fatrelu")
    # as the released ProSparse checkpoints: custom-code pointers that we must not need
    cfg.update({"architectures": ["SparseLlamaForCausalLM"],
                "auto_map": {"AutoConfig": "configuration_sparsellama.SparseLlamaConfig",
                             "AutoModelForCausalLM": "modeling_sparsellama.SparseLlamaForCausalLM"}})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_hf_model(tmp_path)
    assert loaded.config.hidden_act == act
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    # the runtime's own engine reads the same config and computes the same function
    from hybrid_runtime.loading import load_model
    engine = load_model(tmp_path)
    assert (engine.config.act, engine.config.act_threshold) == (act, 0.02 if act == "fatrelu" else 0.0)
    engine.setup_cache(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(engine(ids[:1], torch.arange(12)), model(input_ids=ids[:1]).logits,
                                   rtol=1e-5, atol=1e-5)


def test_load_hf_model_bad_input(tmp_path, tiny):
    d, _, _ = tiny
    with pytest.raises(UserError, match="config.json: missing"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type 'gpt2' is not LLaMA-family"):
        load_hf_model(tmp_path)
    cfg = json.loads((d / "model" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu_new"}))
    with pytest.raises(UserError, match="hidden_act 'gelu_new' is not supported"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "fatrelu"}))
    with pytest.raises(UserError, match="hidden_act_param > 0"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # config but no weights
    with pytest.raises(UserError, match="no weights found"):
        load_hf_model(tmp_path)


# ----------------------------------------------------------------------------- CETT

def cett_ref(x1: np.ndarray, w: np.ndarray, eps: float) -> float:
    """Per token: || sum of neuron outputs with ||n_i|| <= eps || / || sum of all ||, averaged."""
    vals = []
    for row in x1:
        n = row[None, :] * w                     # (d, f): column i is neuron i's output
        mag = np.linalg.norm(n, axis=0)
        vals.append(np.linalg.norm(n[:, mag <= eps].sum(1)) / np.linalg.norm(n.sum(1)))
    return float(np.mean(vals))


def test_cett_threshold_against_reference():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(48, 40, generator=g) * torch.rand(48, 40, generator=g) ** 3  # heavy-tailed
    w = torch.randn(16, 40, generator=g)
    bound = 0.2
    eps, sparsity, err = cett_threshold(x1, w.T, bound)   # w is HF's (d, f); the table takes (f, d)
    xn, wn = x1.double().numpy(), w.double().numpy()
    assert err == pytest.approx(cett_ref(xn, wn, eps), rel=1e-4)
    assert cett_ref(xn, wn, eps) <= bound + 1e-6
    mag = (x1.abs() * w.norm(dim=0)).numpy()    # fp32, as the implementation compares them
    nxt = mag[mag > eps].min()                  # one more neuron-token truncated: over the bound
    assert cett_ref(xn, wn, nxt) > bound
    assert sparsity == pytest.approx((mag <= eps).mean(), abs=1e-6)
    assert cett(x1, w.T, 0.0).item() == 0.0


def test_evaluate_exact_and_cett(tiny):
    d, _, tok = tiny
    model = load_hf_model(d / "model")
    blocks = load_token_blocks([d / "text.txt"], tok, 16, "heldout")
    silu = evaluate(model, blocks, batch_size=4, cett_tokens=128)
    assert silu["sparsity_method"] == "cett" and 0 < silu["sparsity"] < 1
    assert silu["exact_zero"]["mean"] == 0.0
    assert len(silu["sparsity_per_layer"]) == 2
    swap_activation(model, "relu")
    relu = evaluate(model, blocks, batch_size=4, sparsity="both", cett_tokens=128)
    assert relu["sparsity_method"] == "exact-zero" and relu["sparsity"] == relu["exact_zero"]["mean"]
    assert relu["cett"]["mean"] >= relu["exact_zero"]["mean"] - 1e-9  # zeros are always truncated
    assert relu["perplexity"] == pytest.approx(math.exp(relu["loss"]))


# ----------------------------------------------------------------------------- data

def test_split_convention_last_5_percent_at_a_newline(tmp_path):
    text = make_text(300, seed=3)
    f = tmp_path / "a.txt"
    f.write_text(text)
    docs = read_documents(f)
    train = split_documents(docs, "train")
    held = split_documents(docs, "heldout")
    assert train[0].text + held[0].text == text
    assert train[0].text.endswith("\n")
    cut = len(train[0].text)
    assert math.ceil(0.95 * len(text)) <= cut < math.ceil(0.95 * len(text)) + 80
    assert (train[0].starts_doc, train[0].ends_doc, held[0].starts_doc, held[0].ends_doc) == (True, False, False, True)
    # jsonl: whole records after the cut are held out; the record the cut falls in is split at a newline
    recs = [make_text(10, seed=i) for i in range(40)]
    j = tmp_path / "b.jsonl"
    j.write_text("\n".join(json.dumps({"text": r}) for r in recs) + "\n\n")
    tr, he = split_documents(read_documents(j), "train"), split_documents(read_documents(j), "heldout")
    assert "".join(p.text for p in tr) + "".join(p.text for p in he) == "".join(recs)
    assert 0.04 < sum(len(p.text) for p in he) / len("".join(recs)) < 0.07


def test_load_token_blocks_packs_with_bos_eos(tmp_path, tiny):
    _, _, tok = tiny
    f = tmp_path / "a.jsonl"
    f.write_text("\n".join(json.dumps({"text": make_text(5, seed=i)}) for i in range(30)))
    blocks = load_token_blocks([f], tok, 16, "all")
    flat = blocks.flatten().tolist()
    assert blocks.dtype == torch.int64 and blocks.shape[1] == 16
    assert flat[0] == tok.bos_token_id and flat.count(tok.eos_token_id) >= 29
    ids = tok(make_text(5, seed=0), add_special_tokens=False)["input_ids"]
    assert flat[1:1 + len(ids)] == ids
    capped = load_token_blocks([f, f], tok, 16, "train", max_tokens=64)
    assert capped.shape == (4, 16)


def test_data_bad_input(tmp_path, tiny):
    _, _, tok = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="empty.txt: empty file"):
        load_token_blocks([empty], tok, 8)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff\xfe world")
    with pytest.raises(UserError, match="bad.txt: not valid UTF-8"):
        load_token_blocks([bad], tok, 8)
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(UserError, match="x.jsonl:2: expected an object with a string field 'text'"):
        load_token_blocks([j], tok, 8)
    j.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(UserError, match="x.jsonl:2: not valid JSON"):
        load_token_blocks([j], tok, 8)
    small = tmp_path / "small.txt"
    small.write_text("the cat sat.\n")
    with pytest.raises(UserError, match="fewer than one block of 64"):
        load_token_blocks([small], tok, 64)
    with pytest.raises(UserError, match="not found|cannot read"):
        load_token_blocks([tmp_path / "missing.txt"], tok, 8)
