"""`hybrid-convert profile` / `train-predictors` on tiny local models (CPU)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from hybrid_runtime.errors import UserError
from hybrid_runtime.tiny import build_tiny_model

torch.set_num_threads(1)

WORDS = "the quick brown fox jumps over a lazy dog while seven birds sing near old river banks".split()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(120)))
    return p


@pytest.fixture(scope="module")
def relu_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("relu"), seed=1, dim=32, n_layers=2, n_heads=4,
                            n_kv_heads=2, ffn_dim=44, act="relu")


def _cfg(**kw):
    from convert.profile import ProfileConfig
    base = dict(tokens=2048, block_len=64, batch_size=3, samples_per_layer=500, chunk_rows=64, progress=False)
    return ProfileConfig(**{**base, **kw})


def _hf_reference(model_dir, data_file, cfg):
    """Independent count with transformers' LlamaForCausalLM: hooks on each MLP's input."""
    from transformers import LlamaForCausalLM

    from convert.data import load_token_blocks
    from hybrid_runtime.loading import load_tokenizer
    hf = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    blocks = load_token_blocks([str(data_file)], load_tokenizer(model_dir), cfg.block_len, cfg.split, cfg.tokens)
    masks, resid = {}, {}
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        hooks.append(layer.mlp.register_forward_pre_hook(
            lambda m, a, i=i: masks.setdefault(i, []).append((m.gate_proj(a[0]) > 0).reshape(-1, m.gate_proj.out_features))))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, i=i: resid.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for b in blocks:
            hf(b[None])
    for h in hooks:
        h.remove()
    return {i: torch.cat(v) for i, v in masks.items()}, {i: torch.cat(v) for i, v in resid.items()}


def test_profile_counts_and_samples_match_transformers(relu_model, data_file, tmp_path):
    from convert.profile import coverage_summary, run_profile
    from predictors.samples import SampleReader, unpack_mask
    cfg = _cfg()
    prof = run_profile(str(relu_model), [str(data_file)], str(tmp_path / "p"), cfg)
    ref_masks, ref_resid = _hf_reference(relu_model, data_file, cfg)
    n_tok = ref_masks[0].shape[0]
    assert prof["data"]["tokens"] == n_tok == 2048
    with safe_open(str(tmp_path / "p" / "frequencies.safetensors"), framework="pt") as fh:
        counts, freq = fh.get_tensor("counts"), fh.get_tensor("frequency")
        assert fh.metadata()["n_tokens"] == str(n_tok)
    for i in range(2):
        assert torch.equal(counts[i], ref_masks[i].sum(0).long()), f"layer {i}"
        assert torch.allclose(freq[i], ref_masks[i].float().mean(0))
        assert prof["layers"][i] == {"layer": i, **coverage_summary(counts[i].numpy(), n_tok)}
    reader = SampleReader(tmp_path / "p" / "samples")
    assert reader.x_kind == "residual"
    for i in range(2):
        x, packed = reader.load(i)
        assert len(x) == 500
        # each stored h is one of the model's residuals (to bf16 rounding); its mask is that token's mask
        dist = torch.cdist(x.float(), ref_resid[i])          # (500, n_tok)
        nearest = dist.argmin(1)  # (identical contexts, e.g. a block's first token, give identical rows)
        assert torch.all(dist.min(1).values <= 0.01 * ref_resid[i][nearest].norm(dim=1))
        assert torch.equal(unpack_mask(packed, 44), ref_masks[i][nearest])


def test_coverage_summary_hand_made():
    from convert.profile import coverage_summary
    counts = np.array([0, 10, 0, 5, 5, 0, 0, 0, 0, 80])  # 10 neurons, 100 activations over 50 tokens
    s = coverage_summary(counts, 50)
    assert s["density"] == pytest.approx(100 / 500) and s["sparsity"] == pytest.approx(0.8)
    assert (s["top10"], s["top20"], s["top50"]) == (0.8, 0.9, 1.0)
    assert s["dead"] == 6


def test_profile_resume_after_interruption(relu_model, data_file, tmp_path, monkeypatch):
    import convert.profile as cp
    from predictors.samples import SampleReader
    cfg = _cfg(checkpoint_seconds=0.0, chunk_rows=16)
    clean = cp.run_profile(str(relu_model), [str(data_file)], str(tmp_path / "clean"), cfg)

    class Crashing(cp.SampleWriter):
        appends = 0

        def append(self, layer, x, mask):
            Crashing.appends += 1
            if Crashing.appends == 10:  # batch 5, layer 1: after layer 0 committed chunks past the checkpoint
                raise KeyboardInterrupt
            super().append(layer, x, mask)

    monkeypatch.setattr(cp, "SampleWriter", Crashing)
    with pytest.raises(KeyboardInterrupt):
        cp.run_profile(str(relu_model), [str(data_file)], str(tmp_path / "cut"), cfg)
    state, _ = cp._load_progress(tmp_path / "cut" / "progress.safetensors")
    manifest = json.loads((tmp_path / "cut" / "samples" / "manifest.json").read_text())
    assert len(manifest["layers"][0]["chunks"]) > state["chunks"][0]  # chunks the resume must drop
    assert not (tmp_path / "cut" / "profile.json").exists()
    monkeypatch.undo()
    with pytest.raises(UserError, match="not empty"):  # no silent overwrite of the interrupted run
        cp.run_profile(str(relu_model), [str(data_file)], str(tmp_path / "cut"), cfg)
    with pytest.raises(UserError, match="settings differs"):
        cp.run_profile(str(relu_model), [str(data_file)], str(tmp_path / "cut"), _cfg(checkpoint_seconds=0.0,
                                                                                      chunk_rows=16, seed=5),
                       resume=True)
    resumed = cp.run_profile(str(relu_model), [str(data_file)], str(tmp_path / "cut"), cfg, resume=True)
    assert resumed["layers"] == clean["layers"]
    for name in ("counts",):
        with safe_open(str(tmp_path / "clean" / "frequencies.safetensors"), framework="pt") as a, \
                safe_open(str(tmp_path / "cut" / "frequencies.safetensors"), framework="pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name))
    ra, rb = SampleReader(tmp_path / "clean" / "samples"), SampleReader(tmp_path / "cut" / "samples")
    for i in range(2):
        (xa, ma), (xb, mb) = ra.load(i), rb.load(i)
        assert torch.equal(xa, xb) and torch.equal(ma, mb)  # nothing lost, nothing duplicated
    assert not (tmp_path / "cut" / "progress.safetensors").exists()
    again = cp.run_profile(str(relu_model), [str(data_file)], str(tmp_path / "cut"), cfg, resume=True)
    assert again["layers"] == clean["layers"]  # already complete: a no-op


def test_profile_bad_inputs(relu_model, data_file, tmp_path):
    from convert.profile import run_profile
    silu = build_tiny_model(tmp_path / "silu", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=44, act="silu")
    with pytest.raises(UserError, match="no exact zeros.*--cett"):
        run_profile(str(silu), [str(data_file)], str(tmp_path / "o1"), _cfg())
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        run_profile(str(relu_model), [str(empty)], str(tmp_path / "o2"), _cfg())
    with pytest.raises(UserError, match="not found"):
        run_profile(str(relu_model), [str(tmp_path / "missing.txt")], str(tmp_path / "o3"), _cfg())
    # more tokens than the data holds: everything available is used and recorded
    prof = run_profile(str(relu_model), [str(data_file)], str(tmp_path / "o4"), _cfg(tokens=10**7))
    assert prof["data"]["tokens_requested"] == 10**7 and 2048 < prof["data"]["tokens"] < 10**7
    # existing output without --force
    with pytest.raises(UserError, match="--force"):
        run_profile(str(relu_model), [str(data_file)], str(tmp_path / "o4"), _cfg())
    # resuming a profile dir that belongs to another model
    other = build_tiny_model(tmp_path / "other", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, act="relu")
    with pytest.raises(UserError, match="another model"):
        run_profile(str(other), [str(data_file)], str(tmp_path / "o4"), _cfg(tokens=10**7), resume=True)


def test_cett_threshold_and_silu_profile(data_file, tmp_path):
    from convert.profile import run_profile
    from hybrid_runtime.activations import cett_threshold
    g = torch.Generator().manual_seed(0)
    a, down = torch.randn(64, 40, generator=g), torch.randn(40, 16, generator=g)
    eps = cett_threshold(a, down, 0.2)[0]
    mag = a.abs() * down.norm(dim=1)
    cett = ((a * (mag <= eps)) @ down).norm(dim=1) / (a @ down).norm(dim=1)
    assert float(cett.mean()) == pytest.approx(0.2, abs=0.01)
    silu = build_tiny_model(tmp_path / "silu", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=44, act="silu")
    prof = run_profile(str(silu), [str(data_file)], str(tmp_path / "p"), _cfg(cett=0.2, cett_tokens=128))
    assert prof["activity"]["kind"] == "magnitude" and len(prof["activity"]["magnitude_thresholds"]) == 2
    assert all(0.05 < r["density"] < 0.95 for r in prof["layers"])


def test_cli_profile_and_train_predictors(relu_model, data_file, tmp_path):
    from convert.cli import main_group
    from hybrid_runtime.predictor import PredictorSet
    run = CliRunner().invoke
    prof_dir, out = tmp_path / "prof", tmp_path / "pred"
    args = ["profile", "--model", str(relu_model), "--data", str(data_file), "--tokens", "2048", "--out",
            str(prof_dir), "--samples-per-layer", "1200", "--block-len", "64", "--device", "cpu"]
    r = run(main_group, args)
    assert r.exit_code == 0, r.output
    assert "top10%" in r.output
    r = run(main_group, args)
    assert r.exit_code != 0 and "--force" in str(r.exception)
    targs = ["train-predictors", "--profile", str(prof_dir), "--out", str(out), "--ranks", "8",
             "--max-epochs", "3", "--input", "ffn_norm", "--baseline-layers", "1", "--device", "cpu"]
    r = run(main_group, targs)
    assert r.exit_code == 0, r.output
    assert "ridge_lowrank" in r.output and "layers meeting recall" in r.output
    ps = PredictorSet.load(out / "predictors.safetensors")
    assert len(ps) == 2 and ps.input_kind == "ffn_norm" and ps.layers[0].rank == 8
    m = json.loads((out / "predictor_metrics.json").read_text())
    assert m["targets"]["recall"] == 0.95 and len(m["layers"]) == 2
    assert all(len(layer["test"]["curve"]) >= 10 for layer in m["layers"])
    assert m["layers"][1]["baselines"] and m["layers"][0]["baselines"] is None
    assert not (out / "partial").exists()
    r = run(main_group, ["train-predictors", "--profile", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "profile.json" in str(r.exception)
