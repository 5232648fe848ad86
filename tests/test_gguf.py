"""bench/gguf_export.py: HF LLaMA -> llama GGUF, read back with gguf.GGUFReader (and run by llama.cpp
when llama-cpp-python is installed)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from bench.gguf_export import export_gguf, permute_rope_rows  # noqa: E402
from hybrid_runtime.errors import UserError  # noqa: E402


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def _tensors(reader) -> dict:
    # GGUFReader gives numpy arrays in the file's row-major order: shape (out, in) for a matrix
    return {t.name: t for t in reader.tensors}


def _rope_rows_ref(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Independent derivation, row by row: llama.cpp pairs (2j, 2j+1), HF pairs (j, j + hd/2)."""
    hd = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for j in range(hd // 2):
            out[h * hd + 2 * j] = w[h * hd + j]
            out[h * hd + 2 * j + 1] = w[h * hd + j + hd // 2]
    return out


def _rope_hf(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """HF rotate_half RoPE on one head vector x (hd,)."""
    hd = x.shape[0]
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    rot = torch.cat([-x[hd // 2:], x[:hd // 2]])
    return x * cos + rot * sin


def _rope_adjacent(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """llama.cpp's (GGML_ROPE_TYPE_NORM) RoPE: rotates adjacent pairs (2j, 2j+1) by pos * theta^(-2j/hd)."""
    hd = x.shape[0]
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos * inv
    a, b = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2] = a * ang.cos() - b * ang.sin()
    out[1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_permute_matches_rowwise_reference():
    rng = np.random.default_rng(0)
    for n_heads, hd, d_in in [(4, 16, 8), (2, 8, 3), (1, 4, 5)]:
        w = rng.standard_normal((n_heads * hd, d_in)).astype(np.float32)
        np.testing.assert_array_equal(permute_rope_rows(w, n_heads), _rope_rows_ref(w, n_heads))


def test_permuted_qk_scores_equal_hf_rope_scores():
    """The point of the permutation: llama.cpp's RoPE on permuted q/k gives HF's attention scores."""
    torch.manual_seed(0)
    n_heads, hd, d, theta = 2, 16, 12, 10000.0
    wq = torch.randn(n_heads * hd, d, dtype=torch.float64)
    wk = torch.randn(n_heads * hd, d, dtype=torch.float64)
    wq_p = torch.from_numpy(permute_rope_rows(wq.numpy(), n_heads))
    wk_p = torch.from_numpy(permute_rope_rows(wk.numpy(), n_heads))
    xq, xk = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    for pq, pk in [(5, 2), (17, 17), (3, 40)]:
        for h in range(n_heads):
            s = slice(h * hd, (h + 1) * hd)
            hf = _rope_hf((wq @ xq)[s], pq, theta) @ _rope_hf((wk @ xk)[s], pk, theta)
            ll = _rope_adjacent((wq_p @ xq)[s], pq, theta) @ _rope_adjacent((wk_p @ xk)[s], pk, theta)
            torch.testing.assert_close(ll, hf, rtol=1e-10, atol=1e-10)
    # and without the permutation the scores differ (the test can fail)
    s = slice(0, hd)
    bad = _rope_adjacent((wq @ xq)[s], 5, theta) @ _rope_adjacent((wk @ xk)[s], 2, theta)
    good = _rope_hf((wq @ xq)[s], 5, theta) @ _rope_hf((wk @ xk)[s], 2, theta)
    assert not torch.isclose(bad, good, rtol=1e-3)


@pytest.mark.parametrize("tie", [False, True])
def test_export_metadata_tensors_values(make_hf_model, tmp_path, tie):
    model, path = make_hf_model(tie=tie, dtype=torch.float16, rope_theta=5000.0, rms_norm_eps=1e-5)
    cfg = model.config
    out = export_gguf(path, tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(out))

    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
    assert _field(r, "llama.context_length") == cfg.max_position_embeddings
    assert _field(r, "llama.embedding_length") == cfg.hidden_size
    assert _field(r, "llama.block_count") == cfg.num_hidden_layers
    assert _field(r, "llama.feed_forward_length") == cfg.intermediate_size
    assert _field(r, "llama.attention.head_count") == cfg.num_attention_heads
    assert _field(r, "llama.attention.head_count_kv") == cfg.num_key_value_heads
    hd = cfg.hidden_size // cfg.num_attention_heads
    assert _field(r, "llama.rope.dimension_count") == hd
    assert _field(r, "llama.rope.freq_base") == pytest.approx(5000.0)
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert _field(r, "llama.vocab_size") == cfg.vocab_size
    assert _field(r, "tokenizer.ggml.model") == "llama"
    toks = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type")
    assert len(toks) == len(types) == len(_field(r, "tokenizer.ggml.scores")) == cfg.vocab_size
    assert len(set(toks)) == cfg.vocab_size
    assert "<0x0A>" in toks and types[toks.index("<0x0A>")] == int(gguf.TokenType.BYTE)
    assert _field(r, "tokenizer.ggml.bos_token_id") == cfg.bos_token_id
    assert _field(r, "tokenizer.ggml.eos_token_id") == cfg.eos_token_id
    assert types[cfg.eos_token_id] == int(gguf.TokenType.CONTROL)

    tensors = _tensors(r)
    L = cfg.num_hidden_layers
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tie else set())
    for i in range(L):
        names |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == names

    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hf_of = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    expect = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not tie:
        expect["output.weight"] = sd["lm_head.weight"]
    for i in range(L):
        for g, h in hf_of.items():
            w = sd[f"model.layers.{i}.{h}.weight"].float().numpy()
            if g == "attn_q":
                w = _rope_rows_ref(w, cfg.num_attention_heads)
            elif g == "attn_k":
                w = _rope_rows_ref(w, cfg.num_key_value_heads)
            expect[f"blk.{i}.{g}.weight"] = w
    for name, want in expect.items():
        t = tensors[name]
        want = np.asarray(want.float().numpy() if isinstance(want, torch.Tensor) else want)
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
            # GGUF dims are innermost first: {in, out} for an HF (out, in) weight
            assert list(t.shape) == [want.shape[1], want.shape[0]], name
        got = np.asarray(t.data).reshape(want.shape)
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float16).astype(np.float32), err_msg=name)
    # q really moved (the test above would not notice a no-op permutation of a symmetric tensor)
    q0 = np.asarray(tensors["blk.0.attn_q.weight"].data).astype(np.float32)
    assert not np.array_equal(q0, sd["model.layers.0.self_attn.q_proj.weight"].float().numpy())


def test_export_f32_and_bad_input(make_hf_model, tmp_path):
    _, path = make_hf_model(dtype=torch.float32)
    out = export_gguf(path, tmp_path / "m32.gguf", dtype="f32")
    r = gguf.GGUFReader(str(out))
    assert _field(r, "general.file_type") == int(gguf.LlamaFileType.ALL_F32)
    assert _tensors(r)["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    with pytest.raises(UserError, match="dtype"):
        export_gguf(path, tmp_path / "x.gguf", dtype="q4")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="model_type"):
        export_gguf(path, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    _, bin_path = make_hf_model(bin_format=True)
    with pytest.raises(UserError, match="safetensors"):
        export_gguf(bin_path, tmp_path / "y.gguf")


_LLAMACPP_LOGITS = """
import sys
import llama_cpp            # first, and no torch: see llamacpp_logits
import numpy as np
gguf, ngl, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tokens = [int(t) for t in sys.argv[4].split(",")]
llm = llama_cpp.Llama(gguf, n_gpu_layers=ngl, n_ctx=64, n_threads=1, logits_all=True, verbose=False)
llm.eval(tokens)
np.save(out, np.array(llm.scores[:len(tokens)], dtype=np.float32))
"""


def llamacpp_logits(gguf, tokens: list[int], tmp_path, n_gpu_layers: int = 0) -> torch.Tensor:
    """llama.cpp's logits (T, V) for every position of `tokens`, from a fresh Python process.

    Not in this process: on the H100 machine's image (torch 2.11+cu130), loading a model segfaults in
    llama_model::print_info in any process that has imported torch (bench/llamacpp_diag.sh, 2026-11-23),
    and that would take the whole test run down with it."""
    import subprocess
    import sys

    out = tmp_path / f"logits-{len(tokens)}.npy"
    r = subprocess.run([sys.executable, "-c", _LLAMACPP_LOGITS, str(gguf), str(n_gpu_layers), str(out),
                        ",".join(map(str, tokens))], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"llama.cpp process exited with {r.returncode}: {r.stderr[-2000:]}"
    return torch.from_numpy(np.load(out))


@pytest.mark.skipif(__import__("importlib").util.find_spec("llama_cpp") is None,
                    reason="llama_cpp (llama-cpp-python) is not installed")
def test_llamacpp_matches_engine_greedy(make_hf_model, tmp_path):
    """llama.cpp on our GGUF reproduces our dense engine (SiLU model): same logits within fp16 tolerance."""
    from hybrid_runtime.loading import load_model

    # initializer_range 0.1: logits of order 1, so a wrong q/k layout shows (error ~1 vs ~1e-3)
    _, path = make_hf_model(dtype=torch.float32, hidden_act="silu", num_hidden_layers=2,
                            max_position_embeddings=128, initializer_range=0.1)
    out = export_gguf(path, tmp_path / "m.gguf", dtype="f32")
    prompt = [0, 17, 99, 200, 5, 42, 7, 150]
    got = llamacpp_logits(out, prompt, tmp_path)                                        # (T, V)

    model = load_model(str(path), device="cpu", dtype=torch.float32)
    model.setup_cache(1, 64)
    with torch.no_grad():
        want = model(torch.tensor([prompt]), torch.arange(len(prompt)))[0].float()      # (T, V)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=5e-3)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def _tiny_mixtral(tmp_path, byte_tokenizer_dir):
    from test_moe import make_mixtral
    return make_mixtral(tmp_path, byte_tokenizer_dir, 11, num_hidden_layers=2, initializer_range=0.1)


def test_mixtral_exports_router_and_stacked_experts(tmp_path, byte_tokenizer_dir):
    """A Mixtral checkpoint -> llama.cpp's MoE layout: ffn_gate_inp (the router) and the experts stacked
    as ffn_{gate,up,down}_exps (E, f, d) / (E, d, f), expert count and top-k in the metadata."""
    import gguf
    _, path = _tiny_mixtral(tmp_path, byte_tokenizer_dir)
    out = export_gguf(path, tmp_path / "moe.gguf", dtype="f32")
    r = gguf.GGUFReader(str(out))
    t = {x.name: x for x in r.tensors}
    assert "blk.0.ffn_gate.weight" not in t
    assert [int(v) for v in reversed(t["blk.1.ffn_gate_exps.weight"].shape)] == [4, 96, 64]
    assert [int(v) for v in reversed(t["blk.1.ffn_down_exps.weight"].shape)] == [4, 64, 96]
    assert [int(v) for v in reversed(t["blk.0.ffn_gate_inp.weight"].shape)] == [4, 64]
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "np") as sf:
        w3 = sf.get_tensor("model.layers.1.block_sparse_moe.experts.2.w3.weight")
    up = np.asarray(t["blk.1.ffn_up_exps.weight"].data).reshape(4, 96, 64)
    assert np.array_equal(up[2], w3)
    fields = {f.name: f for f in r.fields.values()}
    assert int(fields["llama.expert_count"].parts[-1][0]) == 4
    assert int(fields["llama.expert_used_count"].parts[-1][0]) == 2


@pytest.mark.skipif(__import__("importlib").util.find_spec("llama_cpp") is None,
                    reason="llama_cpp (llama-cpp-python) is not installed")
def test_llamacpp_matches_engine_on_a_mixtral(tmp_path, byte_tokenizer_dir):
    """llama.cpp runs our Mixtral GGUF as the engine does: same logits within fp32-export tolerance."""
    from hybrid_runtime.loading import load_model
    _, path = _tiny_mixtral(tmp_path, byte_tokenizer_dir)
    out = export_gguf(path, tmp_path / "moe.gguf", dtype="f32")
    prompt = [0, 17, 99, 200, 5, 42, 7, 150]
    got = llamacpp_logits(out, prompt, tmp_path)
    model = load_model(str(path), device="cpu", dtype=torch.float32)
    model.setup_cache(1, 64)
    with torch.no_grad():
        want = model(torch.tensor([prompt]), torch.arange(len(prompt)))[0].float()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=5e-3)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


@pytest.mark.skipif(__import__("importlib").util.find_spec("llama_cpp") is None,
                    reason="llama_cpp (llama-cpp-python) is not installed")
def test_build_llamacpp_runner_greedy(make_hf_model, tmp_path):
    """bench's llama.cpp runner: exact token count, greedy (= teacher-forced argmax of llama.cpp's own
    logits), repeatable across runs (the KV cache is reset), GGUF exported once and cached."""
    from importlib.metadata import version
    from types import SimpleNamespace

    from bench import options, systems
    from hybrid_runtime.model import ModelConfig

    _, path = make_hf_model(dtype=torch.float32, hidden_act="silu", initializer_range=0.1)
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    log = options.BenchLog(600.0)
    logs = log.lines
    ctx = SimpleNamespace(opts=SimpleNamespace(work=str(tmp_path / "work"), threads=1, new_tokens=12, cpu_format="bf16"),
                          hf_dir=path, log=log, cfg=cfg, budget=8 << 30, context=64, cuda=False,
                          prompt=[0, 17, 99, 200, 5, 42, 7, 150],
                          bw={"gpu_copy_GBps": 1000.0, "cpu_read_GBps": 10.0, "h2d_GBps": 20.0})
    runner, info, lim = systems.build_llamacpp(ctx)
    r1 = runner.generate(ctx.prompt, 12)
    r2 = runner.generate(ctx.prompt, 12)
    assert len(r1.tokens) == 12 and r1.decode_steps == 11 and r1.prompt_tokens == 8
    assert r1.tokens == r2.tokens
    assert r1.prefill_s > 0 and r1.decode_s > 0 and lim.tps and lim.cpu_bytes > 0
    assert info["n_gpu_layers"] == 0 and info["threads"] == 1       # no CUDA: every layer on the CPU
    assert info["llama_cpp_python"] == version("llama_cpp_python")
    # llama.cpp ran in the child: its RSS is reported, no GPU figure without a GPU
    assert 0 < info["cpu_rss_gib"] < 4 and "gpu_used_gib" not in info
    child = runner.child.proc
    assert child.pid != __import__("os").getpid() and child.poll() is None
    assert runner.child.loaded["torch_imported"] is False
    runner.close()
    assert child.poll() == 0

    seq = ctx.prompt + r1.tokens
    scores = llamacpp_logits(info["gguf"], seq[:-1], tmp_path)                     # (T, V)
    assert scores[len(ctx.prompt) - 1:].argmax(-1).tolist() == r1.tokens

    n_exports = sum("exporting" in m for m in logs)
    ctx.budget = 1 << 20          # nothing fits: every layer on the CPU
    _, info_off, _ = systems.build_llamacpp(ctx, offload=True)
    assert info_off["n_gpu_layers"] == systems.offload_layers_for_budget(cfg, ctx.budget, 64) == 0
    assert n_exports == 1 and sum("exporting" in m for m in logs) == 1 and any("reusing" in m for m in logs)


def _engine_greedy(model, prompt: list[int], n_new: int) -> list[int]:
    """This engine's greedy tokens: the prompt as one batch, then one token at a time."""
    model.setup_cache(1, 64)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), torch.arange(len(prompt)))     # (1, T, V)
        tokens = [int(logits[0, -1].argmax())]
        for pos in range(len(prompt), len(prompt) + n_new - 1):
            logits = model(torch.tensor([[tokens[-1]]]), torch.tensor([pos]))  # (1, 1, V)
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


@pytest.mark.skipif(__import__("importlib").util.find_spec("llama_cpp") is None,
                    reason="llama_cpp (llama-cpp-python) is not installed")
def test_llamacpp_child_greedy_equals_engine_greedy(make_hf_model, tmp_path):
    """bench/llamacpp_child.py on its own (JSON lines over a pipe): its greedy tokens are this engine's
    greedy tokens (SiLU model, f32 GGUF), every run; bad requests are one JSON error line + exit 1."""
    import subprocess
    import sys

    from bench.options import REPO
    from hybrid_runtime.loading import load_model

    _, path = make_hf_model(dtype=torch.float32, hidden_act="silu", initializer_range=0.1)
    out = export_gguf(path, tmp_path / "m.gguf", dtype="f32")
    prompt, n_new = [0, 17, 99, 200, 5, 42, 7, 150], 16
    model = load_model(str(path), device="cpu", dtype=torch.float32)
    want = _engine_greedy(model, prompt, n_new)
    # the test can fail: the stale-scores bug (argmax of a zero row) would give token 0 every step
    assert len(set(want)) > 1

    def child(*requests) -> tuple[int, list[dict]]:
        r = subprocess.run([sys.executable, "-m", "bench.llamacpp_child"], cwd=str(REPO), capture_output=True,
                           text=True, timeout=120, input="".join(json.dumps(q) + "\n" for q in requests))
        return r.returncode, [json.loads(line) for line in r.stdout.splitlines()]

    load = {"gguf": str(out), "n_gpu_layers": 0, "n_ctx": 64, "threads": 1}
    rc, replies = child(load, {"prompt": prompt, "n_new": n_new, "runs": 2}, {"prompt": prompt[:3], "n_new": 4})
    assert rc == 0 and [r["event"] for r in replies] == ["loaded", "runs", "runs"]
    loaded, runs = replies[0], replies[1]["runs"]
    assert loaded["torch_imported"] is False and loaded["gpu_used_mib"] is None and loaded["rss_peak_gib"] > 0
    assert [r["tokens"] for r in runs] == [want, want]
    assert all(r["decode_steps"] == n_new - 1 and r["prompt_tokens"] == 8 and r["prefill_s"] > 0 for r in runs)
    assert replies[2]["runs"][0]["tokens"] == _engine_greedy(model, prompt[:3], 4)

    rc, replies = child(load, {"prompt": [0, 99999], "n_new": 2})
    assert rc == 1 and replies[-1]["ok"] is False and "token ids" in replies[-1]["error"]
    rc, replies = child({**load, "gguf": str(tmp_path / "missing.gguf")})
    assert rc == 1 and replies == [{"ok": False, "error": replies[0]["error"], "skip": False}]
    assert "missing.gguf" in replies[0]["error"]


def test_llamacpp_child_crash_and_hang_are_one_clear_error(monkeypatch):
    """A child killed by a signal (the H100 segfault) or one that never answers: one RuntimeError line
    naming the signal / the timeout, and no process left behind."""
    import sys

    from bench.systems import LlamaCppChild

    class Crashing(LlamaCppChild):
        command = [sys.executable, "-c", "import os, signal, sys; sys.stderr.write('ggml: about to crash\\n'); "
                                         "sys.stderr.flush(); sys.stdin.readline(); os.kill(os.getpid(), signal.SIGSEGV)"]

    with pytest.raises(RuntimeError) as e:
        Crashing({"gguf": "x"}, lambda: 60.0)
    msg = str(e.value)
    assert "SIGSEGV" in msg and "-11" in msg and "loading the model" in msg and "about to crash" in msg
    assert "\n" not in msg

    class Hanging(LlamaCppChild):
        command = [sys.executable, "-c", "import time; time.sleep(120)"]

    made = []
    real_init = LlamaCppChild.__init__
    monkeypatch.setattr(Hanging, "__init__", lambda self, *a, **k: (made.append(self), real_init(self, *a, **k))[1])
    with pytest.raises(RuntimeError, match="no reply after 1 s"):
        Hanging({"gguf": "x"}, lambda: 1.0)
    assert made[0].proc.poll() is not None          # killed, not left running
