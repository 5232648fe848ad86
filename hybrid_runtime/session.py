"""Opening a model for running: name -> directory -> device, dtype, threads, KV cache, tokenizer."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from hybrid_runtime.errors import UserError
from hybrid_runtime.loading import load_model, load_tokenizer, parse_dtype, read_config, resolve_model
from hybrid_runtime.model import ModelConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = REPO_ROOT / "models" / "demo"
TINY_MODEL_DIR = Path(os.environ.get("HYBRID_RUNTIME_CACHE", Path.home() / ".cache" / "hybrid-runtime")) / "tiny-random-v1"


def default_model_dir() -> Path:
    """The embedded demo model; until it is installed, a tiny random model built here, said so."""
    if (DEMO_MODEL_DIR / "config.json").is_file():
        return DEMO_MODEL_DIR
    if not (TINY_MODEL_DIR / "config.json").is_file():
        from hybrid_runtime.tiny import build_tiny_model
        build_tiny_model(TINY_MODEL_DIR, seed=0, dim=64, n_layers=2, ffn_dim=256, act="relu")
    print(f"note: no demo model installed; using a tiny RANDOM model built deterministically at "
          f"{TINY_MODEL_DIR} (its output is gibberish)", file=sys.stderr)
    return TINY_MODEL_DIR


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"unknown device {name!r} (use cpu or cuda)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but CUDA is not available on this machine "
                        "(no GPU, or torch was built without CUDA); use --device cpu")
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    cores = os.cpu_count() or 1
    if not 1 <= threads <= cores:
        raise UserError(f"--threads must be between 1 and {cores} (the cores of this machine), got {threads}")
    torch.set_num_threads(threads)


@dataclass
class LoadedModel:
    path: Path
    config: ModelConfig
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    context: int


def open_model(name: str | None, device: str | None = None, dtype: str | None = None,
               threads: int | None = None, context: int | None = None) -> LoadedModel:
    path = resolve_model(name) if name else default_model_dir()
    hf = read_config(path)
    cfg = ModelConfig.from_hf(hf)
    dev = pick_device(device)
    set_threads(threads)
    ctx = context or min(cfg.max_seq_len, 4096)
    if ctx < 2:
        raise UserError(f"--context must be >= 2, got {ctx}")
    if ctx > cfg.max_seq_len:
        print(f"warning: --context {ctx} is beyond the model's max_position_embeddings "
              f"({cfg.max_seq_len}); quality may degrade", file=sys.stderr)
    tokenizer = load_tokenizer(path)
    model = load_model(path, device=dev, dtype=parse_dtype(dtype))
    model.setup_cache(max_batch=1, max_seq_len=ctx)
    run_dtype = model.tok_embeddings.weight.dtype
    return LoadedModel(path, cfg, model, tokenizer, dev, run_dtype, ctx)
