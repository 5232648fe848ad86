"""Long jobs stopped by Ctrl-C at several points and resumed give the uninterrupted run's result.

The interruption is a real SIGINT sent to this process from inside the job (the profile's forward, the
predictor trainer); the job checkpoints at its next safe point and stops. `profile --resume` and
`all --resume` then finish it, and every output byte equals an uninterrupted run's. (ProSparse
training's own resume tests are in test_convert_train.py.)
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from test_bad_input import run_cli
from textgen import make_text


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    from hybrid_runtime.tiny import build_tiny_model
    root = tmp_path_factory.mktemp("resume")
    model = build_tiny_model(root / "relu", seed=4, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48,
                             act="relu", max_seq_len=64)
    data = root / "calib.txt"
    data.write_text(make_text(400, seed=5))
    return model, data


def _cfg():
    from convert.profile import ProfileConfig
    return ProfileConfig(tokens=768, block_len=32, batch_size=4, samples_per_layer=200, chunk_rows=32,
                         progress=False)


def _digest(root: Path, skip=()) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def _sigint_on_call(monkeypatch, obj, name: str, calls: set[int]):
    """Send SIGINT to this process at the given (1-based) calls of obj.name (once each)."""
    orig = getattr(obj, name)
    seen = {"n": 0}

    def wrapped(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] in calls:
            os.kill(os.getpid(), signal.SIGINT)
        return orig(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)
    return seen


@pytest.mark.parametrize("stop_at", [(1,), (3,), (2, 5)], ids=["first-batch", "middle", "twice"])
def test_profile_stopped_by_ctrl_c_resumes_to_the_same_result(model_and_data, tmp_path, monkeypatch, stop_at):
    from convert.profile import run_profile
    from hybrid_runtime.model import Transformer
    model, data = model_and_data
    full = run_profile(str(model), [str(data)], str(tmp_path / "full"), _cfg())
    seen = _sigint_on_call(monkeypatch, Transformer, "forward", set(stop_at))
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        run_profile(str(model), [str(data)], str(out), _cfg())
    assert (out / "progress.safetensors").is_file() and not (out / "profile.json").exists()
    while True:        # each stop checkpoints and ends the run; --resume continues it
        try:
            got = run_profile(str(model), [str(data)], str(out), _cfg(), resume=True)
            break
        except KeyboardInterrupt:
            assert seen["n"] < 20
    assert got["layers"] == full["layers"] and got["data"]["tokens"] == full["data"]["tokens"]
    _assert_same_profile(out, tmp_path / "full")


def _assert_same_profile(a: Path, b: Path) -> None:
    """Same counts and frequencies (bytes), and the same samples row for row (a checkpoint may close a
    chunk early, so chunk files can be cut differently)."""
    from predictors.samples import SampleReader
    for name in ("frequencies.safetensors",):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    ra, rb = SampleReader(a / "samples"), SampleReader(b / "samples")
    for layer in range(3):
        xa, ma = ra.load(layer)
        xb, mb = rb.load(layer)
        assert torch.equal(xa, xb) and torch.equal(ma, mb)


def test_a_second_ctrl_c_stops_at_once_and_the_last_checkpoint_still_resumes(model_and_data, tmp_path,
                                                                             monkeypatch):
    from convert.profile import run_profile
    from hybrid_runtime.model import Transformer
    model, data = model_and_data
    run_profile(str(model), [str(data)], str(tmp_path / "full"), _cfg())
    orig = Transformer.forward
    n = {"calls": 0}

    def forward(self, *a, **k):     # at call 3, two Ctrl-C in a row: the second interrupts mid-batch
        n["calls"] += 1
        if n["calls"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return orig(self, *a, **k)

    monkeypatch.setattr(Transformer, "forward", forward)
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        run_profile(str(model), [str(data)], str(out), _cfg())
    monkeypatch.setattr(Transformer, "forward", orig)
    run_profile(str(model), [str(data)], str(out), _cfg(), resume=True)
    _assert_same_profile(out, tmp_path / "full")


def _all(model, data, out, *extra):
    from convert.cli import main_group
    return run_cli(main_group, ["all", "-m", str(model), "--data", str(data), "--out", str(out),
                                "--tokens", "768", "--block-len", "32", "--samples-per-layer", "200",
                                "--ranks", "4", "--max-epochs", "2", "--device", "cpu", "--dtype", "float32",
                                *extra])


def _hybrid_result(out: Path) -> dict:
    """Every file of a hybrid directory: bytes, tensors for safetensors files (their header metadata is
    written in hash-map order, which differs between runs), hybrid.json without the paths it records."""
    from safetensors import safe_open
    res = {}
    for p in sorted(out.iterdir()):
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as fh:
                res[p.name] = (fh.metadata(), {k: hashlib.sha256(fh.get_tensor(k).numpy().tobytes()).hexdigest()
                                               for k in fh.keys()})
        elif p.name == "hybrid.json":
            meta = json.loads(p.read_text())
            for k in ("source_model", "calibration"):
                meta.pop(k)
            res[p.name] = meta
        else:
            res[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return res


@pytest.mark.parametrize("where", ["profile", "predictors", "both"])
def test_all_stopped_anywhere_resumes_with_resume_to_the_same_model(model_and_data, tmp_path, monkeypatch, where):
    import predictors.train as ptrain
    from hybrid_runtime.model import Transformer
    model, data = model_and_data
    torch.manual_seed(0)
    code, _, err = _all(model, data, tmp_path / "full")
    assert code == 0, err
    out = tmp_path / "hyb"
    if where in ("profile", "both"):
        _sigint_on_call(monkeypatch, Transformer, "forward", {2})
    if where in ("predictors", "both"):
        _sigint_on_call(monkeypatch, ptrain, "fit_layer_rank", {2})
    stops = 0
    code, _, err = _all(model, data, out)
    while code == 130:                      # interrupted: said so, and --resume goes on
        stops += 1
        assert "interrupted" in err and not (out / "hybrid.json").exists()
        code, _, err = _all(model, data, out, "--resume")
    assert code == 0, err
    assert stops == (2 if where == "both" else 1)
    assert _hybrid_result(out) == _hybrid_result(tmp_path / "full")
    # a plain rerun over the finished work directory neither resumes silently nor deletes it
    code, _, err = _all(model, data, tmp_path / "other-out", "--work-dir", str(out.with_name("hyb.work")))
    assert code == 2 and "--resume" in err


@pytest.mark.parametrize("where", ["profile", "predictors"])
def test_the_benchmarks_model_build_stopped_anywhere_resumes(tmp_path, monkeypatch, where):
    """The synthetic benchmark model's build (bench/synthetic.py): stopped in its profile or its predictor
    training, the next call goes on after the last finished phase and gives the uninterrupted build's result."""
    import predictors.train as ptrain
    from bench.synthetic import prepare_bench_model, shape_configs
    from hybrid_runtime.model import Transformer
    syn, pipe = shape_configs("tiny", seed=0)
    full = prepare_bench_model(syn, pipe, tmp_path / "full", "cpu", progress=False)
    if where == "profile":
        _sigint_on_call(monkeypatch, Transformer, "forward", {2})
    else:
        orig = ptrain.fit_layer_rank
        n = {"calls": 0}

        def stop_at_second_layer(*a, **k):
            n["calls"] += 1
            if n["calls"] == 2:
                raise KeyboardInterrupt
            return orig(*a, **k)
        monkeypatch.setattr(ptrain, "fit_layer_rank", stop_at_second_layer)
    with pytest.raises(KeyboardInterrupt):
        prepare_bench_model(syn, pipe, tmp_path / "stopped", "cpu", progress=False)
    monkeypatch.undo()
    again = prepare_bench_model(syn, pipe, tmp_path / "stopped", "cpu", progress=False)
    assert "write-checkpoint" in again.manifest["phases"] and again.manifest["complete"]
    for key in ("profile", "predictors"):
        strip = lambda d: {k: v for k, v in d.items() if k != "seconds"}   # noqa: E731 (timings differ)
        assert strip(again.manifest[key]) == strip(full.manifest[key])
    assert _hybrid_result(again.hybrid_dir) == _hybrid_result(full.hybrid_dir)
