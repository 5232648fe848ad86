"""The hybrid runtime on a mixture of experts: per-expert profile, per-expert hot prefixes, predictors over the
routed experts' neurons, cold expert rows through the Numba kernels.

A tiny ReLU Mixtral (4 experts, top-2) written by transformers goes through `hybrid-convert all`. The checks are
independent of the code under test: the profile is recounted from transformers' own layer inputs in numpy,
`--exact` must give the dense engine's tokens and logits, and predictor mode is held to a per-token torch
reference that masks each routed expert's activation with the predictor.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from convert.cli import main_group
from hybrid_runtime.errors import UserError
from hybrid_runtime.hybrid import HybridMoEFFN, build_hybrid_model
from hybrid_runtime.loading import load_model
from hybrid_runtime.model import route
from hybrid_runtime.placement import ModelShape, solve_placement
from hybrid_runtime.model_dir import open_model_dir
from textgen import make_text

from conftest import save_hf_model

E, TOP_K, F_DIM, D = 4, 2, 96, 64
CAL = dict(tokens=4096, block_len=64)


@pytest.fixture(scope="module")
def moe(tmp_path_factory, byte_tokenizer_dir):
    from transformers import MixtralConfig, MixtralForCausalLM
    d = tmp_path_factory.mktemp("moe_hybrid")
    (d / "cal.txt").write_text(make_text(2000, seed=5))
    torch.manual_seed(0)
    hf = MixtralForCausalLM(MixtralConfig(
        hidden_size=D, intermediate_size=F_DIM, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=262, max_position_embeddings=256, num_local_experts=E, num_experts_per_tok=TOP_K,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False, hidden_act="relu")).eval()
    with torch.no_grad():       # a near-uniform router at HF's init: make the routing matter
        for name, p in hf.named_parameters():
            if name.endswith("gate.weight"):
                p.mul_(20.0)
    # stored as bfloat16 (as released checkpoints are): the default cold rows are then the checkpoint's own bits,
    # and every float32 run computes the same function
    src = save_hf_model(hf.to(torch.bfloat16), d / "relu-mixtral", byte_tokenizer_dir)
    hf = hf.float()
    out = d / "hybrid"
    r = CliRunner().invoke(main_group, [str(a) for a in (
        "all", "--model", src, "--data", d / "cal.txt", "--out", out, "--tokens", CAL["tokens"],
        "--block-len", CAL["block_len"], "--samples-per-layer", 2048, "--max-epochs", 8, "--device", "cpu",
        "--dtype", "float32")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return {"dir": d, "hf": hf, "src": src, "out": out, "work": d / "hybrid.work"}


def test_profile_counts_each_routed_expert_neuron_as_transformers_computes_it(moe):
    """frequency of expert e's neuron i = share of tokens routed to e on which i fires (recounted in numpy)."""
    from convert.data import load_token_blocks
    from hybrid_runtime.loading import load_tokenizer
    prof = json.loads((moe["work"] / "profile" / "profile.json").read_text())
    assert prof["model_config"]["ffn_dim"] == E * F_DIM and prof["model_config"]["n_experts"] == E
    counts = load_file(str(moe["work"] / "profile" / "frequencies.safetensors"))["counts"]   # (L, E*f)
    blocks = load_token_blocks([moe["dir"] / "cal.txt"], load_tokenizer(moe["src"]), CAL["block_len"], "train",
                               CAL["tokens"])
    hf = moe["hf"]
    inputs = []
    hooks = [l.mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().reshape(-1, D).numpy()))
             for l in hf.model.layers]
    with torch.no_grad():
        for b in blocks:
            hf(input_ids=b[None])
    for h in hooks:
        h.remove()
    L = len(hf.model.layers)
    for i, layer in enumerate(hf.model.layers):
        x = np.concatenate(inputs[i::L]).astype(np.float64)                               # (N, d)
        router = layer.mlp.gate.weight.detach().numpy().astype(np.float64)
        chosen = np.argsort(-(x @ router.T), axis=1, kind="stable")[:, :TOP_K]
        gate_up = layer.mlp.experts.gate_up_proj.detach().numpy().astype(np.float64)    # (E, 2f, d)
        ref = np.zeros((E, F_DIM), np.int64)
        for e in range(E):
            routed = (chosen == e).any(axis=1)
            ref[e] = ((x[routed] @ gate_up[e, :F_DIM].T) > 0).sum(axis=0)              # ReLU: fires iff g > 0
        assert ref.sum() > 0 and (ref.sum(axis=1) > 0).all()                           # every expert is used
        # two fp32 engines and a float64 recount may flip a gate sitting at 0 or a router near-tie: a few counts
        # in 10^5 (counting the unrouted experts too, or another expert order, is off by thousands)
        assert np.abs(counts[i].reshape(E, F_DIM) - ref).sum() <= 3 + 1e-4 * ref.sum(), i


def test_pack_sorts_each_expert_on_its_own_and_keeps_the_function(moe):
    md = open_model_dir(moe["out"])
    assert md.hybrid.raw["n_experts"] == E and md.hybrid.raw["ffn_dim"] == F_DIM
    stats = load_file(str(md.hybrid.stats_file))
    for i, freq in enumerate(md.hybrid.frequencies()):
        per_expert = freq.reshape(E, F_DIM)
        assert (np.diff(per_expert, axis=1) <= 0).all()
        src = stats[f"layers.{i}.source_index"].reshape(E, F_DIM)
        for e in range(E):                    # a permutation inside each expert (the router picks whole experts)
            assert sorted(src[e] - e * F_DIM) == list(range(F_DIM))
        assert not (src == np.arange(E * F_DIM).reshape(E, F_DIM)).all()
    ids = torch.randint(3, 262, (1, 20), generator=torch.Generator().manual_seed(1))
    a, b = load_model(moe["src"], dtype=torch.float32), load_model(moe["out"], dtype=torch.float32)
    for m in (a, b):
        m.setup_cache(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(b(ids, torch.arange(20)), a(ids, torch.arange(20)), rtol=1e-5, atol=1e-5)


def greedy(model, ids: torch.Tensor, n: int):
    """(first logits (T, V), n greedy tokens) with the model's own forward and KV cache."""
    model.setup_cache(1, ids.shape[1] + n)
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]))[0]
        first, out, pos = logits.clone(), [], ids.shape[1]
        for _ in range(n):
            tok = int(logits[-1].argmax())
            out.append(tok)
            logits = model(torch.tensor([[tok]]), torch.tensor([pos]))[0]
            pos += 1
    return first, out


@pytest.mark.parametrize("hot", [0, 40, F_DIM, "mixed"])
def test_exact_mode_equals_dense(moe, hot):
    hot_counts = [[0, 96, 32, 64], [96, 0, 64, 32]] if hot == "mixed" else [[hot] * E] * 2
    model = build_hybrid_model(moe["out"], hot_counts, torch.device("cpu"), dtype=torch.float32, mode="exact")
    assert all(isinstance(l.ffn, HybridMoEFFN) for l in model.layers)
    assert [l.ffn.n_hot for l in model.layers] == hot_counts
    ids = torch.randint(3, 262, (1, 16), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_tokens = greedy(load_model(moe["src"], dtype=torch.float32), ids, 24)
    logits, tokens = greedy(model, ids, 24)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert tokens == ref_tokens


def test_predictor_mode_computes_the_predicted_neurons_of_the_routed_experts(moe):
    hot_counts = [[0, 96, 32, 64], [96, 0, 64, 32]]
    model = build_hybrid_model(moe["out"], hot_counts, torch.device("cpu"), dtype=torch.float32, mode="predictor")
    exact = build_hybrid_model(moe["out"], hot_counts, torch.device("cpu"), dtype=torch.float32, mode="exact")
    packed = load_model(moe["out"], dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    for i, layer in enumerate(model.layers):
        ffn, dense = layer.ffn, packed.layers[i].ffn
        assert ffn.predictor is not None
        h = torch.randn(1, 7, D, generator=gen)
        x = ffn.norm(h.view(7, D))
        weights, chosen = route(x, dense.router, TOP_K)
        keep = ffn.predictor(x) > ffn.predictor.threshold                               # (N, E*f)
        ref = torch.zeros_like(x)
        for n in range(7):
            for s in range(TOP_K):
                ex = dense.experts[int(chosen[n, s])]
                e = int(chosen[n, s])
                a = ex.activation(ex.gate @ x[n], ex.up @ x[n]) * keep[n, e * F_DIM:(e + 1) * F_DIM]
                ref[n] += weights[n, s] * (a @ ex.down)
        with torch.no_grad():
            # one token a call, as in decode (a prompt's tokens share their expert's union of predicted cold rows)
            got = torch.cat([ffn(h[:, n:n + 1])[0] for n in range(7)])
            full = torch.cat([exact.layers[i].ffn(h[:, n:n + 1])[0] for n in range(7)])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert (got - full).abs().max() > 10 * (got - ref).abs().max()   # the predictor changed the result


def test_placement_takes_the_globally_hottest_expert_neurons():
    shape = ModelShape(n_layers=2, dim=64, ffn_dim=128, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=100,
                       weight_bytes=2, n_experts=E)
    rng = np.random.default_rng(0)
    scale = np.array([[0.1, 0.9, 0.2, 0.05], [0.3, 0.3, 0.01, 0.6]])                 # per (layer, expert)
    freqs = [np.concatenate([-np.sort(-rng.random(128)) * s for s in scale[l]]) for l in range(2)]
    fixed = solve_placement(shape, freqs, 10 ** 9, context=16).fixed_bytes
    base = sum(fixed.values())
    assert fixed["routers"] == 2 * E * 64 * 2
    taken = []
    for n_granules in range(0, 17):
        p = solve_placement(shape, freqs, base + n_granules * 16 * 3 * 64 * 2, context=16, granule=16)
        assert len(p.hot_counts) == 2 and all(len(k) == E for k in p.hot_counts)
        assert sum(p.layer_hot) == 16 * n_granules                                  # every granule fits
        taken.append(np.array(p.hot_counts))
    for a, b in zip(taken, taken[1:]):
        assert (b >= a).all()                                                          # monotone in the budget
    first = taken[1]
    assert first[0, 1] == 16 and first.sum() == 16           # the hottest expert (layer 0, expert 1) first
    # brute force: the chosen granules are the 16 of highest mean frequency among all (layer, expert) granules
    means = np.array([[f[e * 128:(e + 1) * 128].reshape(8, 16).mean(axis=1) for e in range(E)] for f in freqs])
    best = np.sort(means.ravel())[::-1][:16]
    got = np.concatenate([means[l, e, :k // 16] for l in range(2) for e in range(E) for k in [taken[16][l, e]]])
    np.testing.assert_allclose(np.sort(got)[::-1], best)


def test_moe_hybrid_bad_input(moe, tmp_path):
    with pytest.raises(UserError, match="lists of 4 values"):
        build_hybrid_model(moe["out"], [10, 10], torch.device("cpu"), mode="exact")
    with pytest.raises(UserError, match="lists of 4 values"):
        build_hybrid_model(moe["out"], [[10] * 3] * 2, torch.device("cpu"), mode="exact")
    r = CliRunner().invoke(main_group, [str(a) for a in (
        "profile", "--model", moe["src"], "--data", moe["dir"] / "cal.txt", "--out", tmp_path / "p", "--cett", 0.2)])
    assert r.exit_code != 0 and "experts" in str(r.exception)


def test_generate_cli_exact_and_predictor_on_a_hybrid_mixtral(moe, capsys, monkeypatch):
    """`hybrid-run generate` on the packed directory: --exact prints the dense checkpoint's text; both hybrid modes
    decode with the one-call CPU step."""
    import sys
    from hybrid_runtime.cli import main_group
    from hybrid_runtime.errors import console_main
    texts = {}
    for flag, model in (("--dense", moe["src"]), ("--exact", moe["out"]), ("--predictor", moe["out"])):
        args = ["hybrid-run", "generate", "--model", str(model), "--device", "cpu", "--prompt", "The cat",
                "-n", "12", "--temperature", "0", "--dtype", "float32"] + ([] if model == moe["src"] else [flag])
        monkeypatch.setattr(sys, "argv", args)
        console_main(main_group)                 # returns on success (exit status 0)
        out, err = capsys.readouterr()
        assert f"mode {flag[2:]}" in err and "decode: 11 steps" in err
        if flag != "--dense":
            assert f"one-call Numba CPU decode (hybrid mixture-of-experts {flag[2:]} FFN" in err
        texts[flag] = out
    assert texts["--exact"] == texts["--dense"]


def test_eval_modes_report_moe_perplexity_and_match_the_runtime(moe):
    """`hybrid-convert eval --mode`: exact has the dense perplexity; predictor mode's reference computes what the
    runtime's predictor mode computes (all rows hot: one token's own mask per row, as in decode)."""
    from convert.data import load_token_blocks
    from convert.evaluate import evaluate_modes
    from hybrid_runtime.hybrid import ReferenceMoEFFN
    from hybrid_runtime.loading import load_tokenizer
    from hybrid_runtime.predictor import PredictorSet
    blocks = load_token_blocks([moe["dir"] / "cal.txt"], load_tokenizer(moe["src"]), 64, "heldout", 512)
    res = evaluate_modes(moe["out"], blocks, free_prompts=1, free_prompt_len=8, free_tokens=8)
    dense, exact, pred = (res["modes"][m] for m in ("dense", "exact", "predictor"))
    assert exact["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-5)
    assert exact["teacher_forced_agreement"] == 1.0
    assert 0.5 < exact["ffn_sparsity"] < 0.95               # top-2 of 4 experts, ReLU: ~75% of all neurons idle
    assert pred["ffn_sparsity"] > exact["ffn_sparsity"] and 0.8 < pred["predictor_recall"] < 1.0
    assert pred["perplexity"] != dense["perplexity"]
    runtime = build_hybrid_model(moe["out"], [[F_DIM] * E] * 2, torch.device("cpu"), dtype=torch.float32,
                                 mode="predictor")
    ref = load_model(moe["out"], dtype=torch.float32)
    preds = PredictorSet.load(open_model_dir(moe["out"]).hybrid.predictors_file)
    for i, layer in enumerate(ref.layers):
        layer.ffn = ReferenceMoEFFN(layer.ffn, ref.config.activation, "predictor", preds.layers[i])
    ids = blocks[:1, :32]
    for m in (runtime, ref):
        m.setup_cache(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(runtime(ids, torch.arange(32)), ref(ids, torch.arange(32)), rtol=1e-5, atol=1e-5)


def test_bench_runs_the_hybrid_moe_on_the_cpu(moe, tmp_path):
    """`hybrid-run bench` on a hybrid Mixtral directory: both CPU hybrid modes run; exact gives dense's tokens."""
    import bench.run_bench as rb
    res = rb.run_bench(rb.BenchOptions(model=str(moe["out"]), systems="dense-cpu,hybrid-cpu,hybrid-cpu-exact",
                                       prompt_tokens=8, new_tokens=6, runs=1, sweep="none", work=str(tmp_path / "w"),
                                       out=str(tmp_path / "o")))
    rows = {r["system"]: r for r in res["systems"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["hybrid-cpu-exact"]["same_tokens_as_dense"] == rows["hybrid-cpu-exact"]["new_tokens"] == 6
    assert rows["hybrid-cpu"]["info"]["ffn_neurons"] == 2 * E * F_DIM


@pytest.mark.parametrize("mode,fmt", [("exact", "bf16"), ("predictor", "bf16"), ("exact", "q8_0"),
                                      ("predictor", "q4_1")])
def test_one_call_cpu_decode_runs_the_hybrid_moe_as_the_forward_does(moe, mode, fmt):
    """The one-call CPU decode's hybrid-MoE path (routing, the predictor's hidden layer once and the chosen
    experts' output rows, each expert's cold rows) against the eager HybridMoEFFN forward, step by step."""
    from hybrid_runtime.cpu_decode import CpuDecodeStep
    from test_cpu_decode import compare
    model = build_hybrid_model(moe["out"], [[0] * E] * 2, torch.device("cpu"), dtype=torch.float32, mode=mode,
                               cold_format=fmt)
    model.setup_cache(1, 64)
    assert CpuDecodeStep(model).mode == f"hybrid mixture-of-experts {mode}"
    compare(model, steps=10, rtol=1e-4)


def test_a_hybrid_mixtral_directory_loads_back_into_transformers(moe):
    """`hybrid-convert prosparse` / `eval` read a hybrid directory through transformers: its native names map
    back to the hub layout (experts' rows permuted, the function unchanged)."""
    from convert.prosparse import load_hf_model
    ids = torch.randint(3, 262, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = load_hf_model(moe["src"]).eval()(input_ids=ids).logits
        b = load_hf_model(moe["out"]).eval()(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs in the GPU-run issues)")
@pytest.mark.parametrize("mode", ["exact", "predictor"])
def test_hybrid_moe_on_the_gpu_matches_the_cpu(moe, mode):
    """Hot prefixes on the GPU, cold rows on the CPU: the same logits as the all-CPU model (fp32)."""
    hot_counts = [[0, 96, 32, 64], [96, 0, 64, 32]]
    gpu = build_hybrid_model(moe["out"], hot_counts, torch.device("cuda"), dtype=torch.float32, mode=mode)
    cpu = build_hybrid_model(moe["out"], hot_counts, torch.device("cpu"), dtype=torch.float32, mode=mode)
    ids = torch.randint(3, 262, (1, 16), generator=torch.Generator().manual_seed(6))
    for m in (gpu, cpu):
        m.setup_cache(1, 16)
    with torch.no_grad():
        got = gpu(ids.cuda(), torch.arange(16, device="cuda")).cpu()
        ref = cpu(ids, torch.arange(16))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_the_benchmark_moe_model_builder(tmp_path, monkeypatch, capsys):
    """`python -m bench.moe_model`: a random ReLU-family Mixtral written by transformers, made hybrid."""
    import sys
    from bench import moe_model
    (tmp_path / "cal.txt").write_text(make_text(600, seed=9))
    out = tmp_path / "m"
    argv = ["moe_model", "--out", str(out), "--data", str(tmp_path / "cal.txt"), "--dim", "64", "--layers", "2",
            "--ffn-dim", "64", "--experts", "4", "--heads", "4", "--kv-heads", "2", "--tokens", "1024",
            "--samples-per-layer", "512", "--ranks", "8", "--max-epochs", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    moe_model.main()
    md = open_model_dir(out / "hybrid")
    assert (md.config.n_experts, md.config.act, md.dtype) == (4, "drelu", torch.bfloat16)
    assert md.hybrid.predictors_file is not None
    monkeypatch.setattr(sys, "argv", argv[:-2] + ["--act", "silu"])      # no exact zeros: one line, exit 2
    with pytest.raises(SystemExit) as e:
        moe_model.main()
    assert e.value.code == 2 and "exact zeros" in capsys.readouterr().err


@pytest.mark.parametrize("extra,words", [
    (["--data", "{missing}"], "data file not found"),
    (["--dim", "60", "--heads", "7"], "not a multiple of num_attention_heads"),
    (["--experts", "2", "--top-k", "3"], "'num_experts_per_tok' (3) is more than"),
    (["--layers", "0"], "'num_hidden_layers'"),
])
def test_the_benchmark_moe_model_builder_checks_before_writing(tmp_path, monkeypatch, capsys, extra, words):
    import sys
    from bench import moe_model
    (tmp_path / "cal.txt").write_text("some text " * 50)
    out = tmp_path / "m"
    argv = ["moe_model", "--out", str(out), "--data", str(tmp_path / "cal.txt"),
            *[a.replace("{missing}", str(tmp_path / "none.txt")) for a in extra]]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        moe_model.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and words in err[-1] and len(err) == 1, err
    assert not out.exists()                                              # nothing written
