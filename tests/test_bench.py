"""Benchmark harness on the CPU: the synthetic model's construction, the layer-offload baseline against
the dense engine, and a smoke run of `hybrid-run bench` on a tiny model (it runs and writes a
well-formed table and JSON; timings are never asserted)."""
from __future__ import annotations

import json
import sys

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
    from hybrid_runtime.hybrid_format import read_hybrid_meta
    from hybrid_runtime.loading import load_model
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
    from bench.run_bench import build_layer_offload
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
    assert off.model.layers[2].ffn.gate.dtype == torch.bfloat16
    assert ((logits(off) - ref).norm() / ref.norm()).item() < 3e-2


def test_offload_layer_count_follows_the_budget():
    from bench.run_bench import offload_layers_for_budget
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
    assert not list(tmp_path.glob("*.json"))
