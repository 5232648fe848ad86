"""`hybrid-run` end to end (subprocess, as a user runs it) and its bad-input errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hybrid_runtime.generate import SamplingParams, TextStream, sample_next


def run_cli(*args, stdin: str | None = None, timeout: int = 120, env_extra=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "hybrid_runtime.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def tiny_dir(make_hf_model):
    _, path = make_hf_model(hidden_act="relu", seed=5)
    return path


def test_generate_streams_text_to_stdout_and_stats_to_stderr(tiny_dir):
    r = run_cli("generate", "--model", str(tiny_dir), "--prompt", "Once upon", "-n", "12", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "decode:" in r.stderr and "tok/s" in r.stderr and "prefill:" in r.stderr
    assert "decode:" not in r.stdout
    # greedy output is deterministic and equals the library path
    from hybrid_runtime.generate import Generator
    from hybrid_runtime.loading import load_model, load_tokenizer
    tok = load_tokenizer(tiny_dir)
    model = load_model(tiny_dir)
    model.setup_cache(1, 256)
    res = Generator(model, tok, 256, "cpu").generate(tok("Once upon").input_ids, SamplingParams(max_new_tokens=12))
    assert r.stdout == res.text + "\n"


def test_generate_sampling_is_reproducible_with_seed(tiny_dir):
    args = ("generate", "--model", str(tiny_dir), "--prompt", "abc", "-n", "16", "-t", "1.0",
            "--top-p", "0.9", "--top-k", "50", "--seed", "7", "--repetition-penalty", "1.1")
    a, b = run_cli(*args), run_cli(*args)
    assert a.returncode == 0 and a.stdout == b.stdout


def test_chat_piped_stdin_multi_turn(tiny_dir):
    r = run_cli("chat", "--model", str(tiny_dir), "-n", "6", stdin="hello\n/reset\nsecond turn\nthird\n/exit\nignored\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("decode:") == 3          # three answers; the line after /exit is not read
    assert "history cleared" in r.stderr


def test_info_reports_model_and_kernels(tiny_dir):
    r = run_cli("info", "--model", str(tiny_dir), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["architecture"] == "LlamaForCausalLM" and data["activation"] == "relu"
    assert data["layers"] == 2 and "kernels" in data and "cpu_sparse_ffn" in data["kernels"]


# ----------------------------------------------------------------------------- bad input

def _assert_clean_error(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]


def test_missing_and_empty_model_dir(tmp_path):
    _assert_clean_error(run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x"), "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_clean_error(run_cli("generate", "--model", str(empty), "--prompt", "x"), "config.json")


def test_missing_shard(make_hf_model):
    _, path = make_hf_model(shard=True)
    shard = sorted(path.glob("model-0000*.safetensors"))[1]
    shard.unlink()
    _assert_clean_error(run_cli("generate", "--model", str(path), "--prompt", "x"), shard.name, "missing")


def test_truncated_safetensors(make_hf_model):
    _, path = make_hf_model()
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _assert_clean_error(run_cli("generate", "--model", str(path), "--prompt", "x"), "model.safetensors")


def test_garbage_safetensors(make_hf_model):
    _, path = make_hf_model()
    (path / "model.safetensors").write_bytes(b"\x00" * 100)
    _assert_clean_error(run_cli("generate", "--model", str(path), "--prompt", "x"), "model.safetensors")


def test_config_shape_mismatch(make_hf_model):
    _, path = make_hf_model()
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(cfg))
    _assert_clean_error(run_cli("generate", "--model", str(path), "--prompt", "x"), "shape")


@pytest.mark.parametrize("field,value,fragment", [
    ("architectures", ["GPT2LMHeadModel"], "architecture"),
    ("hidden_act", "gelu_new", "hidden_act"),
])
def test_unknown_architecture_or_activation(make_hf_model, field, value, fragment):
    _, path = make_hf_model()
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    _assert_clean_error(run_cli("info", "--model", str(path)), fragment)


def test_unknown_alias_and_uncached_repo(tmp_path):
    _assert_clean_error(run_cli("generate", "--model", "no-such-alias", "--prompt", "x"), "alias")
    r = run_cli("generate", "--model", "prosparse-7b", "--prompt", "x",
                env_extra={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    _assert_clean_error(r, "SparseLLM/prosparse-llama-2-7b", "download")


def test_prompt_longer_than_context(tiny_dir):
    r = run_cli("generate", "--model", str(tiny_dir), "--prompt", "word " * 40, "--context", "16")
    _assert_clean_error(r, "context")


def test_bad_flags(tiny_dir):
    _assert_clean_error(run_cli("generate", "--model", str(tiny_dir), "--prompt", "x", "--top-p", "0"), "top-p")
    _assert_clean_error(run_cli("generate", "--model", str(tiny_dir), "--prompt", "x", "--threads", "0"), "threads")
    if not torch.cuda.is_available():
        _assert_clean_error(run_cli("generate", "--model", str(tiny_dir), "--prompt", "x", "--device", "cuda"), "CUDA")


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--debug", "generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert r.returncode != 0 and "Traceback" in r.stderr


# ----------------------------------------------------------------------------- sampling & streaming

def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    ks = {int(sample_next(logits, SamplingParams(temperature=1.0, top_k=2), g, None)) for _ in range(200)}
    assert ks == {0, 1}
    # probs ~ [.66,.24,.09,...]: top_p=0.8 keeps the two tokens needed to reach 0.8
    ps = {int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.8), g, None)) for _ in range(300)}
    assert ps == {0, 1}
    assert int(sample_next(logits, SamplingParams(), None, None)) == 0


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([2.0, 1.9, -1.0])
    seen = torch.tensor([0])
    assert int(sample_next(logits, SamplingParams(repetition_penalty=1.5), None, seen)) == 1
    assert int(sample_next(logits, SamplingParams(repetition_penalty=1.0), None, seen)) == 0


def test_text_stream_holds_back_stop_prefix_and_multibyte(byte_tokenizer_dir):
    from hybrid_runtime.loading import load_tokenizer
    tok = load_tokenizer(byte_tokenizer_dir)
    ids = tok("héllo END tail", add_special_tokens=False).input_ids
    stream = TextStream(tok, ["END"])
    shown = ""
    for i in ids:
        shown += stream.push(i)
        if stream.stopped:
            break
        assert "\ufffd" not in shown
    assert stream.stopped and shown == "héllo " and stream.text == "héllo "
