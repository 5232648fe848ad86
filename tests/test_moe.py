"""Mixture-of-experts (Mixtral) in the dense engine: parity with transformers, and what is refused.

Random tiny `MixtralForCausalLM` checkpoints written by transformers' own save_pretrained (the hub
layout: block_sparse_moe.gate, experts.{e}.w1/w2/w3); several seeds, GQA, top-1 and top-2, SiLU and
ReLU experts, a sliding window. fp32 logits must agree to summation order and greedy tokens exactly.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

from hybrid_runtime.errors import UserError, console_main
from hybrid_runtime.loading import load_model
from hybrid_runtime.model import ModelConfig, MoEFeedForward

from conftest import save_hf_model


def make_mixtral(tmp_path, byte_tokenizer_dir, seed: int, **over):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=262, max_position_embeddings=256, num_local_experts=4,
              num_experts_per_tok=2, bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    kw.update(over)
    hf = MixtralForCausalLM(MixtralConfig(**kw)).eval()
    with torch.no_grad():       # HF's init: all-ones norms and a near-uniform router; make mix-ups show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("gate.weight"):
                p.mul_(20.0)
    path = save_hf_model(hf, tmp_path / f"mixtral-{seed}-{abs(hash(json.dumps(over, sort_keys=True))) % 10 ** 6}",
                         byte_tokenizer_dir)
    return hf, path


CASES = [
    (0, {}),                                                            # top-2, GQA, SiLU
    (1, {"num_experts_per_tok": 1}),                                    # top-1
    (2, {"hidden_act": "relu", "num_local_experts": 8}),                # ReLU experts, 8 experts
    (3, {"sliding_window": 6, "num_key_value_heads": 4}),               # sliding window, no GQA
]


@pytest.mark.parametrize("seed,over", CASES, ids=["top2-gqa-silu", "top1", "relu-8experts", "window-mha"])
def test_logits_and_greedy_tokens_match_transformers(tmp_path, byte_tokenizer_dir, seed, over):
    from hybrid_runtime.generate import Generator, SamplingParams
    from hybrid_runtime.loading import load_tokenizer
    hf, path = make_mixtral(tmp_path, byte_tokenizer_dir, seed, **over)
    model = load_model(path)
    assert isinstance(model.layers[0].ffn, MoEFeedForward)
    cfg = model.config
    assert (cfg.n_experts, cfg.experts_per_token) == (over.get("num_local_experts", 4), over.get("num_experts_per_tok", 2))
    ids = torch.randint(3, 262, (1, 24), generator=torch.Generator().manual_seed(seed))
    model.setup_cache(1, 64)
    with torch.no_grad():
        ref = hf(ids).logits[0]
        ours = [model(ids[:, :8], torch.arange(8), kv_len=8)[0]]
        for t in range(8, 24):                                       # decode one token at a time
            ours.append(model(ids[:, t:t + 1], torch.tensor([t]), kv_len=t + 1)[0])
    torch.testing.assert_close(torch.cat(ours), ref, atol=1e-5, rtol=0)
    # every expert was used somewhere, so the test exercised routing and not one expert
    with torch.no_grad():
        x = model.layers[0].ffn.norm(model.tok_embeddings(ids))
        used = torch.topk(x @ model.layers[0].ffn.router.T, cfg.experts_per_token, dim=-1).indices.unique()
    assert len(used) == cfg.n_experts
    prompt = [0, 50, 60, 70, 80, 90]
    gen = Generator(model, load_tokenizer(path), context=64, device="cpu", eos_ids=[])
    gen.eos_ids = set()
    mine = gen.generate(prompt, SamplingParams(max_new_tokens=16)).tokens
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                             pad_token_id=2, min_new_tokens=16)[0, len(prompt):].tolist()
    assert mine == theirs
    from hybrid_runtime.cpu_decode import CpuDecodeStep       # the one-call CPU decode of the same model
    fast = Generator(model, load_tokenizer(path), context=64, device="cpu", eos_ids=[], decode_step=CpuDecodeStep(model))
    fast.eos_ids = set()
    assert fast.generate(prompt, SamplingParams(max_new_tokens=16)).tokens == theirs


def test_config_fields_are_read_and_bad_routing_is_refused():
    base = {"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 262,
            "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 16}
    cfg = ModelConfig.from_hf(base)
    assert (cfg.n_experts, cfg.experts_per_token, cfg.sliding_window) == (8, 2, 16)
    for change, words in (({"num_experts_per_tok": 9}, "'num_experts_per_tok' (9) is more than"),
                          ({"num_local_experts": 0}, "'num_local_experts' must be a positive integer"),
                          ({"num_local_experts": None}, "needs positive integer fields"),
                          ({"n_shared_experts": 2}, "field 'n_shared_experts'"),
                          ({"scoring_func": "sigmoid"}, "field 'scoring_func'")):
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
            ModelConfig.from_hf({**base, **change})


def test_moe_bad_input_in_one_line(tmp_path, byte_tokenizer_dir, monkeypatch, capsys):
    """Unsupported routing names its field; a hybrid mode on a plain checkpoint and profiling SiLU experts say
    what to run first (the hybrid MoE itself: test_moe_hybrid.py)."""
    from hybrid_runtime.cli import main_group
    _, path = make_mixtral(tmp_path, byte_tokenizer_dir, 4)
    bad = json.loads((path / "config.json").read_text())
    bad["n_shared_experts"] = 1
    bad_dir = tmp_path / "shared"
    bad_dir.mkdir()
    (bad_dir / "config.json").write_text(json.dumps(bad))
    for f in path.iterdir():
        if f.name != "config.json":
            (bad_dir / f.name).symlink_to(f)
    for argv, words in (
            (["generate", "--model", str(bad_dir), "--device", "cpu", "-p", "hi"], "field 'n_shared_experts'"),
            (["generate", "--model", str(path), "--device", "cpu", "--exact", "-p", "hi"],
             "needs a hybrid model directory")):
        monkeypatch.setattr(sys, "argv", ["hybrid-run", *argv])
        with pytest.raises(SystemExit) as e:
            console_main(main_group)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and words in err[-1] and "Traceback" not in "\n".join(err), err
    from convert.cli import main_group as convert_main
    monkeypatch.setattr(sys, "argv", ["hybrid-convert", "profile", "--model", str(path), "--out", str(tmp_path / "p"),
                                      "--data", str(tmp_path / "t.txt"), "--device", "cpu"])
    (tmp_path / "t.txt").write_text("some calibration text " * 50)
    with pytest.raises(SystemExit) as e:
        console_main(convert_main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "no exact zeros" in err[-1] and "hybrid-convert prosparse" in err[-1], err


def test_generate_runs_a_mixtral_on_the_cpu(tmp_path, byte_tokenizer_dir, monkeypatch, capsys):
    """The CLI runs it dense, decoding with the one-call CPU step (its MoE FFN; parity: test_cpu_decode.py)."""
    from hybrid_runtime.cli import main_group
    _, path = make_mixtral(tmp_path, byte_tokenizer_dir, 5)
    monkeypatch.setattr(sys, "argv", ["hybrid-run", "generate", "--model", str(path), "--device", "cpu",
                                      "-p", "hello", "-n", "5"])
    console_main(main_group)                 # returns on success (exit status 0)
    err = capsys.readouterr().err
    assert "one-call Numba CPU decode (mixture-of-experts FFN" in err and "decode: 4 steps" in err


def test_the_ram_check_counts_every_expert(tmp_path, byte_tokenizer_dir, monkeypatch):
    """All experts live in RAM: the bytes the check asks for grow by each expert's rows, not one FFN's."""
    from hybrid_runtime import session
    from hybrid_runtime.model_dir import open_model_dir

    def threshold(md) -> int:            # the least available RAM the check accepts (bisection)
        lo, hi = 0, 1 << 34
        while lo < hi:
            mid = (lo + hi) // 2
            monkeypatch.setattr(session, "available_ram", lambda: mid)
            try:
                session.check_fits_ram(md, torch.float32, 64, False, "bf16")
                hi = mid
            except UserError:
                lo = mid + 1
        return lo

    need = {n: threshold(open_model_dir(make_mixtral(tmp_path, byte_tokenizer_dir, 6, num_local_experts=n)[1]))
            for n in (2, 8)}
    assert need[8] - need[2] == 6 * 2 * 3 * 64 * 96 * 4        # 6 more experts x 2 layers x 3 fp32 (96, 64) rows
