"""Benchmark harness on the CPU: the synthetic model's construction, the layer-offload baseline against
the dense engine, and a smoke run of `hybrid-run bench` on a tiny model (it runs and writes a
well-formed table and JSON; timings are never asserted)."""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from hybrid_runtime.errors import console_main

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_work")


@pytest.fixture(scope="module")
def tiny_bench_model(work):
    """The tiny synthetic model run through profile -> train-predictors -> pack (shared by the tests)."""
    from bench.synthetic import prepare_bench_model, shape_configs
    syn, pipe = shape_configs("tiny", seed=0)
    return prepare_bench_model(syn, pipe, work, "cpu", progress=False)


def _run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    from bench.cli_bench import bench
    monkeypatch.setattr(sys, "argv", ["hybrid-run-bench", *args])
    code = 0
    try:
        console_main(bench)
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- synthetic model


def test_target_frequencies_are_heavy_tailed_with_the_mean_density():
    from bench.synthetic import shape_configs, target_frequencies, top_share
    syn, _ = shape_configs("7b")
    freqs = target_frequencies(syn)
    assert len(freqs) == 32 and all(f.shape == (11008,) for f in freqs)
    assert abs(np.mean([f.mean() for f in freqs]) - 0.11) < 1e-6          # 89% sparsity on average
    assert all(f.max() <= syn.max_freq + 1e-12 and f.min() > 0 for f in freqs)
    share = np.mean([top_share(f, 0.2) for f in freqs])
    assert 0.45 < share < 0.7                                            # skewed, not uniform (0.2)


def test_synthetic_model_calibration_checkpoint_and_pipeline(tiny_bench_model):
    from safetensors import safe_open

    from bench.synthetic import build_synthetic, hf_tensors, shape_configs, target_frequencies
    from hybrid_runtime.loading import load_model
    from hybrid_runtime.model_dir import read_hybrid_meta
    syn, _ = shape_configs("tiny", seed=0)
    model, stats = build_synthetic(syn, "cpu", progress=False)
    # calibration: each layer's measured density on its own calibration tokens is the target's
    targets = [t.mean() for t in target_frequencies(syn)]
    np.testing.assert_allclose(stats["calibration_density_per_layer"], targets, atol=0.01)
    # deterministic from the seed, and bf16-representable weights stored as fp16
    again, _ = build_synthetic(syn, "cpu", progress=False)
    for (n, a, _), (_, b, _) in zip(hf_tensors(model), hf_tensors(again)):
        assert torch.equal(a, b), n
    # the streamed checkpoint is a valid safetensors file holding exactly these weights (down transposed)
    bm = tiny_bench_model
    with safe_open(str(bm.hf_dir / "model.safetensors"), framework="pt") as fh:
        for name, t, tr in hf_tensors(model):
            stored = fh.get_tensor(name)
            assert stored.dtype == torch.float16
            want = (t.t() if tr else t).to(torch.float16)
            assert torch.equal(stored, want), name
            assert torch.equal(stored.to(torch.bfloat16).to(torch.float16), stored), name
    dense = load_model(bm.hf_dir, dtype=torch.float32)
    torch.testing.assert_close(dense.layers[1].ffn.down, model.layers[1].ffn.down.float(), atol=0, rtol=0)
    # the pipeline measured ~89% sparsity on other text and packed predictors with it
    m = bm.manifest
    assert m["complete"] and abs(m["profile"]["sparsity"] - 0.89) < 0.03
    meta = read_hybrid_meta(bm.hybrid_dir)
    assert meta.predictors_file is not None and meta.raw["activation"] == "relu"
    assert m["predictors"]["rank"] == 2 * syn.latent_dim


def test_prepare_reuses_a_matching_build(tiny_bench_model, work, capsys):
    from bench.synthetic import prepare_bench_model, shape_configs
    syn, pipe = shape_configs("tiny", seed=0)
    again = prepare_bench_model(syn, pipe, work, "cpu", progress=False)
    assert again.work == tiny_bench_model.work and "reusing" in capsys.readouterr().err


# ----------------------------------------------------------------------------- layer offload


def test_layer_offload_equals_the_dense_engine(make_hf_model):
    """First N layers on the 'fast' device, the rest on the CPU: same logits as the dense engine
    (the CPU stands in for the GPU here; fp32 both sides, then bf16 CPU layers)."""
    from bench.systems import build_layer_offload
    from hybrid_runtime.loading import load_model
    _, path = make_hf_model(hidden_act="relu", num_hidden_layers=3)
    ids = torch.randint(3, 262, (1, 10), generator=torch.Generator().manual_seed(0))

    def logits(model):
        model.setup_cache(1, 32)
        out = [model(ids[:, :6], torch.arange(6))[0]]
        for t in range(6, 10):
            out.append(model(ids[:, t:t + 1], torch.tensor([t]))[0])
        return torch.cat(out)

    ref = logits(load_model(path, dtype=torch.float32))
    for n_gpu in (0, 2, 3):
        off = build_layer_offload(path, n_gpu, torch.device("cpu"), torch.float32)
        torch.testing.assert_close(logits(off), ref, atol=1e-5, rtol=1e-5)
    off = build_layer_offload(path, 1, torch.device("cpu"), torch.bfloat16)
    assert off.layers[2].ffn.gate.dtype == torch.bfloat16 and off.layers[0].ffn.gate.dtype == torch.float32
    assert ((logits(off) - ref).norm() / ref.norm()).item() < 3e-2


def test_layer_offload_applies_minicpm_scalings(tmp_path):
    """Layer offload runs the model's own forward: MiniCPM's scale_emb, scale_depth and logit scale
    included (an earlier copy of the forward dropped two of them)."""
    from bench.systems import build_layer_offload
    from hybrid_runtime.loading import load_model
    from hybrid_runtime.tiny import tiny_llama_config, write_random_checkpoint
    cfg = tiny_llama_config(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, tie=True)
    cfg.update(architectures=["MiniCPMForCausalLM"], model_type="minicpm", scale_emb=12.0, scale_depth=1.4,
               dim_model_base=16)
    path = write_random_checkpoint(tmp_path / "minicpm", cfg, seed=2)
    ids = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(1))

    def logits(model):
        model.setup_cache(1, 16)
        return model(ids, torch.arange(8))[0]

    ref = logits(load_model(path, dtype=torch.float32))
    off = build_layer_offload(path, 1, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(logits(off), ref, atol=1e-5, rtol=1e-5)


def test_offload_layer_count_follows_the_budget():
    from bench.systems import offload_layers_for_budget
    from bench.synthetic import hf_config, shape_configs
    from hybrid_runtime.model import ModelConfig
    cfg = ModelConfig.from_hf(hf_config(shape_configs("7b")[0]))
    counts = [offload_layers_for_budget(cfg, int(g * 1024 ** 3), 208) for g in (1, 4, 8, 12, 16)]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 32
    assert 15 <= counts[2] <= 20          # ~8 GiB: llama.cpp fits 20 of 32 with less reserve


# ----------------------------------------------------------------------------- the command


def test_bench_smoke_run_writes_a_well_formed_table_and_json(tiny_bench_model, work, tmp_path, monkeypatch, capsys):
    systems = "dense-gpu,dense-cpu,hybrid-cpu,hf-cpu,hybrid,dense-offload"
    code, out, err = _run_cli(monkeypatch, capsys, "--model", "synthetic-tiny", "--work", str(work),
                              "--out", str(tmp_path), "--systems", systems, "--prompt-tokens", "12",
                              "--new-tokens", "6", "--runs", "1", "--profile-time", "--sweep", "none")
    assert code == 0, err
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert res["complete"] and res["format"] == "hybrid-bench-results"
    rows = {r["system"]: r for r in res["systems"]}
    assert list(rows) == systems.split(",")
    assert rows["dense-cpu"]["info"]["decode"].startswith("one-call Numba CPU decode (dense FFN")
    for name in ("dense-cpu", "hybrid-cpu", "hf-cpu"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["decode_tps"] > 0 and r["prefill_tps"] > 0 and r["runs"] == 1 and r["new_tokens"] == 6
        assert r["limit"]["ms"] > 0 and r["cpu_rss_gib"] > 0
        assert name in out
    assert rows["hf-cpu"]["same_tokens_as_dense"] is not None
    if not CUDA:
        for name in ("dense-gpu", "hybrid", "dense-offload"):
            assert rows[name]["status"] == "skipped" and "CUDA" in rows[name]["reason"]
            assert f"{name}" in out and "skipped" in out
        assert "no CUDA: skipping the GPU systems" in err
    prof = rows["hybrid-cpu"]["profile_time"]
    assert prof["host_timeline_ms"]["cpu_cold_ffn"] > 0 and prof["calls_per_token"]["cold_ffn"] == 2
    assert "decode time breakdown" in err
    assert res["model"]["profile"]["sparsity"] > 0.8 and res["bandwidth"]["cpu_read_GBps"] > 0
    md = next(tmp_path.glob("*.md")).read_text()
    assert "| system |" in md and "hybrid-cpu" in md and "Construction" in md
    assert "Run finished." in md.splitlines()[2]              # nothing was trimmed for the time budget
    res["sweep"] = [{"system": "hybrid", "budget_gib": 16, "notes": ["skipped (time budget: ~17 s needed, 5 s left)"]}]
    res["complete"] = False
    from bench.report import format_markdown
    head = format_markdown(res).splitlines()[2]
    assert "PARTIAL (written while running); 1 item(s) shortened or skipped for the time budget" in head
    assert "- sweep 16 GiB hybrid: skipped (time budget" in format_markdown(res)
    assert "## Machine" in md and "## Sparsity profile" in md and "threading layer" in md
    dev = res["device"]
    assert dev["numba_threading_layer"] and "f16c" in dev["cpu_flags"] and dev["work_disk_free_gib"] > 0
    assert dev["cold_rows"]["used"]["hybrid-cpu"] in ("bf16", "fp16", "int8")
    assert "decode speedup" in out


def test_bench_bad_input_is_one_clear_error(tiny_bench_model, work, tmp_path, monkeypatch, capsys):
    code, _, err = _run_cli(monkeypatch, capsys, "--systems", "dense-gpu,warp-drive", "--out", str(tmp_path))
    assert code == 2 and "unknown system 'warp-drive'" in err and "Traceback" not in err
    code, _, err = _run_cli(monkeypatch, capsys, "--model", "synthetic-huge", "--out", str(tmp_path))
    assert code == 2 and "unknown synthetic shape" in err
    code, _, err = _run_cli(monkeypatch, capsys, "--model", "synthetic-tiny", "--work", str(work),
                            "--systems", "hybrid", "--gpu-memory", "1MiB", "--out", str(tmp_path))
    assert code == 2 and "below the minimum" in err and "GiB" in err
    code, _, err = _run_cli(monkeypatch, capsys, "--gpu-memory", "eight", "--out", str(tmp_path))
    assert code == 2 and "memory size" in err
    code, _, err = _run_cli(monkeypatch, capsys, "--model", "synthetic-tiny", "--work", str(work),
                            "--freq-sigma", "-1", "--out", str(tmp_path))
    assert code == 2 and "freq_sigma (--freq-sigma) must be >= 0" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.json"))


# ----------------------------------------------------------------------------- graphed-step profile


class _FakeEvent:
    """torch.cuda.Event stand-in on the CPU: record() stamps the host clock."""

    def __init__(self, enable_timing: bool = False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other) -> float:
        return (other.t - self.t) * 1e3


def _fake_graphed_step(trace: list, d: int = 8):
    """A HybridGraphedDecodeStep whose graphs, staging and cold FFNs only log what is called: layer 0
    with a predictor selection, layer 1 without cold rows, layer 2 in exact mode (no selection)."""
    from types import SimpleNamespace

    from hybrid_runtime.hybrid_graph import HybridGraphedDecodeStep

    class Graph:
        def __init__(self, name):
            self.name = name

        def replay(self):
            trace.append(self.name)

    def cold(l, n_cold):
        rows = SimpleNamespace(row_bytes=2 * d, fmt="bf16")
        return SimpleNamespace(n_cold=n_cold, cold=SimpleNamespace(cold=rows),
                               cold_ffn=lambda x, sel: trace.append(f"cold{l}"))

    step = object.__new__(HybridGraphedDecodeStep)
    step.model = SimpleNamespace(config=SimpleNamespace(dim=d))
    step.token, step.pos = torch.zeros((1, 1), dtype=torch.long), torch.zeros(1, dtype=torch.long)
    step.g_first, step.g_last = Graph("first"), Graph("last")
    step.logits = torch.zeros(1, 1, 4)
    step.staging = SimpleNamespace(mark_ready=lambda: trace.append("ready"), wait=lambda: trace.append("wait"))
    rng = np.random.default_rng(0)
    x0, x2 = rng.standard_normal((1, d)).astype(np.float32), rng.standard_normal((1, d)).astype(np.float32)
    sel0 = rng.random(6) < 0.5
    step.segments = [
        (Graph("pre0"), Graph("hot0"), Graph("post0"), cold(0, 6), (x0, sel0)),
        (Graph("pre1"), Graph("hot1"), Graph("post1"), None, None),
        (Graph("pre2"), Graph("hot2"), Graph("post2"), cold(2, 3), (x2, None)),
    ]
    return step, x0, sel0


def test_profiled_call_runs_the_plain_steps_operations_and_accounts_for_the_wall(monkeypatch):
    """The profiled variant replays, waits and computes exactly what __call__ does, in the same order;
    its host columns add up to the call's wall time and its GPU spans to the token's event span."""
    from hybrid_runtime.hybrid_graph import StepProfile
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    plain, profiled = [], []
    step, x0, sel0 = _fake_graphed_step(plain)
    tok, pos = torch.tensor([[5]]), torch.tensor([3])
    step(tok, pos)
    step, x0, sel0 = _fake_graphed_step(profiled)
    prof = StepProfile(step, max_tokens=3, keep_inputs=2)
    for _ in range(3):
        step.profiled_call(tok, pos, prof)
    assert profiled == plain * 3 and plain.count("wait") == 2
    assert prof.n == 3 and step.token.item() == 5
    np.testing.assert_array_equal(prof.cold_selected, [[sel0.sum(), 0, 3]] * 3)
    np.testing.assert_array_equal(prof.x[1, 0], x0[0])
    np.testing.assert_array_equal(prof.sel[0][1], sel0)
    assert prof.sel[2].shape == (2, 0) and prof.sel[1].shape == (2, 0)
    th = prof.token_host
    np.testing.assert_allclose(th[:, 0], th[:, 1] + prof.host.sum(axis=(1, 2)) + th[:, 2] + th[:, 3], rtol=1e-9)
    np.testing.assert_allclose(prof.token_gpu[:, 2], prof.token_gpu[:, 0] + prof.gpu.sum(axis=(1, 2))
                               + prof.token_gpu[:, 1], rtol=1e-6, atol=1e-9)
    assert (prof.host[:, 1, 1:3] == 0).all()          # no wait and no cold FFN in the all-hot layer
    with pytest.raises(ValueError, match="holds 3 tokens"):
        step.profiled_call(tok, pos, prof)


def _cold_ffn(act: str, threshold: float, fmt: str, n_cold: int = 40, d: int = 32, seed: int = 0):
    from hybrid_runtime.activations import Activation
    from hybrid_runtime.cpu_ffn import ColdRows
    from hybrid_runtime.hybrid import CpuStaging, HybridFFN
    from hybrid_runtime.model import RMSNorm
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(n_cold, d, generator=g) / d ** 0.5 for _ in range(3)]
    hot = [torch.zeros(0, d) for _ in range(3)]
    return HybridFFN(RMSNorm(d, 1e-5), *hot, ColdRows.from_torch(*w, fmt=fmt), Activation(act, threshold),
                     CpuStaging())


@pytest.mark.parametrize("act,threshold,fmt", [("relu", 0.0, "bf16"), ("fatrelu", 0.1, "fp16"),
                                               ("drelu", 0.0, "int8")])
def test_cold_firing_counts_match_a_numpy_reference(act, threshold, fmt):
    """Which selected cold neurons fired, recomputed from the stored rows: gate rows read for every
    selected neuron, up rows where the gate fires, down rows where the neuron is active."""
    from hybrid_runtime.activations import Activation
    from hybrid_runtime.hybrid_graph import cold_firing_counts
    T, d = 5, 32
    ffns = [_cold_ffn(act, threshold, fmt, seed=1), None, _cold_ffn(act, threshold, fmt, seed=2)]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((T, 3, d)).astype(np.float32)
    sel = [rng.random((T, 40)) < 0.4, np.zeros((T, 0), bool), np.zeros((T, 0), bool)]   # layer 2: exact mode
    got = cold_firing_counts(ffns, x, sel)
    for l, ffn in enumerate(ffns):
        if ffn is None:
            assert (got[l] == 0).all()
            continue
        gate, up, _ = (w.astype(np.float64) for w in ffn.cold.cold.dequantize())
        g, u = x[:, l].astype(np.float64) @ gate.T, x[:, l].astype(np.float64) @ up.T     # (T, n_cold)
        m = sel[l] if sel[l].shape[1] else np.ones((T, 40), bool)
        fired = (g >= threshold) & (g > 0) if act == "fatrelu" else g > 0
        active = Activation(act, threshold).numpy(g, u) != 0
        np.testing.assert_array_equal(got[l], [m.sum(), (fired & m).sum(), (active & m).sum()])
    assert got[2, 0] == T * 40 and 0 < got[0, 2] <= got[0, 1] < got[0, 0]


def _raw_profile(T: int = 4, L: int = 3) -> dict:
    """A StepProfile.raw() with round numbers: every host phase 10 us per layer, cold FFN 100 us,
    GPU spans 20 us each, 50 of 100 cold neurons selected in layers 0 and 2, none in layer 1."""
    from hybrid_runtime.hybrid_graph import GPU_SPANS, HOST_PHASES, TOKEN_GPU, TOKEN_HOST
    host = np.full((T, L, len(HOST_PHASES)), 10e-6)
    host[:, :, HOST_PHASES.index("cold_ffn")] = [100e-6, 0, 100e-6]
    host[:, 1, HOST_PHASES.index("wait")] = 0
    gpu = np.full((T, L, len(GPU_SPANS)), 0.02)
    first, last, tail = 30e-6, 40e-6, 50e-6
    wall = first + host.sum(axis=(1, 2)) + last + tail
    return {"tokens": T, "layers": L, "host_phases": HOST_PHASES, "gpu_spans": GPU_SPANS,
            "token_host_cols": TOKEN_HOST, "token_gpu_cols": TOKEN_GPU, "host_s": host, "gpu_ms": gpu,
            "token_host_s": np.stack([wall, np.full(T, first), np.full(T, last), np.full(T, tail)], axis=1),
            "token_gpu_ms": np.tile([0.05, 0.06, 0.05 + 0.02 * 5 * L + 0.06], (T, 1)),
            "cold_selected": np.tile([50, 0, 50], (T, 1)), "n_cold": np.array([100, 0, 100]),
            "cold_row_bytes": np.array([8192, 0, 8192]), "cold_format": "bf16"}


def test_summarise_and_format_graphed_profile():
    from bench.step_profile import format_any_profile, format_graphed_profile, summarise_graphed_profile
    raw = _raw_profile()
    firing = np.array([[200, 100, 80], [0, 0, 0], [200, 50, 50]])      # over 4 kept tokens
    p = summarise_graphed_profile(raw, firing, precision=0.7, cpu_read_GBps=100.0, timed_ms=0.5)
    assert p["kind"] == "graphed" and p["tokens"] == 4 and p["layers"] == 3
    assert sum(p["host_timeline_ms"].values()) == pytest.approx(p["wall_ms"])       # the timeline adds up
    assert p["host_timeline_ms"]["cold_ffn"] == pytest.approx(0.2)                   # 2 layers x 100 us
    assert p["per_layer_mean_us"]["host"]["launch"] == pytest.approx(10.0)
    assert p["gpu_total_ms"] == pytest.approx(sum(p["gpu_timeline_ms"].values()))
    c = p["cold"]
    # layer 0: 50 x 8192 x (1 + 0.5 + 0.4) bytes, layer 2: 50 x 8192 x (1 + 0.25 + 0.25), each in 100 us
    b0, b2 = 50 * 8192 * 1.9, 50 * 8192 * 1.5
    assert p["per_layer"]["cold_GBps"][0] == pytest.approx(b0 / 100e-6 / 1e9, rel=1e-3)
    assert c["GBps"] == pytest.approx((b0 + b2) / 200e-6 / 1e9)
    assert c["MB_per_token"] == pytest.approx((b0 + b2) / 1e6)
    assert c["gate_fired_fraction"] == pytest.approx(150 / 400) and c["selected_per_layer"] == 50
    assert "measured" in c["fraction_source"]
    est = summarise_graphed_profile(raw, None, precision=0.7)["cold"]                # no firing counts
    assert "precision 0.700" in est["fraction_source"]
    assert est["MB_per_token"] == pytest.approx(2 * 50 * 8192 * 2.4 / 1e6)
    text = format_graphed_profile(p, layers_table=True)
    assert "CUDA-graphed step" in text and "in situ" in text and f"{c['GBps']:.1f} GB/s" in text
    assert len([ln for ln in text.splitlines() if ln.startswith("      ") and "|" in ln]) == 3   # one per layer
    assert format_any_profile(p) == format_graphed_profile(p)
    json.dumps(p)                                                                  # the results file takes it


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_profiled_graphed_step_on_cuda_matches_the_plain_step(tiny_bench_model):
    """On a tiny hybrid model with cold rows: the profiled step's logits equal the plain graphed step's,
    and its profile is complete (events read, selections counted, firing recomputed)."""
    from bench.step_profile import summarise_graphed_profile
    from hybrid_runtime.hybrid import build_hybrid_model
    from hybrid_runtime.hybrid_graph import HybridGraphedDecodeStep, StepProfile
    from hybrid_runtime.model_dir import open_model_dir
    hyb = tiny_bench_model.hybrid_dir
    cfg = open_model_dir(hyb).config
    dev = torch.device("cuda")
    model = build_hybrid_model(hyb, [cfg.ffn_dim // 2, 0], dev, dtype=torch.bfloat16, mode="predictor",
                               cold_format="bf16")
    model.setup_cache(1, 64)
    step = HybridGraphedDecodeStep(model, dev, warmup_pos=63)
    ids = torch.randint(3, cfg.vocab_size, (1, 20), device=dev, generator=torch.Generator(device=dev).manual_seed(0))

    def decode(call):
        with torch.inference_mode():
            model(ids[:, :8], torch.arange(8, device=dev))
            return torch.cat([call(ids[:, t:t + 1], torch.tensor([t], device=dev))[0].clone() for t in range(8, 20)])
    plain = decode(step)
    prof = StepProfile(step, 12, keep_inputs=12)
    profiled = decode(lambda tok, pos: step.profiled_call(tok, pos, prof))
    assert ((profiled.float() - plain.float()).norm() / plain.float().norm()).item() < 1e-3
    assert prof.n == 12 and (prof.cold_selected.sum(axis=0) > 0).all() and (prof.token_gpu[:, 2] > 0).all()
    firing = prof.firing_counts()
    assert (firing[:, 0] == prof.cold_selected.sum(axis=0)).all() and (firing[:, 1] <= firing[:, 0]).all()
    p = summarise_graphed_profile({**prof.raw(), "firing_tokens": 12}, firing, None, 50.0, None)
    assert p["cold"]["GBps"] > 0 and p["wall_ms"] > 0


# ----------------------------------------------------------------------------- sparsity presets, disk, time


def test_powerinfer_preset_calibration_and_fingerprint(tmp_path):
    """The powerinfer preset's sigma is what the calibration finds for its documented target share, its
    target frequencies have that skew, and it builds in a different cache directory than prosparse."""
    from bench.synthetic import (SPARSITY_PROFILES, mean_top_share, shape_configs, sigma_for_top_share,
                                 work_dir)
    pi = SPARSITY_PROFILES["powerinfer"]
    assert sigma_for_top_share("7b", 0.32, 0.626, pi["mean_density"]) == pytest.approx(pi["freq_sigma"], abs=0.01)
    syn, pipe = shape_configs("7b", sparsity_profile="powerinfer")
    assert syn.sparsity_profile == "powerinfer" and syn.mean_density == 0.16
    assert mean_top_share(syn, 0.32) == pytest.approx(0.626, abs=0.005)
    pro, _ = shape_configs("7b")
    assert mean_top_share(pro, 0.32) > 0.66                       # prosparse is more skewed
    dirs = {work_dir(*shape_configs("tiny", sparsity_profile=p), tmp_path) for p in SPARSITY_PROFILES}
    dirs.add(work_dir(*shape_configs("tiny", sparsity_profile="powerinfer", freq_sigma=0.5), tmp_path))
    assert len(dirs) == 3
    assert shape_configs("tiny", sparsity_profile="powerinfer", freq_sigma=0.5)[0].sparsity_profile == \
        "powerinfer+custom"
    with pytest.raises(Exception, match="unknown sparsity profile"):
        shape_configs("tiny", sparsity_profile="dense")


def test_powerinfer_chain_on_tiny_and_its_report(work):
    """Build -> profile -> predictors on the tiny shape with the powerinfer preset: the profile measures
    the preset's density and records the top-32% share; the results section says what was measured and
    that PowerInfer's figures are not side by side."""
    from bench.report import format_sparsity_profile
    from bench.synthetic import prepare_bench_model, shape_configs
    syn, pipe = shape_configs("tiny", seed=0, sparsity_profile="powerinfer")
    bm = prepare_bench_model(syn, pipe, work, "cpu", progress=False)
    prof = bm.manifest["profile"]
    assert abs((1 - prof["sparsity"]) - 0.16) < 0.03 and 0.5 < prof["top32"] < 0.75
    m = {"synthetic": bm.manifest["synthetic"], "profile": prof, "predictors": bm.manifest["predictors"]}
    text = format_sparsity_profile(m)
    assert "`powerinfer`" in text and "not side by side" in text and f"{prof['top32']:.3f}" in text
    assert f"{bm.manifest['predictors']['pred_density']:.3f}" in text and "~0.24" in text


def test_disk_checks_and_clean_work(tmp_path):
    from bench.synthetic import check_disk, clean_work, disk_sizes, free_bytes, shape_configs
    from hybrid_runtime.errors import UserError
    syn, pipe = shape_configs("13b")
    sizes = disk_sizes(syn, pipe)
    assert 25.5e9 < sizes["hf"] < 26.5e9 and sizes["hybrid"] > sizes["hf"] and 3e9 < sizes["samples"] < 5e9
    check_disk(tmp_path / "not" / "yet", 1024, "a small file")           # the nearest existing parent counts
    with pytest.raises(UserError, match=r"not enough disk for the HF checkpoint .*needs .* GiB, .* GiB free"):
        check_disk(tmp_path, free_bytes(tmp_path) + 10 * 1024 ** 3, "the HF checkpoint")
    keep = tmp_path / "synthetic-7b-s0-0123456789abcdef"
    other = tmp_path / "synthetic-13b-s0-fedcba9876543210"
    mine = tmp_path / "synthetic-notes"                                      # not a build: never touched
    for p in (keep / "hf", other / "hf", mine, tmp_path / "gguf"):
        p.mkdir(parents=True)
    (other / "hf" / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "gguf" / "m-1234-f16.gguf").write_bytes(b"x" * 10)
    (tmp_path / "gguf" / "readme.txt").write_text("keep")
    removed = clean_work(tmp_path, keep)
    assert sorted(p.name for p, _ in removed) == ["m-1234-f16.gguf", other.name]
    assert dict((p.name, n) for p, n in removed)[other.name] == 1000
    assert keep.is_dir() and mine.is_dir() and (tmp_path / "gguf" / "readme.txt").is_file() and not other.exists()


class _StubRunner:
    """A runner whose 'timings' are given: prefill 0.1 s, then `per_tok` s per decode step."""

    def __init__(self, per_tok: float):
        self.per_tok, self.calls = per_tok, []

    def generate(self, prompt, n_new):
        from bench.systems import RunResult
        self.calls.append(n_new)
        return RunResult(0.1, self.per_tok * (n_new - 1), n_new - 1, len(prompt), [7] * n_new)


def test_time_runs_trims_instead_of_overrunning():
    from types import SimpleNamespace

    from bench.systems import MIN_TIMED_TOKENS, _time_runs
    from bench.options import BenchLog
    ctx = SimpleNamespace(log=BenchLog(100.0), prompt=[1, 2, 3])
    r = _StubRunner(per_tok=0.5)                         # 128 tokens ~ 70 s per run
    results, note, n = _time_runs(r, ctx, "slow", 128, 3, cap_s=30.0)
    assert len(results) == 1 and 16 <= n < 128 and n * 0.5 * 1.1 <= 30 and "instead of 3 x 128" in note
    assert r.calls == [8, n]
    results, note, n = _time_runs(_StubRunner(0.5), ctx, "slower", 128, 3, cap_s=1.0)
    assert n == MIN_TIMED_TOKENS and len(results) == 1   # never below the floor
    results, note, n = _time_runs(_StubRunner(0.05), ctx, "medium", 128, 3, cap_s=15.0)
    assert (len(results), n) == (2, 128) and "2 run(s) instead of 3" in note
    results, note, n = _time_runs(_StubRunner(0.001), ctx, "fast", 128, 3, cap_s=15.0)
    assert (len(results), n, note) == (3, 128, "")


def test_device_info_pieces_and_the_device_wide_gpu_column():
    from bench.report import cpu_flags, format_tables, numba_runtime_info
    from bench.limits import measure_cpu_read_bw
    flags = cpu_flags("processor : 0\nflags\t\t: fpu sse avx2 f16c avx512f\nprocessor : 1\n")
    assert flags["f16c"] and flags["avx512f"] and not flags["avx512_fp16"] and not flags["amx_bf16"]
    measure_cpu_read_bw(1 << 20)                          # a parallel Numba kernel: the layer is known after
    info = numba_runtime_info()
    assert info["numba_threading_layer"] in ("omp", "tbb", "workqueue") and info["numba_threads"] >= 1
    row = {"status": "ok", "budget_gib": None, "prefill_tps": 1.0, "decode_tps": 2.0, "ms_per_token": 500.0,
           "cpu_rss_gib": 1.0, "runs": 1, "new_tokens": 4}
    res = {"systems": [{**row, "system": "llamacpp-gpu", "peak_gpu_gib": 13.37, "peak_gpu_source": "device-wide"},
                       {**row, "system": "dense-gpu", "peak_gpu_gib": 12.79, "peak_gpu_source": "torch"}]}
    table = format_tables(res, markdown=True)
    assert "| 13.37* |" in table and "| 12.79 |" in table


def test_llamacpp_goes_before_the_pack_only_when_the_disk_needs_it(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import importlib.util

    import bench.synthetic as syn_mod
    from bench.options import BenchLog, BenchOptions
    from bench.run_bench import _llamacpp_before_pack
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("llama_cpp", "gguf") else real(name, *a))
    sizes = {"gguf": 10 * 1024 ** 3, "hybrid": 11 * 1024 ** 3}
    bm = SimpleNamespace(work=tmp_path)
    systems = ["dense-gpu", "hybrid", "llamacpp-gpu", "llamacpp-offload"]
    for free_gib, want in ((40, []), (15, ["llamacpp-gpu", "llamacpp-offload"]), (5, [])):
        monkeypatch.setattr(syn_mod, "free_bytes", lambda p, f=free_gib: f * 1024 ** 3)
        log = BenchLog(100)
        assert _llamacpp_before_pack(BenchOptions(), True, systems, bm, sizes, log) == want
        assert ("before the pack" in "\n".join(log.lines)) == bool(want)
    assert _llamacpp_before_pack(BenchOptions(), False, systems, bm, sizes, BenchLog(100)) == []   # no CUDA


def test_gguf_is_dropped_after_llamacpp_when_disk_is_short(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import bench.synthetic as syn_mod
    from bench.options import BenchLog
    from bench.systems import drop_gguf, gguf_path
    hf = tmp_path / "synthetic-7b-s0-0123456789abcdef" / "hf"
    hf.mkdir(parents=True)
    ctx = SimpleNamespace(hf_dir=hf, opts=SimpleNamespace(work=str(tmp_path)), log=BenchLog(100))
    out = gguf_path(ctx)
    assert out == hf.parent / "llamacpp" / "model-f16.gguf"
    out.parent.mkdir()
    out.write_bytes(b"x" * 4096)
    drop_gguf(ctx, None)                                     # plenty of disk: kept (a later run reuses it)
    assert out.is_file()
    monkeypatch.setattr(syn_mod, "free_bytes", lambda p: 1024)
    drop_gguf(ctx, None)                                     # another one would not fit: deleted
    assert not out.exists() and "disk short" in ctx.log.lines[-1]
    out.write_bytes(b"x")
    monkeypatch.undo()
    drop_gguf(ctx, "the hybrid directory is next")
    assert not out.exists()


def test_dense_limit_reads_a_tied_lm_head_whole():
    """One embedding row is read per token, but a tied lm_head reads the same matrix whole."""
    from types import SimpleNamespace

    from bench.limits import kv_read_bytes
    from bench.systems import _dense_limit
    from hybrid_runtime.model import ModelConfig, Transformer
    got = {}
    for tie in (False, True):
        cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=64, vocab_size=100, tie_embeddings=tie)
        m = Transformer(cfg)
        if tie:
            m.output.weight = m.tok_embeddings.weight
        ctx = SimpleNamespace(cfg=cfg, prompt=[1] * 4, opts=SimpleNamespace(new_tokens=4), bw={"cpu_read_GBps": 10.0})
        got[tie] = _dense_limit(ctx, m, "cpu").cpu_bytes - kv_read_bytes(cfg, 6, 4)
    per_layer = 4 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32)
    assert got[False] == per_layer + 4 * (100 * 32 + 32)      # lm_head and final norm; no embedding table
    assert got[True] == got[False]                           # tied: the same bytes (the one matrix, read whole)
    # mixture of experts: a token reads the router and its top-k experts, not the others
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=64, vocab_size=100, n_experts=4,
                      experts_per_token=2, architecture="MixtralForCausalLM")
    ctx = SimpleNamespace(cfg=cfg, prompt=[1] * 4, opts=SimpleNamespace(new_tokens=4), bw={"cpu_read_GBps": 10.0})
    moe = _dense_limit(ctx, Transformer(cfg), "cpu").cpu_bytes - kv_read_bytes(cfg, 6, 4)
    assert moe == got[False] + 4 * (2 - 1) * 3 * 32 * 64 + 4 * 4 * 32     # one more expert's rows + the router


def test_cpu_format_sets_the_engine_dtype_and_the_gguf_type(tmp_path):
    """--cpu-format: this engine's CPU systems in bfloat16/float32 and llama.cpp on the CPU from an F16/F32 GGUF
    (the GPU llama.cpp systems keep F16); both GGUFs are cached side by side."""
    from types import SimpleNamespace

    from bench.systems import cpu_format_dtype, gguf_path, gguf_type
    hf = tmp_path / "synthetic-1b-s0-0123456789abcdef" / "hf"
    for fmt, dtype, cpu_kind in (("bf16", "bfloat16", "f16"), ("f32", "float32", "f32")):
        for cuda in (False, True):
            ctx = SimpleNamespace(hf_dir=hf, cuda=cuda, opts=SimpleNamespace(work=str(tmp_path), cpu_format=fmt))
            assert cpu_format_dtype(ctx) == dtype
            assert gguf_type(ctx, cpu_only=True) == cpu_kind
            assert gguf_type(ctx, cpu_only=False) == (cpu_kind if not cuda else "f16")
            assert gguf_path(ctx, cpu_kind).name == f"model-{cpu_kind}.gguf"


def test_llamacpp_hook_runs_them_first_and_keeps_the_table_order(monkeypatch, tmp_path, capsys):
    """The before-pack path end to end on the CPU (a fresh tiny build; llama.cpp itself is skipped
    without CUDA): the early rows land once, in the requested order."""
    import bench.run_bench as rb
    seen = []

    def early(opts, cuda, systems, bm, sizes, log):
        seen.append(bm.hybrid_dir.exists())
        return ["llamacpp-gpu"]
    monkeypatch.setattr(rb, "_llamacpp_before_pack", early)
    res = rb.run_bench(rb.BenchOptions(model="synthetic-tiny", systems="dense-cpu,llamacpp-gpu", prompt_tokens=12,
                                       new_tokens=4, runs=1, sweep="none", work=str(tmp_path / "w"),
                                       out=str(tmp_path / "o")))
    assert seen == [False]                                   # called once, before the hybrid directory exists
    assert [r["system"] for r in res["systems"]] == ["dense-cpu", "llamacpp-gpu"]
    assert res["systems"][0]["status"] == "ok"
    assert res["systems"][1]["status"] == "skipped" if not CUDA else res["systems"][1]["status"] in ("ok", "skipped")
    assert "system llamacpp-gpu" in res["phases"]


def test_targets_compare_with_llamacpp_when_it_ran():
    from bench.report import checks
    rows = [{"system": n, "status": "ok", "decode_tps": v} for n, v in
            (("hybrid", 90.0), ("llamacpp-offload", 18.0), ("llamacpp-gpu", 150.0), ("hybrid-gpu", 300.0))]
    out = "\n".join(checks({"systems": rows}))
    assert "hybrid vs llama.cpp at the same budget: 5.00x" in out
    assert "hybrid fully on the GPU vs llama.cpp fully on the GPU: 2.00x" in out
    assert "dense layer offload" not in out


def test_cpu_ffn_microbench_runs_both_kernels(tmp_path):
    """bench/bench_cpu_ffn.py end to end on a tiny shape: both kernel variants (each checked against the
    numpy reference inside the bench) and a well-formed JSON; never a timing assertion."""
    from click.testing import CliRunner

    from bench.bench_cpu_ffn import main as cpu_ffn_bench
    out = tmp_path / "cpu_ffn.json"
    res = CliRunner().invoke(cpu_ffn_bench, ["--formats", "fp16,int8", "--dim", "256", "--n-cold", "300",
                                             "--total-gb", "0.005", "--active-frac", "0.1", "--superset", "2",
                                             "--seconds", "0.05", "--batch-tokens", "4", "--skewed",
                                             "--compare-8way", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert [(r["fmt"], r["kernel"]) for r in data["decode"]] == [
        ("fp16", "4-way"), ("fp16", "8-way"), ("int8", "4-way"), ("int8", "8-way")]
    assert all(r["calls"] > 0 and r["gbps_median"] > 0 for r in data["decode"])
    assert [b["fmt"] for b in data["batch"]] == ["fp16", "int8"]
