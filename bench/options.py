"""Benchmark options, the systems it knows, constants and its timestamped log (bench/run_bench.py)."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from hybrid_runtime.errors import UserError

GiB = 1024 ** 3
REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK = Path(os.environ.get("HYBRID_RUNTIME_CACHE", Path.home() / ".cache" / "hybrid-runtime")) / "bench"
SYNTHETIC_PREFIX = "synthetic-"
PROMPT_TEXT = ("The history of computing is a story of trade-offs between memory and speed. Early machines "
               "kept their programs on punched cards and their data on magnetic drums; every generation since "
               "has added a faster, smaller layer of memory closer to the processor. Large language models "
               "turned this old problem around: their weights are far larger than the fast memory of a "
               "consumer graphics card, yet most of those weights are not needed for any given word. ")


# --------------------------------------------------------------------------------------- systems


@dataclass(frozen=True)
class SystemSpec:
    name: str
    description: str
    needs_cuda: bool
    budgeted: bool          # runs under --gpu-memory
    baseline: bool          # a column of the speedup table
    needs_hybrid: bool      # needs a hybrid model directory
    needs_hf: bool          # needs an HF checkpoint transformers can read


SYSTEMS: dict[str, SystemSpec] = {s.name: s for s in [
    SystemSpec("dense-gpu", "this engine, dense, whole model on the GPU, CUDA-graph decode", True, False, True, False, False),
    SystemSpec("hybrid", "hybrid runtime under the budget (predictor mode)", True, True, False, True, False),
    SystemSpec("dense-offload", "this engine, dense, first N layers on the GPU, rest on the CPU", True, True, True, False, False),
    SystemSpec("hybrid-gpu", "hybrid runtime, every neuron on the GPU (predictor mode)", True, False, False, True, False),
    SystemSpec("hf-gpu", "transformers generate(), whole model on the GPU", True, False, True, False, True),
    SystemSpec("hf-offload", "transformers + accelerate device_map=auto, max_memory = budget", True, True, True, False, True),
    SystemSpec("llamacpp-gpu", "llama.cpp (llama-cpp-python), all layers on the GPU", True, False, True, False, True),
    SystemSpec("llamacpp-offload", "llama.cpp (llama-cpp-python), n_gpu_layers fitting the budget", True, True, True, False, True),
    SystemSpec("llamacpp-cpu", "llama.cpp (llama-cpp-python), CPU only", False, False, True, False, True),
    SystemSpec("dense-cpu", "this engine, dense, on the CPU", False, False, True, False, False),
    SystemSpec("hybrid-cpu", "hybrid runtime on the CPU only (predictor mode, Numba kernels)", False, False, False, True, False),
    SystemSpec("hybrid-cpu-exact", "hybrid runtime on the CPU only (exact mode: every gate row, up/down rows where "
               "the gate fires)", False, False, False, True, False),
    SystemSpec("hf-cpu", "transformers generate() on the CPU", False, False, True, False, True),
]}
GPU_DEFAULT = ["dense-gpu", "hybrid", "dense-offload", "hybrid-gpu", "hf-gpu", "hf-offload", "llamacpp-gpu",
               "llamacpp-offload"]
CPU_DEFAULT = ["dense-cpu", "hybrid-cpu", "hybrid-cpu-exact", "hf-cpu", "llamacpp-cpu"]
# --cpu-format -> the torch dtype of the CPU systems; the block formats (quant.py) run this engine's matrices as
# blocks (float32 activations) and llama.cpp from a GGUF of the same blocks
CPU_FORMATS = {"bf16": "bfloat16", "f32": "float32", "q8_0": "float32", "q4_0": "float32", "q4_1": "float32"}
BLOCK_CPU_FORMATS = ("q8_0", "q4_0", "q4_1")
REFERENCE_FIGURES = {  # issue 7, measured on the H100 machine (2026-11-22) with the 7B shape: context only
    "llama.cpp, whole model on the GPU": 143.6, "llama.cpp, 20/32 layers on the GPU (~8 GiB)": 18.3,
    "llama.cpp, CPU only": 7.6, "PowerInfer, 8 GiB": 27.4, "PowerInfer, whole model on the GPU": 66.3,
    "transformers generate, GPU": 38.2, "transformers + accelerate, 8 GiB": 1.33,
}


def parse_systems(text: str, cuda: bool) -> list[str]:
    if text in ("auto", ""):
        return list(GPU_DEFAULT if cuda else CPU_DEFAULT)
    if text == "all":
        return list(SYSTEMS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in SYSTEMS]
    if bad:
        raise UserError(f"--systems: unknown system {bad[0]!r} (known: {', '.join(SYSTEMS)}; or auto, all)")
    return list(dict.fromkeys(names))


def parse_budgets(text: str) -> list[float]:
    if text.strip().lower() in ("", "none", "off"):
        return []
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--sweep must be comma-separated GiB values (e.g. 4,6,8,12,16) or none, got {text!r}") from None
    if any(v <= 0 for v in vals):
        raise UserError(f"--sweep budgets must be positive, got {text!r}")
    return vals


# --------------------------------------------------------------------------------------- options


@dataclass
class BenchOptions:
    model: str = "auto"                 # synthetic-{7b,13b,small,tiny}, a hybrid dir or an HF dir; auto by CUDA
    systems: str = "auto"
    gpu_memory: str = "8GiB"
    prompt_tokens: int = 64
    new_tokens: int = 128
    runs: int = 3
    out: str = str(REPO / "bench" / "results")
    profile_time: bool = False
    profile_tokens: int = 32            # decode tokens of the --profile-time pass
    sweep: str = "4,6,8,12,16"
    sweep_new_tokens: int = 32
    slow_new_tokens: int = 16           # for hf-offload (~1 tok/s at 7B): fewer tokens, said so
    time_budget_s: float = 540.0
    work: str = str(DEFAULT_WORK)
    seed: int = 0
    threads: int | None = None
    cold_format: str = "auto"
    cpu_format: str = "bf16"            # CPU systems: weights in bf16 (llama.cpp: F16 GGUF) or f32 (F32 GGUF)
    rebuild: bool = False
    force: bool = False
    pipeline: dict = field(default_factory=dict)   # PipelineConfig overrides for the synthetic model
    sparsity_profile: str = "prosparse"  # synthetic model: bench.synthetic.SPARSITY_PROFILES preset
    target_density: float | None = None  # synthetic model: override the preset's mean density
    freq_sigma: float | None = None      # synthetic model: override the preset's log-normal sigma
    clean_work: bool = False             # remove other cached builds (and GGUFs) in --work first


# --------------------------------------------------------------------------------------- logging


class BenchLog:
    """Timestamped progress on stderr, kept for the results file and a log beside them."""

    def __init__(self, budget_s: float):
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.lines: list[str] = []
        self.notes: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def __call__(self, msg: str) -> None:
        for line in str(msg).splitlines() or [""]:
            stamped = f"[{self.elapsed():7.1f}s] {line}"
            self.lines.append(stamped)
            print(stamped, file=sys.stderr, flush=True)

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self(f"note: {msg}")
