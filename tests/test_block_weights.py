"""Block-quantized weights (hybrid_runtime/quant.py): the Numba block kernels against the de-quantize-then-
float64 reference, a quantized model's one-call CPU decode against its own torch forward, GGUF files read
with their blocks kept (and mixed types converted), `--weights` and its bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid_runtime.cpu_decode import _block_matvec, unsupported_reason
from numba import njit

from hybrid_runtime.cpu_ffn import BLOCK_FORMATS, _block_axpy_row, decode_block_rows, quantize_x
from hybrid_runtime.quant import BlockFeedForward, BlockLinear, from_blocks, quantize_model_, to_blocks

from test_cpu_decode import compare, random_model

FORMATS = list(BLOCK_FORMATS)


@njit
def _axpy_block_rows(w, fmt, rows, a, out):
    """out += sum_i a[i] * w[rows[i]] with the cold kernels' block row axpy."""
    for i in range(rows.shape[0]):
        _block_axpy_row(a[i], w[rows[i]], fmt, out)


def _workspaces(d: int):
    return np.zeros(d, np.int8), np.zeros(d // 32, np.float32), np.zeros(d // 32, np.float32)


def _int8_activation_forward(self, x):
    """BlockLinear as the decode kernels compute it (the reference of the model-level tests): x rounded to
    int8 per block of 32 (scale max|x| / 127, half away from zero, in fp32 as quantize_x), then float."""
    shape = x.shape
    b = x.float().reshape(-1, self.in_features // 32, 32)
    d = b.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    v = b * inv
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)
    bias = None if self.bias is None else self.bias.double()
    y = torch.nn.functional.linear((q * d).reshape(*shape).double(), self.dequantized().double(), bias)
    return y.to(x.dtype)


@pytest.fixture
def int8_reference(monkeypatch):
    monkeypatch.setattr(BlockLinear, "forward", _int8_activation_forward)


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
        # the decode's matrix-vector product: x as int8 per block (llama.cpp's way), integer block products
        xq, dx, xs = np.zeros(d, np.int8), np.zeros(d // 32, np.float32), np.zeros(d // 32, np.float32)
        quantize_x(x, xq, dx, xs)
        blocks_x = x.reshape(-1, 32).astype(np.float64)
        step = np.abs(blocks_x).max(axis=1, keepdims=True) / 127
        v = np.where(step > 0, blocks_x / np.where(step > 0, step, 1), 0)
        want_q = np.sign(v) * np.floor(np.abs(v) + 0.5)
        assert np.array_equal(xq.reshape(-1, 32), want_q) and np.allclose(dx, step[:, 0], rtol=1e-6)
        np.testing.assert_allclose(xs, dx * want_q.sum(axis=1), rtol=1e-6)
        x_dq = (want_q * dx[:, None]).ravel()                                            # x as the kernel sees it
        out = np.zeros(n, np.float32)
        _block_matvec(b, code, x, out, *_workspaces(d))
        scale = np.abs(ref) @ np.abs(x_dq)                                               # per-row error scale
        assert np.all(np.abs(out - ref @ x_dq) <= 1e-5 * scale + 1e-30), (fmt, n, d)
        assert np.all(np.abs(out - ref @ x) <= 1e-2 * scale), (fmt, n, d)               # int8 x: ~0.4% a weight
        dec = np.zeros((n, d), np.float32)
        decode_block_rows(b, code, dec)
        np.testing.assert_allclose(dec, ref, rtol=1e-6, atol=1e-7 * np.abs(ref).max())
        rows = np.sort(torch.randperm(n, generator=g)[: max(1, n // 2)].numpy()).astype(np.int64)
        a = torch.randn(len(rows), generator=g).numpy()
        y = np.zeros(d, np.float32)
        _axpy_block_rows(b, code, rows, a, y)
        want = a.astype(np.float64) @ ref[rows]
        # Q4_1's w = d q + m: a weight near 0 is the difference of two terms, so the scale is the row's largest
        assert np.all(np.abs(y - want) <= 1e-6 * (np.abs(a) @ np.abs(ref[rows]).max(axis=1))), (fmt, n, d)
    # the test can fail: the same blocks read as another format give other numbers
    other = BLOCK_FORMATS["q4_1" if fmt == "q4_0" else "q4_0"]
    if fmt != "q8_0":
        out = np.zeros(n, np.float32)
        _block_matvec(b, other, x, out, *_workspaces(d))
        assert not np.allclose(out, ref @ x, rtol=1e-3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_model_decode_equals_its_forward(fmt, int8_reference):
    """quantize_model_: every matrix becomes blocks; the one-call decode (block kernels) equals the torch
    forward over the same blocks de-quantized (with x rounded to int8 per block, as the kernels do), step by
    step; and the blocks are what to_blocks makes."""
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


def test_quantized_bias_and_tied_models_decode(make_hf_model, int8_reference):
    from hybrid_runtime.loading import load_model
    for over in (dict(attention_bias=True), dict(tie=True)):
        _, path = make_hf_model(**over)
        model = load_model(path, dtype=torch.float32)
        quantize_model_(model, "q4_1")
        model.setup_cache(1, 64)
        assert compare(model, steps=8) < 1e-4, over


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_quantized_mixture_of_experts_decodes_as_its_forward(fmt, int8_reference):
    """Mixtral's experts as blocks (the router stays float): the one-call decode routes, runs the chosen
    experts' block FFNs and adds them as the forward does."""
    from hybrid_runtime.quant import BlockExpert
    moe = random_model(0, n_experts=4, experts_per_token=2)
    quantize_model_(moe, fmt)
    assert all(isinstance(ex, BlockExpert) for layer in moe.layers for ex in layer.ffn.experts)
    assert moe.layers[0].ffn.router.dtype == torch.float32
    assert unsupported_reason(moe) is None
    assert compare(moe, steps=8) < 1e-4


def test_a_hybrid_ffn_is_refused_in_one_line():
    from hybrid_runtime.errors import UserError
    from test_cpu_decode import to_sparse_cpu
    model = random_model(0, act="relu")
    to_sparse_cpu(model, predictor=False)
    with pytest.raises(UserError, match="need the dense FFN"):
        quantize_model_(model, "q8_0")


def _gguf(make_hf_model, tmp_path, dtype: str, **over):
    from bench.gguf_export import export_gguf
    _, path = make_hf_model(**over)
    return export_gguf(path, tmp_path / f"m-{dtype}.gguf", dtype=dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_gguf_file_keeps_its_blocks(make_hf_model, tmp_path, fmt, monkeypatch):
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
    monkeypatch.setattr(BlockLinear, "forward", _int8_activation_forward)
    assert compare(blocks, steps=6) < 1e-4


def test_mixed_types_are_converted_and_said(make_hf_model, tmp_path, capsys, int8_reference):
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


def _cold_ref(cold, x, active, act):
    """Block cold rows as the kernel computes them, in float64: gate and up against x rounded to int8 per block
    (quantize_x's rule), down rows in full precision."""
    from hybrid_runtime.cpu_ffn import as_activation
    gate, up, down = (w.astype(np.float64) for w in cold.dequantize(np.asarray(active, np.int64)))
    b = x.astype(np.float64).reshape(-1, 32)
    step = np.abs(b).max(axis=1, keepdims=True) / 127
    v = np.where(step > 0, b / np.where(step > 0, step, 1), 0)
    xq = (np.sign(v) * np.floor(np.abs(v) + 0.5) * step).ravel()
    a = as_activation(act).numpy(xq[None] @ gate.T, xq[None] @ up.T)
    return (a @ down)[0]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", ["relu", "relu2"])
def test_block_cold_rows_equal_the_reference(fmt, act):
    """The cold-row decode kernel over block rows (gate, up, down each blocked along d) against float64, on
    random active sets of every size, with fresh inputs; and ColdFFN.batch (one token at a time) equals it."""
    from hybrid_runtime.cpu_ffn import ColdFFN, ColdRows
    g = torch.Generator().manual_seed(11)
    n, d = 300, 128
    w = [torch.randn(n, d, generator=g) / d ** 0.5 for _ in range(3)]
    w[0][:, 0] += 0.5                                  # some gates fire, some not
    cold = ColdRows.from_torch(*w, fmt=fmt)
    assert cold.dim == d and cold.is_blocks and cold.gate.dtype == np.uint8
    ffn = ColdFFN(cold, act)
    for k in (0, 1, 7, 150, n):
        active = np.sort(torch.randperm(n, generator=g)[:k].numpy()).astype(np.int32)
        x = torch.randn(d, generator=g).numpy()
        y = ffn.decode(x, active, np.zeros(d, np.float32))
        want = _cold_ref(cold, x, active, act)
        assert np.abs(y - want).max() <= 1e-4 * max(np.abs(want).max(), 1e-3), (fmt, act, k)
    xs = torch.randn(3, d, generator=g).numpy()
    out = ffn.batch(xs, active, np.zeros((3, d), np.float32))
    for t in range(3):
        np.testing.assert_allclose(out[t], _cold_ref(cold, xs[t], active, act), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("predictor", [False, True])
def test_hybrid_with_block_cold_rows_and_attention_decodes_as_its_forward(predictor, int8_reference):
    """A hybrid model on the CPU with q4_0 cold rows and q8_0 attention / lm_head: the one-call decode (block
    kernels in every matrix) equals the forward step by step."""
    from hybrid_runtime.quant import quantize_attention_and_head_
    from test_cpu_decode import to_sparse_cpu
    model = random_model(5, act="relu", dim=64, ffn_dim=96)
    to_sparse_cpu(model, predictor, fmt="q4_0")
    quantize_attention_and_head_(model, "q8_0")
    assert unsupported_reason(model) is None
    assert compare(model, steps=8) < 1e-4
