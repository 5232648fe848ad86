"""GPU sparse FFN kernels (cuda/sparse_ffn*.{cpp,cu}) and their plain-torch references.

The FFN of one layer, neuron-major (f neurons, hidden d; see ARCHITECTURE.md):
    g = x @ gate.T,  u = x @ up.T,  a = act(g) * u,  y = a @ down        gate, up, down: (f, d)
A neuron is active for a token when its activated gate value is non-zero; the kernels touch
only the rows of active (or predicted-active) neurons. What act is, and what "active" means, is
the activation table's (hybrid_runtime/activations.py); the references below call it.

Two decode paths are built from these pieces:
    predictor:   idx, count = active_indices(logits, 0.0)                  # (f,), (1,) on the GPU
                 y = sparse_ffn(x, gate, up, down, idx, count, act, thr)   # gate, up, down sparse
    dense gate:  y = dense_gate_sparse_ffn(x, gate, up, down, act, thr)    # exact; up, down sparse

Conventions that keep a decode step capturable in a CUDA graph (no host syncs anywhere):
- index lists are `idx` int32 (n_max,) plus `count` int32 (1,), both on the device; only
  idx[:count] is meaningful (distinct neurons: a repeated one would be summed twice by
  sparse_down; active_indices never repeats), and `count` is never read on the host;
- activations `a` are float32 (B, f) and *neuron-indexed*: a[b, i] belongs to neuron i. The
  sparse kernels write only the selected columns a[:, idx[:count]] and leave the others as
  they were; the down kernel reads only the selected columns;
- every output has a fixed size, known from the input shapes.

Backends: the prebuilt extension `hybrid_runtime._sparse_ffn_cuda` (setup.py builds it when
CUDA and nvcc are present), else a JIT build of the same sources into a cache directory, else
the torch references below (announced once on stderr with how to fix it). CPU tensors always
take the torch references. `kernel_status()` says which backend is in use and why.
Set HYBRID_RUNTIME_KERNELS=torch to force the references (for comparisons and debugging).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from hybrid_runtime.activations import NAMES as ACTS  # the kernels' act names (sparse_ffn.cpp)
from hybrid_runtime.activations import Activation

# Keep in step with cuda/setup_ext.py (the prebuilt extension's flags).
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]

_SOURCE_DIR = Path(__file__).resolve().parent.parent / "cuda"
_SOURCES = ("sparse_ffn.cpp", "sparse_ffn_kernels.cu")
_JIT_NAME = "hybrid_runtime_sparse_ffn_cuda"

_lock = threading.Lock()
_backend: ModuleType | None = None
_status: str | None = None  # None until resolved
_announced = False


# ---------------------------------------------------------------- backend resolution

def _import_prebuilt() -> ModuleType:
    from hybrid_runtime import _sparse_ffn_cuda  # built by setup.py through cuda/setup_ext.py
    return _sparse_ffn_cuda


def _find_nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME:
        nvcc = Path(CUDA_HOME) / "bin" / "nvcc"
        if nvcc.is_file():
            return str(nvcc)
    return shutil.which("nvcc")


def _cache_dir() -> Path:
    root = os.environ.get("HYBRID_RUNTIME_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hybrid_runtime")
    major, minor = torch.cuda.get_device_capability()
    # torch's own loader rebuilds when sources or flags change; the key keeps builds for
    # different torch/CUDA versions and GPUs apart.
    key = f"torch{torch.__version__}-cu{torch.version.cuda}-sm{major}{minor}"
    key = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
    return Path(root) / "torch_extensions" / key


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import load
    sources = [_SOURCE_DIR / s for s in _SOURCES]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"CUDA sources not found: {', '.join(missing)}")
    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(b"".join(s.read_bytes() for s in sources)).hexdigest()[:10]
    stamp = build_dir / f"{_JIT_NAME}.{digest}.ok"
    if not stamp.exists():  # torch's load() prints nothing when it only re-imports a cached build
        print(f"hybrid_runtime: compiling the CUDA sparse FFN kernels into {build_dir} "
              f"(first use only, about a minute)", file=sys.stderr, flush=True)
    module = load(name=_JIT_NAME, sources=[str(s) for s in sources], build_directory=str(build_dir),
                  extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS, verbose=False)
    stamp.touch()
    return module


def _resolve() -> tuple[ModuleType | None, str]:
    """Find a backend; returns (module or None, one-line status). Never raises."""
    if os.environ.get("HYBRID_RUNTIME_KERNELS", "").strip().lower() == "torch":
        return None, "torch fallback: forced by HYBRID_RUNTIME_KERNELS=torch (unset it to use the CUDA kernels)"
    try:
        return _import_prebuilt(), "CUDA kernels: prebuilt extension hybrid_runtime._sparse_ffn_cuda"
    except (ImportError, OSError) as e:  # absent, or built against another torch
        prebuilt = f"no prebuilt extension ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
    if not torch.cuda.is_available():
        return None, (f"torch fallback: {prebuilt} and no CUDA device is visible to torch {torch.__version__} "
                      f"(built for CUDA {torch.version.cuda or 'none'}); fix: use a CUDA build of torch on a "
                      f"machine with an NVIDIA GPU")
    if _find_nvcc() is None:
        return None, (f"torch fallback: {prebuilt} and nvcc was not found to build it; fix: install the CUDA "
                      f"toolkit (or set CUDA_HOME), then reinstall with `pip install .` or let the first use "
                      f"JIT-build it")
    try:
        module = _jit_build()
    except Exception as e:  # any build failure: report it in one line and keep working
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, (f"torch fallback: {prebuilt} and the JIT build failed ({type(e).__name__}: {first}); "
                      f"fix: check the CUDA toolkit matches torch's CUDA {torch.version.cuda}, or delete "
                      f"{_cache_dir()} and retry")
    return module, f"CUDA kernels: JIT-built extension cached in {_cache_dir()}"


def _get_backend() -> ModuleType | None:
    """The extension module, or None (fallback, announced once on stderr)."""
    global _backend, _status, _announced
    if _status is None:
        with _lock:
            if _status is None:
                _backend, _status = _resolve()
                if _backend is None and not _announced:
                    _announced = True
                    print(f"hybrid_runtime: {_status}. The sparse FFN runs through plain torch: same results, "
                          f"dense cost.", file=sys.stderr, flush=True)
    return _backend


def _reset_backend() -> None:
    """Forget the resolved backend (tests re-run the resolution with a patched loader)."""
    global _backend, _status, _announced
    with _lock:
        _backend, _status, _announced = None, None, False


def cuda_kernels_ready() -> bool:
    """True when the CUDA extension is in use (resolving it, and announcing a fallback, on first call)."""
    return _get_backend() is not None


def kernel_status() -> str:
    """Which sparse FFN backend is in use, and why (for `hybrid-run info`). Resolves the backend
    on first call, which may JIT-build the extension."""
    _get_backend()
    assert _status is not None
    return _status


def _ext_for(*tensors: torch.Tensor) -> ModuleType | None:
    """The CUDA extension when the inputs are on a CUDA device and it is available."""
    if not any(t.is_cuda for t in tensors):
        return None
    return _get_backend()


def _check_act(act: str, threshold: float) -> None:
    if act not in ACTS:
        raise ValueError(f"act: expected one of {', '.join(ACTS)}, got {act!r}")
    if act == "fatrelu" and not threshold > 0:
        raise ValueError(f"threshold: fatrelu needs threshold > 0, got {threshold}")


def _check_2d(t: torch.Tensor, name: str, what: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name}: expected {what}, got shape {tuple(t.shape)}")


def _check_weights(d: int, **weights: torch.Tensor) -> None:
    """(f, d) neuron-major weights of one layer, checked here before the binding sees them (the
    binding checks again; a bad width reaching it was seen to crash the process on the H100)."""
    rows = None
    for name, w in weights.items():
        if w.dim() != 2 or w.shape[1] != d:
            raise ValueError(f"{name}: expected (f, {d}) neuron-major weights, got shape {tuple(w.shape)}")
        if rows is not None and w.shape[0] != rows:
            raise ValueError(f"{name}: {w.shape[0]} rows, the other weights have {rows}")
        rows = w.shape[0]


def _check_index_list(idx: torch.Tensor, count: torch.Tensor, like: torch.Tensor) -> None:
    """The device-side index list: idx (n_max,) int32 contiguous, count (1,) int32, on like's device.
    Checked here too, before the binding (see _check_weights)."""
    for name, t, shape in (("idx", idx, "a contiguous 1-D tensor"), ("count", count, "1 element")):
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: expected int32, got {t.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name}: on {t.device} but the other inputs are on {like.device}")
    if idx.dim() != 1 or not idx.is_contiguous():
        raise ValueError(f"idx: expected a contiguous 1-D tensor, got shape {tuple(idx.shape)}")
    if count.numel() != 1:
        raise ValueError(f"count: expected 1 element, got shape {tuple(count.shape)}")


# ---------------------------------------------------------------- torch references
# Plain torch, fp32 arithmetic, no host syncs (usable inside a CUDA graph). They define what
# the kernels compute; tests compare both against float64.

def selected_mask_ref(idx: torch.Tensor, count: torch.Tensor, f: int) -> torch.Tensor:
    """bool (f,): neurons listed in idx[:count] (out-of-range entries ignored, as the kernels do)."""
    j = torch.arange(idx.numel(), device=idx.device)
    rows = idx.long()
    valid = (j < count.to(idx.device).long().reshape(-1)[:1]) & (rows >= 0) & (rows < f)
    hits = torch.zeros(f, dtype=torch.int32, device=idx.device)
    hits.index_add_(0, torch.where(valid, rows, torch.zeros_like(rows)), valid.int())
    return hits > 0


def active_indices_ref(scores: torch.Tensor, threshold: float = 0.0, *, inclusive: bool = False,
                       magnitude: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Neurons whose score passes in any row, ascending: (idx int32 (f,), count int32 (1,)).
    Passes: s > threshold (>= if inclusive), on |s| if magnitude. idx[count:] holds the others."""
    s = scores.float().reshape(-1, scores.shape[-1])  # (B, f)
    if magnitude:
        s = s.abs()
    passed = (s >= threshold if inclusive else s > threshold).any(dim=0)  # (f,)
    idx = torch.argsort((~passed).to(torch.int8), stable=True).to(torch.int32)  # passing first, ascending
    count = passed.sum(dtype=torch.int32).reshape(1)
    return idx, count


def _write_selected(a_new: torch.Tensor, sel: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.where(sel, a_new, torch.zeros_like(a_new))
    out.copy_(torch.where(sel, a_new, out))
    return out


def sparse_gate_up_ref(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, idx: torch.Tensor,
                       count: torch.Tensor, act: str, threshold: float = 0.0, *,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """a[:, idx[:count]] = act(x gate^T) * (x up^T), fp32 (B, f); other columns: out's, or 0."""
    g = F.linear(x.float(), gate.float())  # (B, f)
    u = F.linear(x.float(), up.float())  # (B, f)
    return _write_selected(Activation(act, threshold)(g, u), selected_mask_ref(idx, count, gate.shape[0]), out)


def sparse_up_given_gate_ref(x: torch.Tensor, g: torch.Tensor, up: torch.Tensor, idx: torch.Tensor,
                             count: torch.Tensor, act: str, threshold: float = 0.0, *,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """As sparse_gate_up_ref with the gate pre-activations g (B, f) given."""
    u = F.linear(x.float(), up.float())  # (B, f)
    return _write_selected(Activation(act, threshold)(g.float(), u),
                           selected_mask_ref(idx, count, up.shape[0]), out)


def dense_gate_sparse_up_ref(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str,
                             threshold: float = 0.0, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """a = act(x gate^T) * (x up^T) for all f neurons, fp32 (B, f)."""
    a = Activation(act, threshold)(F.linear(x.float(), gate.float()), F.linear(x.float(), up.float()))
    if out is None:
        return a
    return out.copy_(a)


def sparse_down_ref(a: torch.Tensor, down: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, *,
                    out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y (B, d) = sum over j < count of a[:, idx[j]] * down[idx[j], :] (fp32 sum)."""
    sel = selected_mask_ref(idx, count, down.shape[0])
    a_sel = torch.where(sel, a.float(), torch.zeros((), device=a.device))  # unselected may hold anything
    y = (a_sel @ down.float()).to(out_dtype or (out.dtype if out is not None else down.dtype))
    if out is None:
        return y
    return out.copy_(y)


def sparse_ffn_ref(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   idx: torch.Tensor, count: torch.Tensor, act: str, threshold: float = 0.0, *,
                   out_dtype: torch.dtype | None = None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # (B, d)
    a = sparse_gate_up_ref(x2, gate, up, idx, count, act, threshold)
    y = sparse_down_ref(a, down, idx, count, out_dtype=out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], down.shape[1])


def dense_gate_sparse_ffn_ref(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                              act: str, threshold: float = 0.0, *,
                              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # (B, d)
    a = dense_gate_sparse_up_ref(x2, gate, up, act, threshold)
    idx, count = active_indices_ref(a, 0.0, magnitude=True)
    y = sparse_down_ref(a, down, idx, count, out_dtype=out_dtype or x.dtype)
    return y.reshape(*x.shape[:-1], down.shape[1])


# ---------------------------------------------------------------- public API (kernel or fallback)

def active_indices(scores: torch.Tensor, threshold: float = 0.0, *, inclusive: bool = False,
                   magnitude: bool = False, idx_out: torch.Tensor | None = None,
                   count_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact the neurons whose score passes in ANY row of scores (B, f) into ascending indices.

    Passes: s > threshold (s >= threshold if inclusive; |s| instead of s if magnitude).
    Returns (idx int32 (n_max,), count int32 (1,)) on scores' device; idx[:count] is valid.
    Predictor logits: threshold = the logit cut. Exact mode on gate pre-activations g: relu,
    relu2, drelu: threshold 0 (drelu's up sign is applied later, a superset is fine); fatrelu:
    threshold t, inclusive=True. Dense activations a: threshold 0, magnitude=True.
    """
    _check_2d(scores, "scores", "(B, f)")
    f = scores.shape[1]
    idx = idx_out if idx_out is not None else torch.empty(f, dtype=torch.int32, device=scores.device)
    count = count_out if count_out is not None else torch.empty(1, dtype=torch.int32, device=scores.device)
    if idx.numel() < f:   # checked here for every backend: an error thrown inside the binding crashed
        raise ValueError(f"idx_out: capacity {idx.numel()} is smaller than f = {f}")   # the H100 process
    ext = _ext_for(scores, idx, count)
    if ext is not None:
        ext.active_indices(scores, float(threshold), bool(inclusive), bool(magnitude), idx, count)
        return idx, count
    ref_idx, ref_count = active_indices_ref(scores, threshold, inclusive=inclusive, magnitude=magnitude)
    idx[:f].copy_(ref_idx)
    count.copy_(ref_count)
    return idx, count


def _activations_out(x: torch.Tensor, f: int, out: torch.Tensor | None) -> torch.Tensor:
    # Uninitialised on purpose: only the selected columns are written and read.
    return out if out is not None else torch.empty(x.shape[0], f, dtype=torch.float32, device=x.device)


def sparse_gate_up(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, idx: torch.Tensor,
                   count: torch.Tensor, act: str, threshold: float = 0.0, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """a[:, idx[:count]] = act(x gate^T) * (x up^T) for x (B, d), gate/up (f, d); fp32 (B, f).

    Only the selected columns are written (others keep out's contents; uninitialised if out is
    None). The up row is read only when the neuron is active for some token in the batch.
    """
    _check_act(act, threshold)
    _check_2d(x, "x", "(B, d)")
    _check_weights(x.shape[1], gate=gate, up=up)
    _check_index_list(idx, count, x)
    a = _activations_out(x, gate.shape[0], out)
    ext = _ext_for(x, gate, up, idx, count, a)
    if ext is not None:
        ext.sparse_gate_up(x, gate, up, idx, count, a, act, float(threshold))
        return a
    return sparse_gate_up_ref(x, gate, up, idx, count, act, threshold, out=a)


def sparse_up_given_gate(x: torch.Tensor, g: torch.Tensor, up: torch.Tensor, idx: torch.Tensor,
                         count: torch.Tensor, act: str, threshold: float = 0.0, *,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """As sparse_gate_up, with the gate pre-activations g (B, f) already computed (e.g. by cuBLAS,
    in x's dtype): a[:, idx[:count]] = act(g) * (x up^T)."""
    _check_act(act, threshold)
    _check_2d(x, "x", "(B, d)")
    _check_2d(g, "g", "(B, f)")
    _check_weights(x.shape[1], up=up)
    _check_index_list(idx, count, x)
    a = _activations_out(x, up.shape[0], out)
    ext = _ext_for(x, g, up, idx, count, a)
    if ext is not None:
        ext.sparse_up_given_gate(x, g, up, idx, count, a, act, float(threshold))
        return a
    return sparse_up_given_gate_ref(x, g, up, idx, count, act, threshold, out=a)


def dense_gate_sparse_up(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str,
                         threshold: float = 0.0, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """a = act(x gate^T) * (x up^T) for all f neurons, fp32 (B, f), every column written (exact 0
    for inactive neurons). Reads every gate row but only the up rows of active neurons: the
    fused ReLU + sparse-up operator of the exact (no predictor) mode."""
    _check_act(act, threshold)
    _check_2d(x, "x", "(B, d)")
    _check_weights(x.shape[1], gate=gate, up=up)
    a = _activations_out(x, gate.shape[0], out)
    ext = _ext_for(x, gate, up, a)
    if ext is not None:
        ext.dense_gate_sparse_up(x, gate, up, a, act, float(threshold))
        return a
    return dense_gate_sparse_up_ref(x, gate, up, act, threshold, out=a)


def sparse_down(a: torch.Tensor, down: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, *,
                out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y (B, d) = sum over j < count of a[:, idx[j]] * down[idx[j], :], fp32 accumulation.

    a: fp32 (B, f) neuron-indexed (only the selected columns are read); down: (f, d) neuron-major.
    y is written in full (zeros when count is 0), in out_dtype (down's dtype or float32).
    """
    _check_2d(a, "a", "(B, f)")
    if down.dim() != 2 or down.shape[0] != a.shape[1]:
        raise ValueError(f"down: expected ({a.shape[1]}, d) neuron-major rows, got shape {tuple(down.shape)}")
    _check_index_list(idx, count, a)
    if out is None:
        dtype = out_dtype or down.dtype
        out = torch.empty(a.shape[0], down.shape[1], dtype=dtype, device=a.device)
    ext = _ext_for(a, down, idx, count, out)
    if ext is not None:
        ext.sparse_down(a, down, idx, count, out)
        return out
    return sparse_down_ref(a, down, idx, count, out=out)


def sparse_ffn(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               idx: torch.Tensor, count: torch.Tensor, act: str, threshold: float = 0.0, *,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = FFN(x) over the neurons idx[:count] only (predictor path): x (..., d) -> y (..., d)."""
    x2 = x.reshape(-1, x.shape[-1])  # (B, d)
    a = sparse_gate_up(x2, gate, up, idx, count, act, threshold)  # (B, f) fp32
    y = sparse_down(a, down, idx, count, out_dtype=out_dtype or x.dtype)  # (B, d)
    return y.reshape(*x.shape[:-1], down.shape[1])


def dense_gate_sparse_ffn(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                          act: str, threshold: float = 0.0, *,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = FFN(x) exactly: dense gate, up and down only for the neurons that fire (exact mode)."""
    x2 = x.reshape(-1, x.shape[-1])  # (B, d)
    a = dense_gate_sparse_up(x2, gate, up, act, threshold)  # (B, f) fp32, fully written
    idx, count = active_indices(a, 0.0, magnitude=True)
    y = sparse_down(a, down, idx, count, out_dtype=out_dtype or x.dtype)  # (B, d)
    return y.reshape(*x.shape[:-1], down.shape[1])
