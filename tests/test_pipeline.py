"""End to end on the CPU: ReLU checkpoint -> hybrid-convert all -> hybrid-run in every mode."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from convert.cli import main_group as convert_cli
from hybrid_runtime.cli import main_group as run_cli

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 40


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    from hybrid_runtime.tiny import build_tiny_model
    root = tmp_path_factory.mktemp("pipe")
    src = build_tiny_model(root / "src", seed=4, dim=64, n_layers=2, ffn_dim=192, act="relu")
    data = root / "calib.txt"
    data.write_text(TEXT)
    out = root / "hyb"
    r = CliRunner().invoke(convert_cli, ["all", "--model", str(src), "--data", str(data), "--out", str(out),
                                         "--tokens", "4000", "--samples-per-layer", "2000", "--block-len", "64",
                                         "--ranks", "16", "--max-epochs", "8", "--device", "cpu"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return src, out


def test_hybrid_dir_contents(hybrid_dir):
    _, out = hybrid_dir
    meta = json.loads((out / "hybrid.json").read_text())
    assert meta["predictors"] == "predictors.safetensors" and (out / "predictors.safetensors").is_file()
    assert len(meta["layers"]) == 2 and "predictor_recall" in meta["layers"][0]
    assert (out / "tokenizer.json").is_file()
    r = CliRunner().invoke(run_cli, ["info", "--model", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["hybrid.json"]["format"] == "hybrid-runtime-model"


def test_hybrid_dir_loads_back_into_transformers(hybrid_dir):
    """`hybrid-convert prosparse` / `eval` take a hybrid directory: native names map back to HF's, rows permuted,
    the function unchanged."""
    import torch
    from convert.prosparse import load_hf_model
    src, out = hybrid_dir
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = load_hf_model(src).eval()(input_ids=ids).logits
        b = load_hf_model(out).eval()(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def _generate(model, *flags):
    r = CliRunner().invoke(run_cli, ["generate", "--model", str(model), "--prompt", "it was the",
                                     "-n", "24", *flags], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.stdout


def test_modes_on_cpu(hybrid_dir):
    src, out = hybrid_dir
    dense_src = _generate(src)
    assert _generate(out, "--dense") == dense_src
    assert _generate(out, "--exact") == dense_src
    assert _generate(out, "--exact", "--hot-fraction", "0.4") == dense_src
    _generate(out)  # predictor mode (the default for a hybrid dir): approximate, must run
    _generate(out, "--hot-fraction", "0.5", "--cold-format", "int8")


def test_predictor_mode_on_plain_checkpoint_is_an_error(hybrid_dir):
    src, _ = hybrid_dir
    r = CliRunner().invoke(run_cli, ["generate", "--model", str(src), "--prompt", "x", "--exact"])
    assert r.exit_code != 0 and "hybrid model directory" in str(r.exception)
