"""Predictors: sample store, metrics, predictor model/file format, trainer, sklearn baselines (CPU)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hybrid_runtime.errors import UserError
from hybrid_runtime.model import FeedForward, ModelConfig
from predictors.metrics import (ffn_output_rel_error, mask_metrics, recall_at_density, recall_density_curve,
                                recall_standard_error, threshold_for_density, threshold_for_recall)
from hybrid_runtime.predictor import LayerPredictor, PredictorSet
from predictors.samples import (SampleReader, SampleWriter, pack_mask, unpack_mask, unpack_mask_np,
                                x_from_storage, x_to_storage)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- sample store

@pytest.mark.parametrize("f", [1, 7, 8, 13, 64, 173])
def test_pack_unpack_roundtrip(f):
    g = torch.Generator().manual_seed(f)
    m = torch.rand(37, f, generator=g) < 0.3
    packed = pack_mask(m)
    assert packed.shape == (37, (f + 7) // 8) and packed.dtype == np.uint8
    assert np.array_equal(unpack_mask_np(packed, f), m.numpy())
    assert torch.equal(unpack_mask(torch.from_numpy(packed), f), m)


@pytest.mark.parametrize("x_dtype,tdtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_x_storage_exact(x_dtype, tdtype):
    x = torch.randn(5, 9) * 100
    back = x_from_storage(x_to_storage(x, x_dtype), x_dtype)
    assert back.dtype == tdtype and torch.equal(back, x.to(tdtype))


def _rand_batch(g, n, d, f):
    return torch.randn(n, d, generator=g), torch.rand(n, f, generator=g) < 0.2


def test_store_roundtrip_chunks(tmp_path):
    d, f, L = 6, 13, 2
    g = torch.Generator().manual_seed(0)
    w = SampleWriter(tmp_path / "s", L, d, f, chunk_rows=7)
    ref = {0: [], 1: []}
    for n in (3, 10, 1, 8):  # appends that straddle chunk borders
        for layer in range(L):
            x, m = _rand_batch(g, n + layer, d, f)
            w.append(layer, x, m)
            ref[layer].append((x, m))
    w.flush()
    r = SampleReader(tmp_path / "s")
    for layer in range(L):
        xr = torch.cat([x for x, _ in ref[layer]]).to(torch.bfloat16)
        mr = torch.cat([m for _, m in ref[layer]])
        assert r.n_samples(layer) == len(xr)
        x, packed = r.load(layer)
        assert torch.equal(x, xr) and torch.equal(unpack_mask(packed, f), mr)
        x5, p5 = r.load(layer, max_rows=5)
        assert torch.equal(x5, xr[:5]) and torch.equal(unpack_mask(p5, f), mr[:5])
        chunks = list(r.iter_chunks(layer))
        assert [len(c[0]) for c in chunks[:-1]] == [7] * (len(chunks) - 1)  # full chunks, short last one
        assert sum(len(c[0]) for c in chunks) == len(xr)


def test_store_resume_after_interruption(tmp_path):
    d, f = 4, 21
    g = torch.Generator().manual_seed(1)
    root = tmp_path / "s"
    w = SampleWriter(root, 1, d, f, x_dtype="float16", chunk_rows=5)
    x1, m1 = _rand_batch(g, 12, d, f)
    w.append(0, x1, m1)  # commits 2 chunks (10 rows); 2 rows stay buffered and die with the "crash"
    # a crash mid-commit leaves a temp file and a chunk file the manifest never got
    (root / "layer_000" / "chunk_000002.npz.tmp").write_bytes(b"partial")
    (root / "layer_000" / "chunk_000002.npz").write_bytes(b"uncommitted")
    del w
    w = SampleWriter(root, 1, d, f, x_dtype="float16", chunk_rows=5, resume=True)
    assert w.committed_chunks() == [2] and w.rows(0) == 10
    assert sorted(p.name for p in (root / "layer_000").iterdir()) == ["chunk_000000.npz", "chunk_000001.npz"]
    x2, m2 = _rand_batch(g, 6, d, f)
    w.append(0, x2, m2)
    w.flush()
    x, packed = SampleReader(root).load(0)
    assert torch.equal(x, torch.cat([x1[:10], x2]).half())
    assert torch.equal(unpack_mask(packed, f), torch.cat([m1[:10], m2]))
    # truncation to an outer checkpoint drops later chunks and their files
    w = SampleWriter(root, 1, d, f, x_dtype="float16", chunk_rows=5, resume=True, keep_chunks=[1])
    assert w.rows(0) == 5 and len(list((root / "layer_000").iterdir())) == 1
    with pytest.raises(UserError, match="samples were lost"):
        SampleWriter(root, 1, d, f, x_dtype="float16", chunk_rows=5, resume=True, keep_chunks=[3])


def test_store_bad_input(tmp_path):
    w = SampleWriter(tmp_path / "s", 1, 4, 8)
    with pytest.raises(ValueError):
        w.append(0, torch.zeros(3, 5), torch.zeros(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError):
        w.append(0, torch.zeros(3, 4), torch.zeros(3, 9, dtype=torch.bool))
    with pytest.raises(UserError, match="does not match"):
        SampleWriter(tmp_path / "s", 1, 4, 16, resume=True)
    with pytest.raises(UserError, match="not found"):
        SampleReader(tmp_path / "nothing")
    (tmp_path / "s" / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        SampleReader(tmp_path / "s")


# ----------------------------------------------------------------------------- metrics

def test_mask_metrics_hand_made():
    true = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    pred = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    m = mask_metrics(pred, true)  # TP=2, FP=2, FN=1
    assert (m["tp"], m["fp"], m["fn"]) == (2, 2, 1)
    assert m["recall"] == pytest.approx(2 / 3) and m["precision"] == pytest.approx(0.5)
    assert m["true_density"] == pytest.approx(3 / 8) and m["pred_density"] == pytest.approx(4 / 8)
    empty = mask_metrics(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool))
    assert empty["recall"] == 1.0 and empty["precision"] == 1.0
    with pytest.raises(ValueError):
        mask_metrics(pred, true[:, :3])


def test_ffn_rel_error_hand_made():
    a = torch.tensor([[1.0, 2.0, 0.0], [0.0, 3.0, 4.0]])
    down = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    true = a != 0
    pred = torch.tensor([[True, False, True], [False, True, True]])  # misses neuron 1 of token 0
    # y_true = [[1, 2], [4, 7]]; y_pred = [[1, 0], [4, 7]] -> error [0, 2]
    err = ffn_output_rel_error(a, down, true, pred, block=1)
    assert err == pytest.approx(2 / math.sqrt(1 + 4 + 16 + 49))
    assert ffn_output_rel_error(a, down, true, true | pred) == 0.0  # extra neurons with a = 0 cost nothing


def test_thresholds_exact():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.7, 0.4]])
    true = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)  # positives: .9 .5 .8 .4
    t = threshold_for_recall(scores, true, 0.75)  # need 3 of 4 -> keep .9 .8 .5, threshold just below .5
    assert mask_metrics(scores > t, true)["recall"] == 0.75
    assert t < 0.5 and t > 0.49999
    assert mask_metrics(scores > threshold_for_recall(scores, true, 1.0), true)["recall"] == 1.0
    td = threshold_for_density(scores, 3 / 8)  # top 3: .9 .8 .7
    assert (scores > td).sum() == 3 and td == pytest.approx(0.5)
    assert (scores > threshold_for_density(scores, 0.0)).sum() == 0
    assert (scores > threshold_for_density(scores, 1.0)).sum() == 8
    r = recall_at_density(scores, true, 0.25)  # .9 .8 -> both positive
    assert r["recall"] == 0.5 and r["precision"] == 1.0


def test_curve_matches_direct_and_is_monotone():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(200, 30, generator=g)
    true = (scores + 0.8 * torch.randn(200, 30, generator=g)) > 1.0
    curve = recall_density_curve(scores, true)
    for c in curve:
        direct = mask_metrics(scores > c["threshold"], true)
        assert c["recall"] == pytest.approx(direct["recall"]) and c["recall"] >= c["recall_target"]
        assert c["pred_density"] == pytest.approx(direct["pred_density"])
        assert c["precision"] == pytest.approx(direct["precision"])
        # the largest such threshold: the next score above it would break the target
        above = scores[scores > c["threshold"]].min()
        assert mask_metrics(scores > above, true)["recall"] < c["recall_target"]
    dens = [c["pred_density"] for c in curve]
    assert dens == sorted(dens)


def test_recall_standard_error_hand_made():
    true = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    pred = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool)  # tp = (1, 2), pos = (2, 2), R = 3/4
    assert recall_standard_error(pred, true) == pytest.approx(math.sqrt(0.25 + 0.25) / 4)
    assert recall_standard_error(true, true) == 0.0


# ----------------------------------------------------------------------------- predictor model + file

def _rand_predictor(d=12, f=20, r=5, bias=True, seed=0, thr=0.25):
    torch.manual_seed(seed)
    p = LayerPredictor(d, f, r, bias=bias, threshold=thr)
    if bias:
        torch.nn.init.normal_(p.b1)
        torch.nn.init.normal_(p.b2)
    return p


def test_predict_active_matches_naive():
    p = _rand_predictor()
    x = torch.randn(3, 4, 12)
    naive = (torch.relu(x @ p.w1.T + p.b1) @ p.w2.T + p.b2) > 0.25
    assert torch.equal(p.predict_active(x), naive)
    assert p.n_params() == 5 * (12 + 20) + 5 + 20


def test_permute_neurons():
    p = _rand_predictor()
    x = torch.randn(8, 12)
    before = p(x)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    p.permute_neurons(perm)
    assert torch.allclose(p(x), before[:, perm], atol=1e-6)
    for bad in (torch.arange(19), torch.tensor([0] * 20), torch.arange(1, 21)):
        with pytest.raises(ValueError):
            p.permute_neurons(bad)


def test_predictor_file_roundtrip(tmp_path):
    layers = [_rand_predictor(r=5, bias=True, seed=0, thr=0.125), _rand_predictor(r=3, bias=False, seed=1, thr=-1.5)]
    ps = PredictorSet(layers, input_kind="residual")
    ps.permute_neurons(1, torch.arange(19, -1, -1))
    path = tmp_path / "predictors.safetensors"
    ps.save(path)
    with safe_open(str(path), framework="pt") as fh:
        meta, keys = fh.metadata(), set(fh.keys())
        assert fh.get_tensor("layers.1.w1").shape == (3, 12) and fh.get_tensor("layers.1.w2").shape == (20, 3)
        assert torch.equal(fh.get_tensor("layers.1.b2"), torch.zeros(20))  # no-bias layers store zeros
    assert keys == {f"layers.{i}.{n}" for i in range(2) for n in ("w1", "b1", "w2", "b2")}
    assert meta["format"] == "hybrid-predictors" and meta["input"] == "residual"
    assert (meta["layers.0.rank"], meta["layers.1.rank"], meta["layers.1.bias"]) == ("5", "3", "0")
    assert float(meta["layers.1.threshold"]) == -1.5
    back = PredictorSet.load(path)
    x = torch.randn(6, 12)
    for a, b in zip(ps.layers, back.layers):
        assert (a.rank, a.bias, a.threshold) == (b.rank, b.bias, b.threshold)
        assert torch.equal(a(x), b(x)) and torch.equal(a.predict_active(x), b.predict_active(x))
    assert back.input_kind == "residual" and back.n_params() == ps.n_params()


def test_predictor_file_bad(tmp_path):
    good = tmp_path / "p.safetensors"
    PredictorSet([_rand_predictor()]).save(good)
    with safe_open(str(good), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    cases = {
        "format": ({**meta, "format": "x"}, tensors, "format"),
        "missing": (meta, {k: v for k, v in tensors.items() if k != "layers.0.b2"}, "missing tensor layers.0.b2"),
        "shape": (meta, {**tensors, "layers.0.w1": torch.zeros(4, 12)}, "has shape"),
        "rank": ({k: v for k, v in meta.items() if k != "layers.0.rank"}, tensors, "layer 0"),
    }
    for name, (m, t, msg) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(t, str(path), metadata=m)
        with pytest.raises(UserError, match=msg):
            PredictorSet.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError, match="not a readable"):
        PredictorSet.load(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="not found"):
        PredictorSet.load(tmp_path / "none.safetensors")


# ----------------------------------------------------------------------------- trainer + baselines

def _synthetic_layer(tmp_path, n=3000, d=32, f=64, seed=0):
    """A FATReLU FFN whose gate is rank 6: activity is a known linear function of x = norm(h)."""
    cfg = ModelConfig(dim=d, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=f, vocab_size=8,
                      act="fatrelu", act_threshold=0.4)
    ffn = FeedForward(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ffn.gate.copy_(torch.randn(f, 6, generator=g) @ torch.randn(6, d, generator=g) / math.sqrt(d))
        ffn.up.copy_(torch.randn(f, d, generator=g) / math.sqrt(d))
        ffn.down.copy_(torch.randn(f, d, generator=g) / math.sqrt(f))
        ffn.norm.weight.copy_(1 + 0.1 * torch.randn(d, generator=g))
        h = 3 * torch.randn(n, d, generator=g)
        x = ffn.norm(h)
        mask = ffn.activation.active(x @ ffn.gate.T, x @ ffn.up.T)
    w = SampleWriter(tmp_path / "samples", 1, d, f, x_kind="residual", chunk_rows=1000)
    w.append(0, h, mask)
    w.flush()
    return SampleReader(tmp_path / "samples"), ffn


def _fast_cfg(**kw):
    from predictors.train import TrainConfig
    base = dict(ranks=(16,), recall_target=0.95, max_epochs=12, min_steps=40, patience=3, input_kind="ffn_norm",
                progress=False)
    return TrainConfig(**{**base, **kw})


def test_trainer_reaches_recall_on_linear_layer(tmp_path):
    from predictors.train import train_all
    reader, ffn = _synthetic_layer(tmp_path)
    ps, summary = train_all(reader, [ffn], _fast_cfg(), tmp_path / "work")
    res = summary["layers"][0]
    t = res["test"]
    assert 0.1 < t["true_density"] < 0.5
    assert t["recall"] >= 0.95, t
    assert t["density_ratio"] <= 1.5, t
    assert 0 < t["ffn_rel_err"] < 0.3
    assert res["rank"] == 16 and res["threshold"] == ps.layers[0].threshold
    assert [c["recall_target"] for c in t["curve"]][:3] == [0.5, 0.6, 0.7]
    # the saved predictor reproduces the reported test recall on the test split
    from predictors.train import load_layer, make_input_fn, norm_fn
    data = load_layer(reader, 0, make_input_fn("ffn_norm", "residual", norm_fn(ffn, "cpu")), _fast_cfg())
    pred = ps.layers[0].predict_active(data.x["test"])
    assert mask_metrics(pred, data.labels("test"))["recall"] == pytest.approx(t["recall"])
    json.dumps(summary)  # metrics must be JSON-serialisable


def test_trainer_resume_keeps_finished_layers(tmp_path, monkeypatch):
    import predictors.train as tr
    reader, ffn = _synthetic_layer(tmp_path, n=800)
    # a 2-layer store from the same samples
    x, packed = reader.load(0)
    w = SampleWriter(tmp_path / "two", 2, 32, 64, x_kind="residual")
    for layer in range(2):
        w.append(layer, x, unpack_mask(packed, 64))
    w.flush()
    two = SampleReader(tmp_path / "two")
    cfg = _fast_cfg(max_epochs=2, min_steps=5)
    _, first = tr.train_all(two, [ffn, ffn], cfg, tmp_path / "work")
    (tmp_path / "work" / "layer_001.json").unlink()  # "interrupted" before layer 1 was recorded
    calls = []
    real = tr.fit_layer_rank
    monkeypatch.setattr(tr, "fit_layer_rank", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    _, second = tr.train_all(two, [ffn, ffn], cfg, tmp_path / "work", resume=True)
    assert calls == [1]
    assert second["layers"][0] == first["layers"][0]
    with pytest.raises(UserError, match="other training settings"):
        tr.train_all(two, [ffn, ffn], _fast_cfg(max_epochs=2, min_steps=5, recall_target=0.9),
                     tmp_path / "work", resume=True)


def test_input_choice_and_baselines(tmp_path):
    from predictors.baselines import BaselineConfig, run_baselines
    from predictors.train import choose_input_kind, load_layer, make_input_fn, norm_fn, train_predictor
    reader, ffn = _synthetic_layer(tmp_path, n=1500)
    cfg = _fast_cfg(max_epochs=3)
    kind, info = choose_input_kind(reader, [ffn], cfg, [16], 0)
    assert kind in ("ffn_norm", "residual") and set(info["val"]) == {"ffn_norm", "residual"}
    data = load_layer(reader, 0, make_input_fn("ffn_norm", "residual", norm_fn(ffn, "cpu")), cfg)
    p, _ = train_predictor(data, 16, cfg)
    p.threshold = threshold_for_recall(p(data.x["val"]).detach(), data.labels("val"), 0.95)
    rows = {r["method"]: r for r in run_baselines(data, p, BaselineConfig(n_subset=8, mlp_max_iter=5))}
    assert set(rows) == {"torch_mlp", "ridge_lowrank", "torch_mlp@subset", "pca_logreg@subset", "mlp_sklearn"}
    for name in ("ridge_lowrank", "mlp_sklearn"):  # compared at the torch predictor's density
        assert rows[name]["pred_density"] == pytest.approx(rows["torch_mlp"]["pred_density"], abs=2e-3)
        assert 0.0 <= rows[name]["recall"] <= 1.0
    assert rows["pca_logreg@subset"]["pred_density"] == pytest.approx(rows["torch_mlp@subset"]["pred_density"],
                                                                       abs=5e-3)
    # the linear probe of rank 16 on a rank-6 linear problem is a strong baseline: it must find most positives
    assert rows["ridge_lowrank"]["recall"] > 0.8


def test_trainer_bad_input(tmp_path):
    from predictors.train import make_input_fn, split_rows, train_all
    reader, ffn = _synthetic_layer(tmp_path, n=100)
    with pytest.raises(UserError, match="model has 2"):
        train_all(reader, [ffn, ffn], _fast_cfg(), tmp_path / "w")
    other = FeedForward(ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=48, vocab_size=8,
                                    act="relu"))
    with pytest.raises(UserError, match="do not match"):
        train_all(reader, [other], _fast_cfg(), tmp_path / "w")
    with pytest.raises(UserError, match="too few"):
        split_rows(5, _fast_cfg())
    with pytest.raises(UserError, match="needs the model's norm"):
        make_input_fn("ffn_norm", "residual", None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_match_cpu(tmp_path):
    from predictors.train import train_all
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (50, 7), dtype=torch.uint8, generator=g)
    assert torch.equal(unpack_mask(packed.cuda(), 53).cpu(), torch.from_numpy(unpack_mask_np(packed.numpy(), 53)))
    p = _rand_predictor()
    x = torch.randn(16, 12)
    assert torch.equal(p.cuda().predict_active(x.cuda()).cpu(), p.cpu().predict_active(x))
    reader, ffn = _synthetic_layer(tmp_path)
    ps, summary = train_all(reader, [ffn], _fast_cfg(device="cuda"), tmp_path / "work")
    t = summary["layers"][0]["test"]
    assert t["recall"] >= 0.95 and t["density_ratio"] <= 1.5, t
