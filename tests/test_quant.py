"""Q8_0 / Q4_0 block quantization (hybrid_runtime/quant.py) against the `gguf` package's port of
ggml-quants.c: the same codes and scales byte for byte, and the same dequantized values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hybrid_runtime.errors import UserError
from hybrid_runtime.quant import (dequantize_q4_0, dequantize_q4_1, dequantize_q8_0, fake_quantize, quantize_q4_0,
                                  quantize_q4_1, quantize_q8_0)

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402


def rows(seed: int) -> torch.Tensor:
    """Random rows plus the cases rounding gets wrong: a zero block, ties at .5, a lone extreme
    negative or positive value, values that land exactly on the clip edge, denormal-sized blocks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 128, generator=g) * torch.logspace(-3, 1, 6)[:, None]
    w[0, :32] = 0.0
    w[1, :32] = torch.arange(32) * 0.5 - 8.0            # ties
    w[2, 32:64] = 0.01
    w[2, 40] = -3.0                                      # one negative extreme
    w[3, 64:96] = -0.01
    w[3, 70] = 2.5                                       # one positive extreme
    w[4, 96:] = torch.linspace(-7.0, 8.0, 32)            # the Q4_0 clip edge
    w[5, :32] = 1e-30
    return w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q8_0_equals_gguf(seed):
    w = rows(seed)
    codes, scales = quantize_q8_0(w)
    ref = quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(6, 4, 34)   # (n, blocks, 2 + 32)
    assert np.array_equal(scales.numpy().view(np.uint8).reshape(6, 4, 2), ref[..., :2])
    assert np.array_equal(codes.numpy().view(np.uint8).reshape(6, 4, 32), ref[..., 2:])
    want = quants.dequantize(ref.reshape(6, -1), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(dequantize_q8_0(codes, scales).numpy(), want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_0_equals_gguf(seed):
    w = rows(seed)
    codes, scales = quantize_q4_0(w)
    assert codes.shape == (6, 64) and scales.shape == (6, 4) and codes.dtype == torch.uint8
    ref = quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0).reshape(6, 4, 18)   # (n, blocks, 2 + 16)
    assert np.array_equal(scales.numpy().view(np.uint8).reshape(6, 4, 2), ref[..., :2])
    assert np.array_equal(codes.numpy().reshape(6, 4, 16), ref[..., 2:])
    want = quants.dequantize(ref.reshape(6, -1), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(dequantize_q4_0(codes, scales).numpy(), want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_1_equals_gguf(seed):
    w = rows(seed)
    codes, scales, mins = quantize_q4_1(w)
    ref = quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_1).reshape(6, 4, 20)   # (n, blocks, 2 + 2 + 16)
    assert np.array_equal(scales.numpy().view(np.uint8).reshape(6, 4, 2), ref[..., :2])
    assert np.array_equal(mins.numpy().view(np.uint8).reshape(6, 4, 2), ref[..., 2:4])
    assert np.array_equal(codes.numpy().reshape(6, 4, 16), ref[..., 4:])
    want = quants.dequantize(ref.reshape(6, -1), gguf.GGMLQuantizationType.Q4_1)
    assert np.array_equal(dequantize_q4_1(codes, scales, mins).numpy(), want)


def test_error_bounds_and_bad_shapes():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    amax = w.reshape(64, 8, 32).abs().amax(-1, keepdim=True)
    for fmt, bound in (("q8_0", 0.5 / 127 + 1e-3), ("q4_0", 1.0 / 8 + 1e-3), ("q4_1", 1.0 / 15 + 1e-3)):
        err = (fake_quantize(w, fmt) - w).reshape(64, 8, 32).abs() / amax   # half a step (+ fp16 rounding)
        assert err.max() <= bound, (fmt, float(err.max()))
    assert fake_quantize(w.bfloat16(), "q4_0").dtype == torch.bfloat16
    with pytest.raises(UserError, match="multiple of 32"):
        quantize_q4_0(torch.zeros(2, 48))
    with pytest.raises(UserError, match="unknown weight format"):
        fake_quantize(w, "q3_k")


def test_quality_script_on_a_tiny_model(make_hf_model, tmp_path):
    """bench/quant_quality.py end to end: every setting quantizes the matrices it names, restores them after,
    and int4 costs more than int8 on a random model."""
    import json

    from bench.quant_quality import run_quality
    _, path = make_hf_model(dtype=torch.float32, hidden_act="silu", tie=True)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 97} and more text" for i in range(4000)))
    run_quality(str(path), [str(text)], eval_tokens=512, block_len=64, out=str(tmp_path / "out"), decode_tokens=126)
    res = json.loads(next((tmp_path / "out").glob("*-quant-quality.json")).read_text())
    pts = {(p["format"], p["scope"]): p for p in res["points"] if p["down_blocks"] == "neuron"}
    both = {(p["format"], p["scope"], p["down_blocks"]) for p in res["points"]}
    assert len(both) == len(res["points"]) == 2 * 3 * 2                  # formats x scopes x down-block axes
    # per layer: gate, up, down; the fused q/k/v matrix and wo
    assert pts[("q4_0", "ffn")]["matrices"] == 2 * 3 and pts[("q4_0", "blocks")]["matrices"] == 2 * 3 + 2 * 2
    assert pts[("q4_0", "all")]["matrices"] == 2 * 3 + 2 * 2 + 1          # + the tied embedding / lm_head
    assert all(p["perplexity"] > 0 for p in pts.values())
    assert abs(pts[("q8_0", "all")]["vs_float32"]) < abs(pts[("q4_0", "all")]["vs_float32"])
    # the decode path: the one-call decode over 2 blocks of 63 predicted tokens, fp32 and each block format
    dec = res["decode"]
    assert dec["tokens"] == 126 and [p["format"] for p in dec["points"]] == ["q8_0", "q4_0"]
    assert abs(math.log(dec["float32"]) - math.log(res["reference"]["perplexity"])) < 0.5   # other tokens, same model
    dq = {p["format"]: p["vs_float32"] for p in dec["points"]}
    assert abs(dq["q8_0"]) < abs(dq["q4_0"])


def test_quality_script_bad_input_is_one_line_and_overwrites_nothing(make_hf_model, tmp_path, monkeypatch, capsys):
    import sys

    from bench.quant_quality import main
    _, path = make_hf_model(dtype=torch.float32, hidden_act="silu")
    text = tmp_path / "t.txt"
    text.write_text("some held-out text " * 200)
    out = tmp_path / "out"
    out.mkdir()
    kept = out / f"cpu-{__import__('time').strftime('%Y-%m-%d')}-quant-quality.json"
    kept.write_text("earlier results")
    capsys.readouterr()                                   # the fixture's own progress output
    base = ["quant_quality", "--model", str(path), "--data", str(text), "--out", str(out)]
    for extra, words in ((["--formats", "q3_k"], "--formats: 'q3_k' is not one of q8_0, q4_0, q4_1"),
                         (["--scopes", "attn"], "--scopes: 'attn' is not one of ffn, blocks, all"),
                         (["--down-blocks", "rows"], "--down-blocks: 'rows' is not one of"),
                         (["--eval-tokens", "0"], "--eval-tokens"),
                         ([], "exists; use --force to replace it")):
        monkeypatch.setattr(sys, "argv", base + extra)
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err
    monkeypatch.setattr(sys, "argv", ["quant_quality", "--model", str(path), "--data", str(tmp_path / "nope.txt"),
                                      "--out", str(tmp_path / "o2")])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "nope.txt: cannot read" in err[-1], err
    assert kept.read_text() == "earlier results"
