"""Block-quantized weights (hybrid_runtime/quant.py): the Numba block kernels against the de-quantize-then-
float64 reference, a quantized model's one-call CPU decode against its own torch forward, GGUF files read
with their blocks kept (and mixed types converted), `--weights` and its bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid_runtime.cpu_decode import CpuDecodeStep, _block_matvec, unsupported_reason
from hybrid_runtime.cpu_ffn import BLOCK_FORMATS, _axpy_rows, decode_block_rows
from hybrid_runtime.quant import BlockFeedForward, BlockLinear, from_blocks, quantize_model_, to_blocks

from test_cpu_decode import compare, random_model

FORMATS = list(BLOCK_FORMATS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_block_kernels_equal_the_dequantized_reference(fmt):
    """matrix-vector product, row decode and row axpy over many shapes, fresh random inputs each."""
    code = BLOCK_FORMATS[fmt]
    g = torch.Generator().manual_seed(7)
    for n, d in ((1, 32), (3, 64), (17, 96), (64, 576), (40, 2048)):
        w = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
        blocks = to_blocks(w, fmt)
        ref = from_blocks(blocks, fmt).double().numpy()                               # (n, d)
        b = blocks.numpy()
        x = torch.randn(d, generator=g).numpy()
        out = np.zeros(n, np.float32)
        _block_matvec(b, code, x, out)
        scale = np.abs(ref) @ np.abs(x.astype(np.float64))                              # per-row error scale
        assert np.all(np.abs(out - ref @ x) <= 1e-5 * scale + 1e-30), (fmt, n, d)
        dec = np.zeros((n, d), np.float32)
        decode_block_rows(b, code, dec)
        np.testing.assert_allclose(dec, ref, rtol=1e-6, atol=1e-7 * np.abs(ref).max())
        rows = np.sort(torch.randperm(n, generator=g)[: max(1, n // 2)].numpy()).astype(np.int64)
        a = torch.randn(len(rows), generator=g).numpy()
        y = np.zeros(d, np.float32)
        _axpy_rows(b, np.zeros(0, np.float32), code, rows, a.copy(), y)
        want = a.astype(np.float64) @ ref[rows]
        # Q4_1's w = d q + m: a weight near 0 is the difference of two terms, so the scale is the row's largest
        assert np.all(np.abs(y - want) <= 1e-6 * (np.abs(a) @ np.abs(ref[rows]).max(axis=1))), (fmt, n, d)
    # the test can fail: the same blocks read as another format give other numbers
    other = BLOCK_FORMATS["q4_1" if fmt == "q4_0" else "q4_0"]
    if fmt != "q8_0":
        _block_matvec(b, other, x, out)
        assert not np.allclose(out, ref @ x, rtol=1e-3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_model_decode_equals_its_forward(fmt):
    """quantize_model_: every matrix becomes blocks; the one-call decode (block kernels) equals the torch
    forward over the same blocks de-quantized, step by step; and the blocks are what to_blocks makes."""
    model = random_model(3, dim=64, ffn_dim=96, n_heads=4, n_kv_heads=2)
    wqkv = model.layers[0].attn.wqkv.weight.clone()
    quantize_model_(model, fmt)
    layer = model.layers[0]
    assert isinstance(layer.attn.wqkv, BlockLinear) and isinstance(layer.ffn, BlockFeedForward)
    assert isinstance(model.output, BlockLinear) and model.output.fmt == fmt
    assert torch.equal(layer.attn.wqkv.blocks, to_blocks(wqkv, fmt))
    assert torch.equal(layer.attn.wqkv.dequantized(), from_blocks(layer.attn.wqkv.blocks, fmt))
    assert unsupported_reason(model) is None
    assert compare(model, steps=10) < 1e-4


def test_quantized_bias_and_tied_models_decode(make_hf_model):
    from hybrid_runtime.loading import load_model
    for over in (dict(attention_bias=True), dict(tie=True)):
        _, path = make_hf_model(**over)
        model = load_model(path, dtype=torch.float32)
        quantize_model_(model, "q4_1")
        model.setup_cache(1, 64)
        assert compare(model, steps=8) < 1e-4, over


def test_a_moe_or_hybrid_model_is_refused_in_one_line():
    from hybrid_runtime.errors import UserError
    moe = random_model(0, n_experts=4, experts_per_token=2)
    with pytest.raises(UserError, match="quantized weights"):
        quantize_model_(moe, "q8_0")


def _gguf(make_hf_model, tmp_path, dtype: str, **over):
    from bench.gguf_export import export_gguf
    _, path = make_hf_model(**over)
    return export_gguf(path, tmp_path / f"m-{dtype}.gguf", dtype=dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_gguf_file_keeps_its_blocks(make_hf_model, tmp_path, fmt):
    """load_block_model: the file's blocks byte for byte (q/k rows back in HF order), and logits equal to
    the same file de-quantized into the float engine."""
    pytest.importorskip("gguf")
    from hybrid_runtime.loading import load_block_model, load_model
    from hybrid_runtime.model_dir import open_model_dir
    path = _gguf(make_hf_model, tmp_path, fmt, tie=fmt == "q4_0")
    blocks = load_block_model(open_model_dir(path))
    dense = load_model(path, dtype=torch.float32)
    assert {m.fmt for m in blocks.modules() if isinstance(m, BlockLinear)} == {fmt}
    assert torch.equal(blocks.layers[1].ffn.down.dequantized().t(), dense.layers[1].ffn.down)
    assert torch.equal(blocks.layers[0].attn.wqkv.dequantized(), dense.layers[0].attn.wqkv.weight)
    tokens = torch.randint(0, 262, (1, 9), generator=torch.Generator().manual_seed(0))
    for m in (blocks, dense):
        m.setup_cache(1, 32)
    with torch.inference_mode():
        a = blocks(tokens, torch.arange(9), kv_len=9)
        b = dense(tokens, torch.arange(9), kv_len=9)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert compare(blocks, steps=6) < 1e-4


def test_mixed_types_are_converted_and_said(make_hf_model, tmp_path, capsys):
    """A file mixing q4_0 with f16 matrices: the f16 ones become q8_0 blocks, said on stderr in one line."""
    pytest.importorskip("gguf")
    import gguf

    from hybrid_runtime.loading import load_block_model
    from hybrid_runtime.model_dir import open_model_dir
    src = _gguf(make_hf_model, tmp_path, "q4_0")
    f16 = _gguf(make_hf_model, tmp_path, "f16")
    r_q, r_f = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(f16))
    mixed = tmp_path / "mixed.gguf"
    w = gguf.GGUFWriter(str(mixed), "llama")
    for f in r_q.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    f16_tensors = {t.name: t for t in r_f.tensors}
    for t in r_q.tensors:
        if t.name == "blk.0.attn_output.weight" or t.name == "blk.1.attn_v.weight":
            src_t = f16_tensors[t.name]
            w.add_tensor(t.name, np.asarray(src_t.data), raw_dtype=gguf.GGMLQuantizationType.F16)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape,
                         raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    capsys.readouterr()
    model = load_block_model(open_model_dir(mixed))
    err = capsys.readouterr().err
    assert "converted to q8_0" in err and len(err.strip().splitlines()) == 1
    assert model.layers[0].attn.wo.fmt == "q8_0" and model.layers[1].attn.wo.fmt == "q4_0"
    assert model.layers[1].attn.wqkv.fmt == "q8_0" and model.layers[0].attn.wqkv.fmt == "q4_0"
    model.setup_cache(1, 32)
    assert compare(model, steps=4) < 1e-4
