"""The training loop (L1 effect, exact resume, checkpointing), the prosparse/eval CLI and the ablation script."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from convert.cli import main_group
from convert.data import load_token_blocks, train_bpe_tokenizer
from convert.evaluate import evaluate
from convert.prosparse import ActivationRecorder, LambdaSchedule, load_hf_model, swap_activation
from convert.train import LlamaSpec, LossShaping, TrainConfig, build_llama, has_checkpoint, train
from hybrid_runtime.errors import UserError
from textgen import make_text

torch.set_num_threads(1)

SPEC = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny corpus, tokenizer, SwiGLU model dir and a relu model dir; token blocks."""
    d = tmp_path_factory.mktemp("train")
    (d / "a.txt").write_text(make_text(500, seed=1))
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": make_text(8, seed=100 + i)}) for i in range(40)))
    tok = train_bpe_tokenizer([d / "a.txt", d / "b.jsonl"], 300)
    model = build_llama(LlamaSpec(vocab_size=len(tok), **SPEC), tok, seed=0)
    model.save_pretrained(d / "swiglu")
    tok.save_pretrained(d / "swiglu")
    swap_activation(model, "relu")
    model.save_pretrained(d / "relu")
    tok.save_pretrained(d / "relu")
    blocks = load_token_blocks([d / "a.txt"], tok, 16, "train")
    heldout = load_token_blocks([d / "a.txt"], tok, 16, "heldout")
    return {"dir": d, "tok": tok, "blocks": blocks, "heldout": heldout}


def relu_model(env, seed=0):
    m = build_llama(LlamaSpec(vocab_size=len(env["tok"]), **SPEC), env["tok"], seed=seed)
    return swap_activation(m, "relu")


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- the loop

def test_l1_gives_higher_sparsity_than_without(env):
    cfg = TrainConfig(steps=25, batch_size=8, lr=5e-3, seed=3, log_every=5)
    plain, shaped = relu_model(env), relu_model(env)
    train(plain, env["blocks"], cfg, LossShaping(None), progress=False)
    res = train(shaped, env["blocks"], cfg, LossShaping(LambdaSchedule([0.0, 2.0], [5, 20])), progress=False)
    s_plain = evaluate(plain, env["heldout"], 8)["sparsity"]
    s_shaped = evaluate(shaped, env["heldout"], 8)["sparsity"]
    assert s_shaped > s_plain + 0.05, (s_plain, s_shaped)
    assert res.history[-1]["lambda"] == 2.0 and res.history[-1]["l1"] > 0
    assert res.tokens == 25 * 8 * 16


@pytest.mark.parametrize("where", ["between steps", "inside a step"])
def test_resume_after_interrupt_gives_identical_weights(env, tmp_path, where):
    cfg = TrainConfig(steps=8, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=2, weight_decay=0.1, seed=5)
    shaping = LossShaping(LambdaSchedule([0.0, 0.5, 1.0], [2, 3, 7]))  # the interruption falls mid-schedule
    full = relu_model(env)
    full_res = train(full, env["blocks"], cfg, shaping, progress=False)

    part = relu_model(env)
    ckpt = tmp_path / "ckpt"
    if where == "between steps":
        def stop(step, stats):
            if step == 3:
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            train(part, env["blocks"], cfg, shaping, checkpoint_dir=ckpt, on_step=stop, progress=False)
    else:  # the 9th forward = step 4, second micro-batch: the step's work is lost, not its start state
        calls = []

        def hook(module, args):
            calls.append(1)
            if len(calls) == 9:
                raise KeyboardInterrupt
        h = part.register_forward_pre_hook(hook)
        with pytest.raises(KeyboardInterrupt):
            train(part, env["blocks"], cfg, shaping, checkpoint_dir=ckpt, progress=False)
        h.remove()
    assert has_checkpoint(ckpt)
    resumed = relu_model(env, seed=123)  # different init: everything must come from the checkpoint
    res = train(resumed, env["blocks"], cfg, shaping, checkpoint_dir=ckpt, resume=True, progress=False)
    assert res.steps == 8
    assert_same_weights(weights(full), weights(resumed))
    assert [h["loss"] for h in res.history] == [h["loss"] for h in full_res.history]


def test_crash_resumes_from_last_periodic_checkpoint(env, tmp_path):
    cfg = TrainConfig(steps=6, batch_size=4, lr=3e-3, seed=2, save_every=2)
    full = relu_model(env)
    train(full, env["blocks"], cfg, progress=False)
    crashed = relu_model(env)

    def crash(step, stats):
        if step == 5:
            raise RuntimeError("power cut")
    with pytest.raises(RuntimeError):
        train(crashed, env["blocks"], cfg, checkpoint_dir=tmp_path, on_step=crash, progress=False)
    assert torch.load(tmp_path / "trainer.pt", weights_only=False)["step"] == 4
    resumed = relu_model(env, seed=9)
    train(resumed, env["blocks"], cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert_same_weights(weights(full), weights(resumed))


def test_resume_refuses_other_data_or_config(env, tmp_path):
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, save_every=2)

    def stop(step, stats):
        if step == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(relu_model(env), env["blocks"], cfg, checkpoint_dir=tmp_path, on_step=stop, progress=False)
    with pytest.raises(UserError, match="training data differ"):
        train(relu_model(env), env["blocks"][:-1], cfg, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(UserError, match="'lr' differs"):
        train(relu_model(env), env["blocks"], TrainConfig(steps=4, batch_size=4, lr=2e-3), checkpoint_dir=tmp_path,
              resume=True, progress=False)
    with pytest.raises(UserError, match="no checkpoint"):
        train(relu_model(env), env["blocks"], cfg, checkpoint_dir=tmp_path / "none", resume=True, progress=False)
    with pytest.raises(UserError, match="fewer than one batch of 8"):
        train(relu_model(env), env["blocks"][:5], TrainConfig(steps=1, batch_size=8), progress=False)


def test_grad_checkpointing_gives_the_same_gradients_with_l1(env):
    """Non-reentrant checkpointing: the L1 terms recorded inside layers get their gradients, once."""
    from convert.train import _enable_grad_checkpointing
    ids = env["blocks"][:4]
    grads = []
    for ckpt in (False, True):
        m = relu_model(env)
        if ckpt:
            _enable_grad_checkpointing(m)
        m.train()
        with ActivationRecorder(m, with_l1=True) as rec:
            out = m(input_ids=ids, labels=ids, use_cache=False)
            l1 = rec.l1()
            (out.loss + 3.0 * l1).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        assert rec.counts == [4 * 16 * 48] * 2  # one forward recorded, the recompute not
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)
    # and through the training loop
    cfg = dict(steps=3, batch_size=4, lr=3e-3, seed=1)
    shaping = LossShaping(LambdaSchedule([1.0], [0]))
    a, b = relu_model(env), relu_model(env)
    train(a, env["blocks"], TrainConfig(**cfg, grad_checkpointing=False), shaping, progress=False)
    train(b, env["blocks"], TrainConfig(**cfg, grad_checkpointing=True), shaping, progress=False)
    for k, v in weights(a).items():
        torch.testing.assert_close(v, weights(b)[k], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- CLI

def cli(*args):
    return CliRunner().invoke(main_group, [str(a) for a in args])


def prosparse_args(env, out, *extra):
    d = env["dir"]
    return ("prosparse", "--model", d / "swiglu", "--data", d / "a.txt", "--data", d / "b.jsonl", "--out", out,
            "--steps", 12, "--block-len", 16, "--batch-size", 4, "--lr", 3e-3, "--lambda-scale", 5,
            "--eval-tokens", 256, "--device", "cpu", *extra)


def test_cli_prosparse_end_to_end_and_eval(env, tmp_path):
    out = tmp_path / "out"
    r = cli(*prosparse_args(env, out, "--search-threshold", "--max-loss-increase", 0.02))
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "activation: silu -> relu in 2 layers" in r.output
    for name in ("config.json", "model.safetensors", "tokenizer.json", "prosparse_report.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint").exists() and not (out / "run_args.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    rep = json.loads((out / "prosparse_report.json").read_text())
    assert cfg["hidden_act"] == rep["activation"] and rep["train"]["steps"] == 12
    assert rep["schedule"]["boundaries"][-1] == 12 and rep["schedule"]["lambdas"][-1] == pytest.approx(1.0)
    if rep["activation"] == "fatrelu":
        assert cfg["hidden_act_param"] == rep["threshold"] > 0
    assert rep["eval"]["source"]["sparsity_method"] == "cett"
    assert rep["eval"]["final"]["sparsity_method"] == "exact-zero"
    # the written checkpoint reproduces the reported numbers, via `hybrid-convert eval`
    js = tmp_path / "eval.json"
    r = cli("eval", "--model", out, "--data", env["dir"] / "a.txt", "--data", env["dir"] / "b.jsonl",
            "--block-len", 16, "--tokens", 256, "--json", js, "--device", "cpu")
    assert r.exit_code == 0, r.output + repr(r.exception)
    ev = json.loads(js.read_text())
    assert ev["loss"] == pytest.approx(rep["eval"]["final"]["loss"], rel=1e-5)
    assert ev["sparsity_per_layer"] == pytest.approx(rep["eval"]["final"]["sparsity_per_layer"], abs=1e-9)
    assert "per layer:" in r.output
    r = cli("eval", "--model", out, "--data", env["dir"] / "a.txt", "--block-len", 16, "--json", js)
    assert r.exit_code != 0 and "use --force" in str(r.exception)
    # refuses to overwrite the output
    r = cli(*prosparse_args(env, out))
    assert isinstance(r.exception, UserError) and "use --force" in str(r.exception)


def test_cli_resume_matches_uninterrupted_run(env, tmp_path, monkeypatch):
    import convert.prosparse_cli as pc
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ("--threshold", 0.01, "--save-every", 5)
    assert cli(*prosparse_args(env, full, *extra)).exit_code == 0
    real_train = pc.train

    def interrupted(*a, **k):
        def stop(step, stats):
            if step == 7:
                raise KeyboardInterrupt
        return real_train(*a, **k, on_step=stop)
    monkeypatch.setattr(pc, "train", interrupted)
    r = cli(*prosparse_args(env, part, *extra))
    assert r.exit_code != 0 and (part / "checkpoint" / "trainer.pt").is_file()
    monkeypatch.setattr(pc, "train", real_train)
    r = cli(*prosparse_args(env, part, *extra))  # without --resume: refuses, points at --resume
    assert "--resume" in str(r.exception)
    r = cli("prosparse", "--out", part, "--resume", "--lr", 1e-3)
    assert isinstance(r.exception, UserError) and "--lr differs" in str(r.exception)
    r = cli("prosparse", "--out", part, "--resume")
    assert r.exit_code == 0, r.output + repr(r.exception)
    a = load_hf_model(full).state_dict()
    b = load_hf_model(part).state_dict()
    assert_same_weights(a, b)
    assert json.loads((part / "config.json").read_text())["hidden_act_param"] == 0.01


def test_cli_skips_swap_for_relu_model(env, tmp_path):
    d = env["dir"]
    r = cli("prosparse", "--model", d / "relu", "--data", d / "a.txt", "--out", tmp_path / "o", "--steps", 2,
            "--block-len", 16, "--batch-size", 4, "--eval-tokens", 64, "--device", "cpu")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "already computes relu: skipping the activation swap" in r.output


@pytest.mark.parametrize("extra, message", [
    (("--lambdas", "0,0.1,0.2", "--boundaries", "5,10"), "--lambdas has 3 values but --boundaries has 2"),
    (("--lambdas", "0,-0.1", "--boundaries", "5,10"), "must be finite and >= 0"),
    (("--lambdas", "0,0.1"), "--lambdas and --boundaries go together"),
    (("--threshold", "-0.01"), "--threshold must be > 0"),
    (("--threshold", "0.01", "--activation", "drelu"), "FATReLU thresholds apply to --activation relu"),
    (("--schedule", "nope"), "neither a preset"),
    (("--batch-size", "100000"), "fewer than one batch of 100000"),
    (("--block-len", "1000", "--eval-tokens", "2000"), "exceeds the model's max_position_embeddings"),
    (("--resume",), "no interrupted run to resume"),
])
def test_cli_bad_options(env, tmp_path, extra, message):
    r = cli(*prosparse_args(env, tmp_path / "o", *extra))
    assert isinstance(r.exception, UserError), r.output + repr(r.exception)
    assert message in str(r.exception)
    assert not (tmp_path / "o").exists() or "--resume" in extra  # nothing half-made


def test_cli_bad_model_and_data(env, tmp_path):
    d = env["dir"]
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    cases = [
        (("--model", tmp_path / "gpt2", "--data", d / "a.txt"), "not LLaMA-family"),
        (("--model", d / "swiglu", "--data", tmp_path / "empty.txt"), "empty.txt: empty file"),
        (("--model", d / "swiglu", "--data", tmp_path / "latin1.txt"), "latin1.txt: not valid UTF-8"),
        (("--model", d / "swiglu", "--data", tmp_path / "missing.txt"), "missing.txt: data file not found"),
    ]
    for args, message in cases:
        r = cli("prosparse", *args, "--out", tmp_path / "o", "--steps", 2, "--block-len", 16, "--device", "cpu")
        assert isinstance(r.exception, UserError) and message in str(r.exception), (message, r.output)
        assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- ablation script

def test_ablation_script_super_tiny(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import prosparse_ablation
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "one.txt").write_text(make_text(300, seed=7))
    (corpus / "two.txt").write_text(make_text(200, seed=8))
    (corpus / "README.md").write_text("not training text")
    out = tmp_path / "out"
    res = prosparse_ablation.main([
        "--corpus", str(corpus), "--out", str(out), "--device", "cpu", "--save-models", "--no-progress",
        "--dim", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "48", "--vocab", "300",
        "--block-len", "16", "--batch-size", "4", "--pretrain-steps", "6", "--convert-steps", "4",
        "--fixed-lambdas", "0.5", "--prosparse-lambdas", "1.0", "--search-tokens", "128", "--time-budget-s", "600"])
    names = [v["name"] for v in res["variants"]]
    assert names[:4] == ["SwiGLU continued", "ReLU", "ReLU + fixed L1", "ProSparse (progressive L1)"]
    assert names[4].startswith("ProSparse + FATReLU")
    assert res["variants"][0]["eval"]["activation"] == "silu" and res["variants"][1]["eval"]["activation"] == "relu"
    table = (out / "ablation.md").read_text()
    assert table.count("\n") == 2 + 1 + 5 and "SwiGLU original" in table
    assert json.loads((out / "ablation.json").read_text())["steps"]["convert"] == 4
    for sub in ("swiglu", "prosparse_fatrelu_1"):
        assert (out / sub / "model.safetensors").is_file() and (out / sub / "tokenizer.json").is_file()
    assert load_hf_model(out / "prosparse_fatrelu_1").config.hidden_act in ("relu", "fatrelu")
    # conversions only, from a saved SwiGLU model: its held-out perplexity is the one measured above
    again = prosparse_ablation.main([
        "--corpus", str(corpus), "--out", str(tmp_path / "again"), "--device", "cpu", "--no-progress",
        "--init", str(out / "swiglu"), "--block-len", "16", "--batch-size", "4", "--convert-steps", "2",
        "--fixed-lambdas", "", "--prosparse-lambdas", "1.0", "--search-tokens", "128"])
    assert again["swiglu"]["eval"]["perplexity"] == pytest.approx(res["swiglu"]["eval"]["perplexity"], rel=1e-5)
    assert len(again["variants"]) == 4
