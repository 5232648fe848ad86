"""Build logic for the CUDA extension `hybrid_runtime._sparse_ffn_cuda` (called by setup.py).

`cuda_extensions()` returns (ext_modules, cmdclass): one CUDAExtension and torch's BuildExtension
when torch was built with CUDA and nvcc is found, else ([], {}) with a one-line notice on
stderr (the runtime then JIT-builds on first use, or uses its announced torch fallback).
HYBRID_RUNTIME_NO_CUDA_EXT=1 skips the build. Without a visible GPU and with
TORCH_CUDA_ARCH_LIST unset, the build targets sm_80, sm_89 and sm_90 (A100, L40/4090, H100).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# Keep in step with hybrid_runtime/kernels.py (its JIT build uses the same flags).
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]
EXT_NAME = "hybrid_runtime._sparse_ffn_cuda"
SOURCES = ("cuda/sparse_ffn.cpp", "cuda/sparse_ffn_kernels.cu")  # relative to the repository root
DEFAULT_ARCHS = "8.0;8.9;9.0"


def _skip(reason: str) -> tuple[list, dict]:
    print(f"hybrid-runtime setup: not building the CUDA kernels ({reason}); they will be JIT-built "
          f"on first use where CUDA and nvcc exist, else the torch fallback is used", file=sys.stderr)
    return [], {}


def _nvcc(cuda_home: str | None) -> str | None:
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); empty when the extension cannot be built here."""
    if os.environ.get("HYBRID_RUNTIME_NO_CUDA_EXT", "") not in ("", "0"):
        return _skip("HYBRID_RUNTIME_NO_CUDA_EXT is set")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        return _skip(f"torch is not importable at build time: {e}")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None or _nvcc(CUDA_HOME) is None:
        return _skip("torch found no CUDA toolkit with nvcc (install it or set CUDA_HOME)")
    root = Path(__file__).resolve().parent.parent
    missing = [s for s in SOURCES if not (root / s).is_file()]
    if missing:
        return _skip(f"sources missing: {', '.join(missing)}")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS  # else torch builds for every arch it knows
    try:
        ext = CUDAExtension(name=EXT_NAME, sources=list(SOURCES),
                            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})
    except (OSError, RuntimeError) as e:  # a half-installed toolkit: say so, do not fail the install
        return _skip(f"torch cannot set up a CUDA build: {e}")
    return [ext], {"build_ext": BuildExtension}
