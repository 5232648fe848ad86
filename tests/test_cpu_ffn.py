"""Cold-neuron CPU FFN: Numba kernels vs the numpy reference, storage formats, conversions."""
from __future__ import annotations

import threading

import numba
from numba import njit
import numpy as np
import pytest
import torch

from hybrid_runtime.cpu_ffn import (FMT_BF16, FMT_FP16, ColdFFN, ColdRows, cold_ffn, cold_ffn_batch,
                                    cold_ffn_batch_ref, cold_ffn_ref, decode_rows, quantize_rows_int8)
from hybrid_runtime import cpu_ffn
from hybrid_runtime.activations import Activation
from hybrid_runtime.errors import UserError

FORMATS = ["bf16", "fp16", "int8"]
# the last: SiLU with a magnitude cut (|a| <= 0.3 counts as zero), the kernels' mode for CETT-sparse models
ACTS = [("relu", 0.0), ("fatrelu", 0.05), ("relu2", 0.0), ("drelu", 0.0), (Activation("silu", eps=0.3), 0.0)]
THREADS = [1, 2] if numba.config.NUMBA_NUM_THREADS >= 2 else [1]
N_COLD, DIM = 203, 100   # neither a multiple of 4 (row groups) nor of the SIMD width


@pytest.fixture(params=THREADS, ids=lambda n: f"threads{n}")
def n_threads(request):
    before = numba.get_num_threads()
    numba.set_num_threads(request.param)
    yield request.param
    numba.set_num_threads(before)


def random_weights(seed: int, n: int = N_COLD, d: int = DIM) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=gen) / d ** 0.5 for _ in range(3)]


def active_sets(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "empty": np.zeros(0, np.int32),
        "one": np.array([rng.integers(n)], np.int32),
        "all": np.arange(n, dtype=np.int32),
        "random": np.sort(rng.choice(n, size=int(rng.integers(2, n)), replace=False)).astype(np.int32),
        "unsorted": rng.permutation(n)[:37].astype(np.int32),
    }


def assert_close(got: np.ndarray, ref: np.ndarray, rtol: float = 2e-5) -> None:
    scale = max(float(np.abs(ref).max()), 1e-3)
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= rtol * scale, f"max abs err {err:.3g} vs scale {scale:.3g}"


# ----------------------------------------------------------------------------- conversions

@njit
def _convert_bits(bits, out):
    for i in range(bits.shape[0]):
        out[i] = cpu_ffn._fp16_to_f32_bits(bits[i])


@njit
def _convert_f16c(bits, out):
    for i in range(bits.shape[0]):
        out[i] = cpu_ffn._fp16_to_f32_f16c(bits[i])


def _check_fp16_widening(got: np.ndarray, bits: np.ndarray, payload_exact: bool) -> None:
    want = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert nan.sum() == 2 * 1023
    np.testing.assert_array_equal(got[~nan], want.view(np.uint32)[~nan])   # zeros, subnormals, normals, inf
    h = bits[nan].astype(np.uint32)
    exact = ((h & 0x8000) << 16) | 0x7F800000 | ((h & 0x3FF) << 13)     # sign and payload kept
    if payload_exact:
        np.testing.assert_array_equal(got[nan], exact)
    else:                                                               # hardware: signalling nans come back quiet
        np.testing.assert_array_equal(got[nan], exact | 0x00400000)


def test_fp16_conversion_exact_on_all_bit_patterns():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = decode_rows(bits[None], FMT_FP16, np.zeros(0, np.float32))[0].view(np.uint32)   # the kernels' path
    _check_fp16_widening(got, bits, payload_exact=not cpu_ffn.HAS_F16C)
    out = np.empty(65536, np.float32)
    _convert_bits(bits, out)                                            # the path for CPUs without F16C
    _check_fp16_widening(out.view(np.uint32), bits, payload_exact=True)


@pytest.mark.skipif(not cpu_ffn.HAS_F16C, reason="this CPU has no F16C")
def test_fp16_hardware_conversion_exact_on_all_bit_patterns():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.empty(65536, np.float32)
    _convert_f16c(bits, out)
    _check_fp16_widening(out.view(np.uint32), bits, payload_exact=False)


def test_bf16_conversion_exact_on_all_bit_patterns():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = decode_rows(bits[None], FMT_BF16, np.zeros(0, np.float32))[0].view(np.uint32)
    np.testing.assert_array_equal(got, bits.astype(np.uint32) << 16)
    torch_bits = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy().view(np.uint32)
    finite = np.isfinite(torch_bits.view(np.float32))
    np.testing.assert_array_equal(got[finite], torch_bits[finite])


def test_int8_quantizer():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(50, 33, generator=gen) * torch.logspace(-3, 1, 50)[:, None]
    w[7] = 0.0
    q, scale = quantize_rows_int8(w.to(torch.bfloat16))
    wb = w.to(torch.bfloat16).float().numpy()
    assert q.dtype == np.int8 and scale.dtype == np.float32 and q.shape == (50, 33) and scale.shape == (50,)
    assert np.abs(q.astype(np.int32)).max() <= 127
    assert scale[7] == 0 and not q[7].any()
    rows = np.arange(50) != 7
    np.testing.assert_array_equal(np.abs(q[rows].astype(np.int32)).max(axis=1), 127)   # row max -> +-127
    err = np.abs(q * scale[:, None] - wb)
    assert (err <= 0.5 * scale[:, None] * (1 + 1e-5) + 1e-12).all()                    # round to nearest


def test_from_torch_formats_and_copies():
    w = random_weights(2, 20, 16)
    assert ColdRows.from_torch(*[t.half() for t in w]).fmt == "fp16"
    assert ColdRows.from_torch(*[t.bfloat16() for t in w]).fmt == "bf16"
    assert ColdRows.from_torch(*w).fmt == "bf16"
    src = [t.bfloat16() for t in w]
    cold = ColdRows.from_torch(*src, fmt="bf16")
    assert cold.gate.dtype == np.uint16 and cold.gate_scale.shape == (0,)
    src[0].zero_()                                  # a copy, not a view of the caller's tensor
    assert cold.gate.any()
    g, u, dn = cold.dequantize()
    np.testing.assert_array_equal(u, w[1].bfloat16().float().numpy())
    i8 = ColdRows.from_torch(*w, fmt="int8")
    assert i8.gate.dtype == np.int8 and i8.down_scale.shape == (20,)
    assert i8.nbytes == 3 * 20 * (16 + 4)


def test_from_torch_bad_input():
    w = random_weights(3, 8, 16)
    with pytest.raises(UserError, match="fp16 range"):
        ColdRows.from_torch(w[0] * 1e6, w[1], w[2], fmt="fp16")
    with pytest.raises(UserError, match="unknown"):
        ColdRows.from_torch(*w, fmt="fp8")
    with pytest.raises(UserError, match="shapes"):
        ColdRows.from_torch(w[0], w[1][:4], w[2])
    bad = w[0].clone()
    bad[2, 3] = float("nan")
    with pytest.raises(UserError, match="inf/nan"):
        ColdRows.from_torch(bad, w[1], w[2], fmt="int8")


# ----------------------------------------------------------------------------- kernels vs reference

@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_kernel_matches_reference(fmt, n_threads):
    rng = np.random.default_rng(10 + n_threads)
    for act, threshold in ACTS:
        cold = ColdRows.from_torch(*random_weights(int(rng.integers(1 << 30))), fmt=fmt)
        ffn = ColdFFN(cold, act, threshold)
        for name, active in active_sets(rng, N_COLD).items():
            x = rng.standard_normal(DIM).astype(np.float32)
            ref = cold_ffn_ref(cold, x, active, act, threshold)
            got = ffn.decode(x, active, np.full(DIM, np.nan, np.float32))
            if name == "empty":
                np.testing.assert_array_equal(got, 0.0)
            assert_close(got, ref)
            assert_close(cold_ffn(cold, x, active, act, threshold), ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_kernel_every_group_tail(fmt, n_threads):
    """Each thread's rows go four at a time, then one by one: every list length from 0 to 40 (per
    thread: every tail length), fresh weights, x and rows each length."""
    rng = np.random.default_rng(30 + n_threads)
    cold = ColdRows.from_torch(*random_weights(int(rng.integers(1 << 30))), fmt=fmt)
    ffn = ColdFFN(cold, "relu")
    for n_active in range(41):
        active = np.sort(rng.choice(N_COLD, n_active, replace=False)).astype(np.int32)
        x = rng.standard_normal(DIM).astype(np.float32)
        got = ffn.decode(x, active, np.full(DIM, np.nan, np.float32))
        assert_close(got, cold_ffn_ref(cold, x, active, "relu"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_kernel_matches_reference(fmt, n_threads):
    rng = np.random.default_rng(20 + n_threads)
    for act, threshold in ACTS:
        cold = ColdRows.from_torch(*random_weights(int(rng.integers(1 << 30))), fmt=fmt)
        ffn = ColdFFN(cold, act, threshold)
        for T in (1, 3, 17):
            for name, active in active_sets(rng, N_COLD).items():
                x = rng.standard_normal((T, DIM)).astype(np.float32)
                ref = cold_ffn_batch_ref(cold, x, active, act, threshold)
                got = ffn.batch(x, active, np.full((T, DIM), np.nan, np.float32))
                if name == "empty":
                    np.testing.assert_array_equal(got, 0.0)
                assert_close(got, ref)
                if T == 1:   # the batch variant of one token is the decode variant
                    assert_close(ffn.decode(x[0], active, np.empty(DIM, np.float32)), ref[0])


def test_batch_tokens_fire_independently():
    """Each token gets only its own firing neurons, even though the row set is the union."""
    rng = np.random.default_rng(5)
    cold = ColdRows.from_torch(*random_weights(5), fmt="bf16")
    active = np.arange(N_COLD, dtype=np.int32)
    x = rng.standard_normal((4, DIM)).astype(np.float32)
    y = cold_ffn_batch(cold, x, active, "relu")
    for t in range(4):
        assert_close(y[t], cold_ffn_ref(cold, x[t], active, "relu").astype(np.float64))


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_firing_rows_are_not_read(fmt):
    """Poison the up rows of neurons whose gate does not fire and the down rows of neurons whose
    activation is zero: a kernel that read them (even multiplying by 0) would return nan."""
    rng = np.random.default_rng(6)
    cold = ColdRows.from_torch(*random_weights(6), fmt=fmt)
    x = rng.standard_normal((3, DIM)).astype(np.float32)
    active = np.sort(rng.choice(N_COLD, 120, replace=False)).astype(np.int32)
    g, u, _ = cold.dequantize()
    refs = [cold_ffn_batch_ref(cold, x[:1], active, "drelu"), cold_ffn_batch_ref(cold, x, active, "drelu")]
    gate_off = ((x @ g.T) <= 0).all(axis=0)                       # (n,) for no token
    a_off = ~(((x @ g.T) > 0) & ((x @ u.T) > 0)).any(axis=0)
    gate_off1, a_off1 = (x[0] @ g.T) <= 0, ~(((x[0] @ g.T) > 0) & ((x[0] @ u.T) > 0))
    assert gate_off.any() and (a_off & ~gate_off).any()

    def poisoned(up_rows, down_rows):
        c = ColdRows(**{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vars(cold).items()})
        if fmt == "int8":
            c.up_scale[up_rows] = np.nan
            c.down_scale[down_rows] = np.nan
        else:
            nan_bits = 0x7FC0 if fmt == "bf16" else 0x7E00
            c.up[up_rows] = nan_bits
            c.down[down_rows] = nan_bits
        return c

    one = ColdFFN(poisoned(gate_off1, a_off1), "drelu").decode(x[0], active, np.empty(DIM, np.float32))
    assert_close(one, refs[0][0])
    many = ColdFFN(poisoned(gate_off, a_off), "drelu").batch(x, active, np.empty((3, DIM), np.float32))
    assert_close(many, refs[1])


@pytest.mark.parametrize("fmt,bound", [("bf16", 0.01), ("fp16", 0.002), ("int8", 0.03)])
def test_storage_error_vs_fp32_weights(fmt, bound):
    """The cost of storing cold rows in 16/8 bits, against the fp32 weights (relative L2 error)."""
    rng = np.random.default_rng(7)
    w = random_weights(7, 256, 512)
    active = np.arange(256, dtype=np.int32)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    gate, up, down = (t.double().numpy() for t in w)
    want = np.maximum(x @ gate.T, 0) * (x @ up.T) @ down                        # fp64, fp32 weights
    got = cold_ffn_batch(ColdRows.from_torch(*w, fmt=fmt), x, active, "relu")
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < bound, f"{fmt}: relative error {rel:.4f} vs fp32 weights"


def test_kernel_in_a_python_thread_matches():
    """The runtime calls the kernel from a worker thread (GIL released); same result there."""
    rng = np.random.default_rng(8)
    cold = ColdRows.from_torch(*random_weights(8), fmt="fp16")
    ffn = ColdFFN(cold, "relu")
    x = rng.standard_normal(DIM).astype(np.float32)
    active = np.arange(0, N_COLD, 3, dtype=np.int32)
    out = np.empty(DIM, np.float32)
    worker = threading.Thread(target=lambda: (numba.set_num_threads(1), ffn.decode(x, active, out)))
    worker.start()
    worker.join()
    assert_close(out, cold_ffn_ref(cold, x, active, "relu"))


def test_checked_entry_rejects_bad_input():
    cold = ColdRows.from_torch(*random_weights(9, 10, 8))
    x = np.zeros(8, np.float32)
    with pytest.raises(UserError, match="int32"):
        cold_ffn(cold, x, np.array([1, 2]), "relu")                # int64 indices
    with pytest.raises(UserError, match=r"\[0, 10\)"):
        cold_ffn(cold, x, np.array([3, 10], np.int32), "relu")
    with pytest.raises(UserError, match="x:"):
        cold_ffn(cold, np.zeros(9, np.float32), np.array([1], np.int32), "relu")
    with pytest.raises(UserError, match="x:"):
        cold_ffn(cold, np.zeros(8), np.array([1], np.int32), "relu")   # float64
    with pytest.raises(UserError, match="silu"):
        cold_ffn(cold, x, np.array([1], np.int32), "silu")
    with pytest.raises(UserError, match="x:"):
        cold_ffn_batch(cold, x, np.array([1], np.int32), "relu")      # 1-D x to the batch entry
    with pytest.raises(UserError, match="gate: expected"):
        ColdRows("bf16", cold.gate.view(np.int16), cold.up, cold.down,
                 cold.gate_scale, cold.up_scale, cold.down_scale)
