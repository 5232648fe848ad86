"""GPU sparse FFN kernels (hybrid_runtime/kernels.py, cuda/): references, fallback, build logic, CUDA.

CPU: the torch references (the fallback path) equal a float64 naive FFN over the active set; the
backend loader falls back cleanly and announces once. CUDA (skipped without it): every kernel
equals float64 on fresh random inputs over the LLaMA shapes, active fractions, dtypes and batch
sizes, with outputs poisoned (NaN) before each run and checked fully (and only) written.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from hybrid_runtime import kernels as K
from hybrid_runtime.activations import Activation

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (run on the GPU machine)")

# ‖out − ref‖ / ‖ref‖ bounds. Products of half inputs are exact in fp32, so fp32 outputs carry only
# fp32 accumulation error (~1e-6 at d = 5120); half outputs add one rounding of each element
# (rms 2^-8/√3 ≈ 2.3e-3 for bf16, 2^-11/√3 ≈ 2.8e-4 for fp16): bounds with 3-5x headroom.
TOL = {torch.float32: 5e-5, torch.float16: 1.5e-3, torch.bfloat16: 8e-3}
ACTS = ("silu", "relu", "fatrelu", "relu2", "drelu")


def apply_act(g, u, act, threshold=0.0):
    """a = act(g) * u by the activation table (hybrid_runtime/activations.py)."""
    return Activation(act, threshold)(g, u)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    assert torch.isfinite(out64).all(), "non-finite values in the output (unwritten or NaN)"
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else num


def naive_ffn64(x, gate, up, down, rows, act, threshold):
    """float64, one neuron at a time over `rows`: (a (B, len(rows)), y (B, d))."""
    x64 = x.double()
    a = torch.zeros(x.shape[0], len(rows), dtype=torch.float64)
    y = torch.zeros(x.shape[0], down.shape[1], dtype=torch.float64)
    for j, i in enumerate(rows):
        g = x64 @ gate[i].double()  # (B,)
        u = x64 @ up[i].double()
        a[:, j] = apply_act(g, u, act, threshold)
        y += a[:, j:j + 1] * down[i].double()[None, :]
    return a, y


def index_list(rows: list[int], f: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """idx (f,) int32: `rows`, then the other neurons (valid indices that must be ignored, as
    active_indices leaves them), count (1,) int32."""
    chosen = set(rows)
    rest = [i for i in torch.randperm(f).tolist() if i not in chosen]
    idx = torch.tensor(list(rows) + rest, dtype=torch.int32)
    return idx.to(device), torch.tensor([len(rows)], dtype=torch.int32, device=device)


def scores_with_active_set(B: int, f: int, active: torch.Tensor, threshold: float, dtype, device="cpu",
                           gen=None) -> torch.Tensor:
    """(B, f) scores where exactly the neurons in `active` pass (> threshold) in at least one row;
    some inactive ones sit exactly at the threshold (strict vs inclusive)."""
    s = threshold - 0.25 - torch.rand(B, f, generator=gen) * 4  # all below
    ties = torch.rand(B, f, generator=gen) < 0.02
    s[ties] = threshold
    if len(active):
        row = torch.randint(0, B, (len(active),), generator=gen)
        s[row, active] = threshold + 0.25 + torch.rand(len(active), generator=gen) * 4
    return s.to(dtype).to(device)


# ------------------------------------------------------------------------------ CPU: references

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("inclusive,magnitude", [(False, False), (True, False), (False, True)])
def test_active_indices_ref_matches_loop(dtype, B, inclusive, magnitude):
    gen = torch.Generator().manual_seed(B * 7 + inclusive * 3 + magnitude)
    f, thr = 300, 0.5
    s = torch.randn(B, f, generator=gen).to(dtype)
    s[0, ::17] = thr  # exact ties
    s[-1, 5::23] = -thr
    s64 = s.double().abs() if magnitude else s.double()
    want = [i for i in range(f) if any((s64[b, i] >= thr) if inclusive else (s64[b, i] > thr) for b in range(B))]
    idx, count = K.active_indices_ref(s, thr, inclusive=inclusive, magnitude=magnitude)
    assert count.dtype == torch.int32 and idx.dtype == torch.int32 and idx.shape == (f,)
    assert count.item() == len(want) and idx[:len(want)].tolist() == want
    assert sorted(idx.tolist()) == list(range(f))  # the rest: the other neurons
    # the public function (fallback on CPU) into a larger caller-owned buffer
    idx_buf = torch.full((f + 5,), -1, dtype=torch.int32)
    cnt_buf = torch.full((1,), -1, dtype=torch.int32)
    K.active_indices(s, thr, inclusive=inclusive, magnitude=magnitude, idx_out=idx_buf, count_out=cnt_buf)
    assert cnt_buf.item() == len(want) and idx_buf[:len(want)].tolist() == want


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 3])
def test_refs_match_float64_naive_ffn(act, dtype, B):
    gen = torch.Generator().manual_seed(ACTS.index(act) * 100 + B * 10 + int(dtype.itemsize))
    d, f = 64, 172
    thr = 0.3 if act == "fatrelu" else 0.0
    x = torch.randn(B, d, generator=gen).to(dtype)
    gate = (torch.randn(f, d, generator=gen) / 8).to(dtype)
    up = (torch.randn(f, d, generator=gen) / 8).to(dtype)
    down = (torch.randn(f, d, generator=gen) / 8).to(dtype)
    for n in (0, 1, 9, 86, f):
        rows = sorted(torch.randperm(f, generator=gen)[:n].tolist())
        idx, count = index_list(rows, f)
        a64, y64 = naive_ffn64(x, gate, up, down, rows, act, thr)
        a = K.sparse_gate_up_ref(x, gate, up, idx, count, act, thr)
        assert a.dtype == torch.float32 and a.shape == (B, f)
        if n:
            assert rel_err(a[:, rows], a64) < TOL[torch.float32]
        unselected = torch.ones(f, dtype=torch.bool)
        unselected[rows] = False
        assert (a[:, unselected] == 0).all()
        y = K.sparse_down_ref(a, down, idx, count, out_dtype=torch.float32)
        assert rel_err(y, y64) < TOL[torch.float32]
        y_ffn = K.sparse_ffn_ref(x, gate, up, down, idx, count, act, thr)
        assert y_ffn.dtype == dtype and rel_err(y_ffn, y64) < TOL[dtype]
        g_given = (x.double() @ gate.double().T).to(dtype)  # as cuBLAS would hand it over
        a_given = K.sparse_up_given_gate_ref(x, g_given, up, idx, count, act, thr)
        a64_given = apply_act(g_given.double()[:, rows], x.double() @ up.double()[rows].T, act, thr)
        if n:
            assert rel_err(a_given[:, rows], a64_given) < TOL[torch.float32]
    # exact (dense-gate) path: over the true active set from float64
    a64_all, _ = naive_ffn64(x, gate, up, down, list(range(f)), act, thr)
    true_rows = [i for i in range(f) if (a64_all[:, i] != 0).any()]
    _, y64 = naive_ffn64(x, gate, up, down, true_rows, act, thr)
    assert rel_err(K.dense_gate_sparse_up_ref(x, gate, up, act, thr), a64_all) < TOL[torch.float32]
    assert rel_err(K.dense_gate_sparse_ffn_ref(x, gate, up, down, act, thr), y64) < TOL[dtype]


def test_fallback_public_api_semantics():
    """Public functions on CPU tensors: selected columns written, the others left alone, y always full."""
    gen = torch.Generator().manual_seed(11)
    B, d, f = 2, 64, 172
    x = torch.randn(B, d, generator=gen).to(torch.bfloat16)
    gate, up, down = ((torch.randn(f, d, generator=gen) / 8).to(torch.bfloat16) for _ in range(3))
    rows = sorted(torch.randperm(f, generator=gen)[:20].tolist())
    idx, count = index_list(rows, f)
    a = torch.full((B, f), float("nan"))
    K.sparse_gate_up(x, gate, up, idx, count, "relu", out=a)
    sel = torch.zeros(f, dtype=torch.bool)
    sel[rows] = True
    assert torch.isfinite(a[:, sel]).all() and torch.isnan(a[:, ~sel]).all()
    y = torch.full((B, d), float("nan"), dtype=torch.bfloat16)
    K.sparse_down(a, down, idx, count, out=y)  # NaN in unselected columns must not leak
    assert rel_err(y, K.sparse_down_ref(torch.nan_to_num(a), down, idx, count)) < TOL[torch.bfloat16]
    empty_idx, zero = index_list([], f)
    y0 = K.sparse_down(a, down, empty_idx, zero, out_dtype=torch.float32)
    assert y0.shape == (B, d) and (y0 == 0).all()
    y3 = K.sparse_ffn(x.reshape(1, B, d), gate, up, down, idx, count, "relu")  # (..., d) inputs
    assert y3.shape == (1, B, d) and torch.equal(y3[0], K.sparse_ffn_ref(x, gate, up, down, idx, count, "relu"))
    with pytest.raises(ValueError, match="act"):
        K.sparse_gate_up(x, gate, up, idx, count, "gelu")
    with pytest.raises(ValueError, match="fatrelu"):
        K.sparse_gate_up(x, gate, up, idx, count, "fatrelu", 0.0)


# ------------------------------------------------------------------------------ CPU: build logic

@pytest.fixture
def fresh_backend(monkeypatch):
    monkeypatch.delenv("HYBRID_RUNTIME_KERNELS", raising=False)
    K._reset_backend()
    yield
    K._reset_backend()


def _no_prebuilt():
    raise ImportError("No module named 'hybrid_runtime._sparse_ffn_cuda'")


def _announcements(err: str) -> list[str]:
    return [line for line in err.splitlines() if "torch fallback" in line]


@pytest.mark.parametrize("case", ["no_cuda", "no_nvcc", "jit_fails", "forced"])
def test_loader_falls_back_and_announces_once(case, fresh_backend, monkeypatch, capsys):
    monkeypatch.setattr(K, "_import_prebuilt", _no_prebuilt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: case != "no_cuda")
    monkeypatch.setattr(K, "_find_nvcc", lambda: None if case == "no_nvcc" else "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(K, "_cache_dir", lambda: Path("/tmp/hybrid-test-cache"))

    def failing_build():
        raise RuntimeError("Error building extension 'hybrid_runtime_sparse_ffn_cuda'\nninja: stop")
    monkeypatch.setattr(K, "_jit_build", failing_build)
    if case == "forced":
        monkeypatch.setenv("HYBRID_RUNTIME_KERNELS", "torch")

    status = K.kernel_status()
    assert status.startswith("torch fallback")
    want = {"no_cuda": "no CUDA device", "no_nvcc": "nvcc was not found",
            "jit_fails": "JIT build failed (RuntimeError: Error building extension", "forced": "HYBRID_RUNTIME_KERNELS"}
    assert want[case] in status
    assert case == "forced" or "fix:" in status
    assert K._get_backend() is None and K.kernel_status() == status
    err = capsys.readouterr().err
    assert len(_announcements(err)) == 1, err
    K.kernel_status()
    assert _announcements(capsys.readouterr().err) == []


def test_loader_prefers_prebuilt_then_jit(fresh_backend, monkeypatch, capsys):
    prebuilt, jitted = object(), object()
    monkeypatch.setattr(K, "_import_prebuilt", lambda: prebuilt)
    assert K._get_backend() is prebuilt and "prebuilt" in K.kernel_status()
    K._reset_backend()
    monkeypatch.setattr(K, "_import_prebuilt", _no_prebuilt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(K, "_find_nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(K, "_cache_dir", lambda: Path("/tmp/hybrid-test-cache"))
    monkeypatch.setattr(K, "_jit_build", lambda: jitted)
    assert K._get_backend() is jitted and "JIT-built" in K.kernel_status()
    assert _announcements(capsys.readouterr().err) == []


def test_cpu_tensors_never_resolve_the_backend(fresh_backend, monkeypatch):
    def boom():
        raise AssertionError("CPU inputs must not look for the CUDA extension")
    monkeypatch.setattr(K, "_resolve", boom)
    x = torch.randn(1, 64)
    w = torch.randn(172, 64)
    idx, count = K.active_indices(torch.randn(1, 172), 0.0)
    K.sparse_ffn(x, w, w, w, idx, count, "relu")
    K.dense_gate_sparse_ffn(x, w, w, w, "relu")


def test_jit_build_reports_missing_sources(monkeypatch, tmp_path):
    monkeypatch.setattr(K, "_SOURCE_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="sparse_ffn.cpp"):
        K._jit_build()


def test_setup_ext_skips_cleanly_without_cuda(monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cuda"))
    try:
        setup_ext = importlib.import_module("setup_ext")
    finally:
        sys.path.pop(0)
    monkeypatch.setenv("HYBRID_RUNTIME_NO_CUDA_EXT", "1")
    assert setup_ext.cuda_extensions() == ([], {})
    assert "HYBRID_RUNTIME_NO_CUDA_EXT" in capsys.readouterr().err
    monkeypatch.delenv("HYBRID_RUNTIME_NO_CUDA_EXT")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert setup_ext.cuda_extensions() == ([], {})
    assert "CPU-only" in capsys.readouterr().err
    assert setup_ext.NVCC_FLAGS == K.NVCC_FLAGS and setup_ext.CXX_FLAGS == K.CXX_FLAGS


def test_setup_ext_describes_the_extension_when_cuda_is_there(monkeypatch, tmp_path):
    """With a CUDA torch and a toolkit (faked here), setup.py gets the extension and BuildExtension."""
    import torch.utils.cpp_extension as cpp_extension
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cuda"))
    try:
        setup_ext = importlib.import_module("setup_ext")
    finally:
        sys.path.pop(0)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.delenv("HYBRID_RUNTIME_NO_CUDA_EXT", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    exts, cmdclass = setup_ext.cuda_extensions()
    assert [e.name for e in exts] == ["hybrid_runtime._sparse_ffn_cuda"]
    assert exts[0].sources == ["cuda/sparse_ffn.cpp", "cuda/sparse_ffn_kernels.cu"]
    assert cmdclass["build_ext"] is cpp_extension.BuildExtension
    root = Path(__file__).resolve().parent.parent
    assert all((root / src).is_file() for src in exts[0].sources)


# ------------------------------------------------------------------------------ CUDA

SHAPES = [(64, 172), (4096, 11008), (5120, 13824)]  # (d, f)
FRACTIONS = ["0", "1", "5%", "11%", "50%", "100%"]
_WEIGHTS: dict = {}


def weights(d: int, f: int, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (gate, up, down) per shape and dtype, drawn once per session (inputs stay fresh)."""
    key = (d, f, dtype)
    if key not in _WEIGHTS:
        gen = torch.Generator(device="cuda").manual_seed(d * 31 + f)
        scale = d ** -0.5
        _WEIGHTS[key] = tuple((torch.randn(f, d, device="cuda", generator=gen) * scale).to(dtype)
                              for _ in range(3))
    return _WEIGHTS[key]


def n_active(frac: str, f: int) -> int:
    return {"0": 0, "1": 1, "100%": f}.get(frac) or max(1, round(f * float(frac.rstrip("%")) / 100))


def fill_tail(idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Put the unselected neurons after idx[:len(rows)]: valid indices a kernel must not touch."""
    f = idx.numel()
    rest = torch.ones(f, dtype=torch.bool, device=idx.device)
    rest[rows.to(idx.device).long()] = False
    tail = rest.nonzero().flatten()
    idx[len(rows):] = tail[torch.randperm(len(tail), device=idx.device)].int()
    return idx


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


@pytest.fixture(scope="module")
def cuda_backend():
    if not CUDA:
        pytest.skip("needs CUDA")
    status = K.kernel_status()
    assert status.startswith("CUDA kernels"), f"GPU tests need the CUDA extension, got: {status}"
    return status


@needs_cuda
@pytest.mark.parametrize("d,f", SHAPES)
@pytest.mark.parametrize("frac", FRACTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
def test_cuda_predictor_path(cuda_backend, d, f, frac, dtype, B):
    """active_indices -> sparse_gate_up -> sparse_down (and sparse_ffn) against float64."""
    gate, up, down = weights(d, f, dtype)
    n = n_active(frac, f)
    active = torch.randperm(f)[:n].sort().values
    thr = 0.5
    scores = scores_with_active_set(B, f, active, thr, dtype, "cuda")
    idx = torch.full((f,), -7, dtype=torch.int32, device="cuda")
    count = torch.full((1,), -1, dtype=torch.int32, device="cuda")
    K.active_indices(scores, thr, idx_out=idx, count_out=count)
    assert count.item() == n
    assert torch.equal(idx[:n].cpu(), active.to(torch.int32))
    fill_tail(idx, active)  # a kernel that reads past count would now compute wrong neurons

    x = torch.randn(B, d, device="cuda").to(dtype)
    a = poisoned((B, f), torch.float32)
    K.sparse_gate_up(x, gate, up, idx, count, "relu", out=a)
    sel = torch.zeros(f, dtype=torch.bool, device="cuda")
    sel[active.cuda()] = True
    assert torch.isnan(a[:, ~sel]).all(), "wrote outside the selected neurons"
    x64, rows = x.double(), active.cuda()
    g64 = x64 @ gate[rows].double().T  # (B, n)
    u64 = x64 @ up[rows].double().T
    a64 = apply_act(g64, u64, "relu", 0.0)
    if n:
        assert rel_err(a[:, sel], a64) < TOL[torch.float32]

    y64 = a64 @ down[rows].double()  # (B, d)
    for out_dtype in (dtype, torch.float32):
        y = poisoned((B, d), out_dtype)
        K.sparse_down(a, down, idx, count, out=y)
        if n == 0:
            assert (y == 0).all()
        else:
            assert rel_err(y, y64) < TOL[out_dtype]
    y_ffn = K.sparse_ffn(x, gate, up, down, idx, count, "relu")
    assert torch.equal(y_ffn, K.sparse_ffn(x, gate, up, down, idx, count, "relu")), "not deterministic"
    assert y_ffn.dtype == dtype and (rel_err(y_ffn, y64) < TOL[dtype] if n else (y_ffn == 0).all())


@needs_cuda
@pytest.mark.parametrize("d,f", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("act", ["relu", "fatrelu"])
def test_cuda_dense_gate_path(cuda_backend, d, f, dtype, B, act):
    """dense_gate_sparse_up (all gates, up only where active) -> active_indices(|a|) -> sparse_down."""
    gate, up, down = weights(d, f, dtype)
    x = torch.randn(B, d, device="cuda").to(dtype)
    x64 = x.double()
    g64 = x64 @ gate.double().T  # (B, f)
    u64 = x64 @ up.double().T
    # fatrelu at the 89th percentile: ~11% of neurons fire, as in a ProSparse model
    thr = float(g64.flatten().quantile(0.89)) if act == "fatrelu" else 0.0
    a64 = apply_act(g64, u64, act, thr)
    a = poisoned((B, f), torch.float32)
    K.dense_gate_sparse_up(x, gate, up, act, thr, out=a)
    # fp32 vs float64 may disagree on which side of the threshold a gate lies only when it is
    # within rounding of it; leave those few neurons out of the comparison
    near = ((g64 - thr).abs() < 1e-4 * g64.abs().max()).any(0) if act == "fatrelu" else torch.zeros(f, dtype=torch.bool, device="cuda")
    assert rel_err(a[:, ~near], a64[:, ~near]) < TOL[torch.float32]

    idx, count = K.active_indices(a, 0.0, magnitude=True)
    want = (a != 0).any(0).nonzero().flatten().to(torch.int32)
    n = count.item()
    assert n == len(want) and torch.equal(idx[:n], want)
    y = poisoned((B, d), torch.float32)
    K.sparse_down(a, down, idx, count, out=y)
    assert rel_err(y, a.double() @ down.double()) < TOL[torch.float32]
    if act == "relu":  # continuous at the threshold: the whole path against float64
        y_full = K.dense_gate_sparse_ffn(x, gate, up, down, act, thr)
        assert y_full.dtype == dtype and rel_err(y_full, a64 @ down.double()) < TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("d,f", [(64, 172), (4096, 11008)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_all_activations_and_given_gate(cuda_backend, act, d, f, dtype):
    gate, up, _ = weights(d, f, dtype)
    B = 2
    x = torch.randn(B, d, device="cuda").to(dtype)
    thr = 0.4 if act == "fatrelu" else 0.0
    rows = torch.randperm(f, device="cuda")[:max(1, f // 9)].sort().values
    idx = torch.empty(f, dtype=torch.int32, device="cuda")
    idx[:len(rows)] = rows.int()
    fill_tail(idx, rows)
    count = torch.tensor([len(rows)], dtype=torch.int32, device="cuda")
    x64 = x.double()
    g64 = x64 @ gate[rows].double().T
    u64 = x64 @ up[rows].double().T
    keep = ~((g64 - thr).abs() < 1e-4).any(0) if act == "fatrelu" else torch.ones(len(rows), dtype=torch.bool, device="cuda")
    a = poisoned((B, f), torch.float32)
    K.sparse_gate_up(x, gate, up, idx, count, act, thr, out=a)
    assert rel_err(a[:, rows][:, keep], apply_act(g64, u64, act, thr)[:, keep]) < TOL[torch.float32]
    g = x @ gate.T  # (B, f) in x's dtype, as cuBLAS gives it
    a = poisoned((B, f), torch.float32)
    K.sparse_up_given_gate(x, g, up, idx, count, act, thr, out=a)
    assert rel_err(a[:, rows], apply_act(g[:, rows].double(), u64, act, thr)) < TOL[torch.float32]


@needs_cuda
@pytest.mark.parametrize("B", [2, 4, 8, 13])
def test_cuda_batch_tiles(cuda_backend, B):
    """Every batch tile size (1, 2, 4, 8) and a batch spread over two tiles."""
    d, f, dtype = 4096, 11008, torch.bfloat16
    gate, up, down = weights(d, f, dtype)
    x = torch.randn(B, d, device="cuda").to(dtype)
    active = torch.randperm(f)[:f // 5].sort().values
    scores = scores_with_active_set(B, f, active, 0.0, torch.float32, "cuda")
    idx, count = K.active_indices(scores, 0.0)
    assert count.item() == len(active) and torch.equal(idx[:len(active)].cpu(), active.int())
    fill_tail(idx, active)
    rows = active.cuda()
    a64 = apply_act(x.double() @ gate[rows].double().T, x.double() @ up[rows].double().T, "relu", 0.0)
    y = poisoned((B, d), torch.float32)
    K.sparse_down(K.sparse_gate_up(x, gate, up, idx, count, "relu"), down, idx, count, out=y)
    assert rel_err(y, a64 @ down[rows].double()) < TOL[torch.float32]


@needs_cuda
def test_cuda_scalar_path_unaligned_and_odd_d(cuda_backend):
    """d not a multiple of 8 and x a misaligned view: the one-element-per-load kernels."""
    for d, offset in ((68, 0), (4096, 1)):
        f, dtype, B = 300, torch.float16, 3
        gate, up, down = ((torch.randn(f, d, device="cuda") * d ** -0.5).to(dtype) for _ in range(3))
        buf = torch.randn(B, d + offset, device="cuda").to(dtype)
        x = buf[:, offset:]  # row stride d + offset, start offset by one element
        rows = torch.randperm(f, device="cuda")[:40].sort().values
        idx = rows.int().contiguous()
        count = torch.tensor([len(rows)], dtype=torch.int32, device="cuda")
        a64 = apply_act(x.double() @ gate[rows].double().T, x.double() @ up[rows].double().T, "relu", 0.0)
        y = K.sparse_ffn(x, gate, up, down, idx, count, "relu", out_dtype=torch.float32)
        assert rel_err(y, a64 @ down[rows].double()) < TOL[torch.float32]


@needs_cuda
def test_cuda_graph_capture_and_replay(cuda_backend):
    """The predictor and dense-gate paths capture into a CUDA graph (no host syncs) and replay
    correctly on new inputs copied into the static buffers."""
    d, f, dtype = 4096, 11008, torch.bfloat16
    gate, up, down = weights(d, f, dtype)
    static_x = torch.randn(1, d, device="cuda").to(dtype)
    static_scores = torch.randn(1, f, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the capture
        for _ in range(2):
            idx, count = K.active_indices(static_scores, 1.2)
            K.sparse_ffn(static_x, gate, up, down, idx, count, "relu")
            K.dense_gate_sparse_ffn(static_x, gate, up, down, "relu")
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx, count = K.active_indices(static_scores, 1.2)
        y_pred = K.sparse_ffn(static_x, gate, up, down, idx, count, "relu")
        y_exact = K.dense_gate_sparse_ffn(static_x, gate, up, down, "relu")
    for _ in range(3):
        static_x.copy_(torch.randn(1, d, device="cuda").to(dtype))
        static_scores.copy_(torch.randn(1, f, device="cuda"))
        graph.replay()
        i2, c2 = K.active_indices(static_scores, 1.2)
        assert torch.equal(count, c2) and torch.equal(idx[:c2.item()], i2[:c2.item()])
        assert torch.equal(y_pred, K.sparse_ffn(static_x, gate, up, down, i2, c2, "relu"))
        assert torch.equal(y_exact, K.dense_gate_sparse_ffn(static_x, gate, up, down, "relu"))


@needs_cuda
def test_cuda_input_checks(cuda_backend):
    d, f = 64, 172
    gate, up, down = weights(d, f, torch.float16)
    x = torch.randn(1, d, device="cuda").half()
    idx, count = K.active_indices(torch.randn(1, f, device="cuda"), 0.0)
    with pytest.raises(TypeError, match="gate"):
        K.sparse_gate_up(x, gate.bfloat16(), up, idx, count, "relu")
    with pytest.raises(TypeError, match="x: CUDA sparse FFN kernels take"):
        K.sparse_gate_up(x.float(), gate.float(), up.float(), idx, count, "relu")
    with pytest.raises(TypeError, match="idx"):
        K.sparse_gate_up(x, gate, up, idx.long(), count, "relu")
    with pytest.raises(ValueError, match="idx"):
        K.sparse_gate_up(x, gate, up, idx.cpu(), count, "relu")
    with pytest.raises(ValueError, match="up"):
        K.sparse_gate_up(x, gate, up[:, :32], idx, count, "relu")
    with pytest.raises(ValueError, match="gate"):
        K.sparse_gate_up(x, gate.t(), up, idx, count, "relu")
    with pytest.raises(ValueError, match="down"):
        K.sparse_down(torch.zeros(1, f, device="cuda"), down[:100], idx, count)
    with pytest.raises(ValueError, match="count"):
        K.sparse_down(torch.zeros(1, f, device="cuda"), down, idx, torch.zeros(2, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="capacity"):
        K.active_indices(torch.randn(1, f, device="cuda"), 0.0, idx_out=torch.empty(f - 1, dtype=torch.int32, device="cuda"))


def test_index_list_checked_before_any_backend():
    """Bad idx/count raise in Python on every device (a bad input reaching the CUDA binding once
    crashed the process), here through the CPU reference path."""
    d, f = 16, 40
    gen = torch.Generator().manual_seed(3)
    gate, up, down = (torch.randn(f, d, generator=gen) for _ in range(3))
    x, a = torch.randn(1, d, generator=gen), torch.randn(1, f, generator=gen)
    idx, count = torch.arange(f, dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
    with pytest.raises(TypeError, match="idx: expected int32"):
        K.sparse_gate_up(x, gate, up, idx.long(), count, "relu")
    with pytest.raises(TypeError, match="count: expected int32"):
        K.sparse_up_given_gate(x, x @ gate.T, up, idx, count.long(), "relu")
    with pytest.raises(ValueError, match="idx: expected a contiguous 1-D"):
        K.sparse_down(a, down, idx.view(2, f // 2), count)
    with pytest.raises(ValueError, match="count: expected 1 element"):
        K.sparse_down(a, down, idx, torch.zeros(2, dtype=torch.int32))
    # the good call still matches the reference
    y = K.sparse_down(a, down, idx, count)
    torch.testing.assert_close(y, a[:, :5] @ down[:5])
