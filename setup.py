"""Install: `pip install -e .` (console scripts `hybrid-run` and `hybrid-convert`).

The CUDA extension (cuda/) is built here only when torch with CUDA and nvcc are available at
build time; otherwise it is JIT-built on first use, or the announced torch fallback is used.
"""
import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda"))


def _cuda_extensions():
    try:
        from setup_ext import cuda_extensions
    except ImportError:
        return [], {}
    return cuda_extensions()


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="hybrid-runtime",
    version="0.1.0",
    description="Hybrid CPU-GPU inference runtime for activation-sparse LLaMA-family LLMs",
    python_requires=">=3.10",
    packages=find_packages(include=["hybrid_runtime*", "predictors*", "convert*", "bench*"]),
    install_requires=[
        # A torch already installed (CPU or CUDA build, >= 2.5) satisfies this; pip does not replace it.
        "torch>=2.5",
        "numpy>=1.24",
        "numba>=0.59",
        "safetensors>=0.4",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "scikit-learn>=1.3",
        "click>=8.1",
        "tqdm>=4.60",
    ],
    extras_require={"test": ["pytest>=7", "gguf>=0.19", "accelerate>=0.26", "openai>=1.0"], "bench": ["matplotlib", "accelerate", "gguf>=0.19"]},
    entry_points={"console_scripts": ["hybrid-run=hybrid_runtime.cli:main",
                                      "hybrid-convert=convert.cli:main"],
                  # `hybrid-run bench`: the benchmark observes the runtime, so it plugs in (hybrid_runtime/cli.py)
                  "hybrid_runtime.commands": ["bench=bench.cli_bench:bench"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
