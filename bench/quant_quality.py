"""Quality cost of quantized weights: held-out perplexity with Q8_0 / Q4_0 blocks against full precision.

Each setting quantizes a set of weight matrices to llama.cpp's block format and back
(`hybrid_runtime.quant.fake_quantize`: the values a kernel reading those blocks computes with), then runs
the engine in fp32 over the same held-out blocks. Settings: the FFN only (what cold rows would hold), every
linear layer of the blocks (attention + FFN), and every matrix (+ embeddings / lm_head). With
`--decode-tokens N`, also the product's own decode path: perplexity over N held-out tokens decoded one by one
through the one-call CPU decode, fp32 weights against each format's blocks read by the block kernels (with
their int8 activations, `quant.quantize_model_`). Writes `<out>/<device>-<date>-quant-quality.{json,md}`.

    python -m bench.quant_quality --data corpus/a.txt --data corpus/b.txt   # SmolLM2-135M-Instruct
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from hybrid_runtime.errors import log

SCOPES = {
    "ffn": lambda name: ".ffn." in name,
    "blocks": lambda name: name.startswith("layers.") and not name.endswith("norm.weight"),
    "all": lambda name: not name.endswith("norm.weight"),
}


@torch.inference_mode()
def perplexity(model, blocks: torch.Tensor, batch: int = 4) -> float:
    total, n = 0.0, 0
    for b in range(0, blocks.shape[0], batch):
        x = blocks[b:b + batch]
        model.setup_cache(x.shape[0], x.shape[1])
        logits = model(x, torch.arange(x.shape[1]))[:, :-1]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                         reduction="sum"))
        n += x[:, 1:].numel()
    return math.exp(total / n)


@torch.inference_mode()
def decode_perplexity(model, blocks: torch.Tensor) -> float:
    """Perplexity with every token decoded one at a time by the one-call CPU decode (cpu_decode.py)."""
    from hybrid_runtime.cpu_decode import CpuDecodeStep
    model.setup_cache(1, blocks.shape[1])
    step = CpuDecodeStep(model)
    total, n = 0.0, 0
    for x in blocks:
        for t in range(x.shape[0] - 1):
            logits = step(x[t].view(1, 1), torch.tensor([t]), t + 1)[0, 0]
            total -= float(torch.log_softmax(logits, dim=-1)[x[t + 1]])
            n += 1
    return math.exp(total / n)


def quantized_copy(model, fmt: str, scope: str, down_blocks: str = "neuron") -> dict[str, torch.Tensor]:
    """Fake-quantize the scope's 2-D weights of `model` in place; returns the originals to restore.
    down_blocks: "neuron" blocks the FFN down matrix along d, as the engine stores it (one neuron's row,
    what a sparse kernel reads); "checkpoint" along f, as HF's down_proj and GGUF files block it."""
    from hybrid_runtime.quant import fake_quantize
    saved = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and SCOPES[scope](name):
            saved[name] = p.data
            if down_blocks == "checkpoint" and name.endswith(".ffn.down"):
                p.data = fake_quantize(p.data.t().contiguous(), fmt).t().contiguous()
            else:
                p.data = fake_quantize(p.data, fmt)
    return saved


def run_quality(model: str | None, data: list[str], eval_tokens: int = 16384, block_len: int = 256,
                formats: str = "q8_0,q4_0", scopes: str = "ffn,blocks,all", down_blocks: str = "neuron,checkpoint",
                out: str = str(Path(__file__).resolve().parent / "results"), force: bool = False,
                decode_tokens: int = 0) -> dict:
    """Every (format, scope, down-block axis) against fp32 on the same held-out blocks; writes and returns
    the results. Every argument is checked before the model is read."""
    from hybrid_runtime.errors import UserError, check_number, check_output_path
    from hybrid_runtime.quant import FORMATS
    check_number("--eval-tokens", eval_tokens, low=2)
    check_number("--block-len", block_len, low=2)
    check_number("--decode-tokens", decode_tokens, low=0)
    chosen = {}
    for flag, text, known in (("--formats", formats, FORMATS), ("--scopes", scopes, tuple(SCOPES)),
                              ("--down-blocks", down_blocks, ("neuron", "checkpoint"))):
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in known]
        if bad or not values:
            raise UserError(f"{flag}: {bad[0] if bad else text!r} is not one of {', '.join(known)} (a comma list)")
        chosen[flag] = values
    date = time.strftime("%Y-%m-%d")
    inputs = [("--model", model)] + [("--data", d) for d in data]
    stem = check_output_path(out, inputs) / f"cpu-{date}-quant-quality"
    existing = [p for p in (stem.with_suffix(".json"), stem.with_suffix(".md")) if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} exists; use --force to replace it")

    from bench.real_model import build_smollm2
    from convert.data import load_token_blocks
    from hybrid_runtime.loading import load_model, load_tokenizer
    path = Path(model) if model else build_smollm2()
    blocks = load_token_blocks(data, load_tokenizer(path), block_len, "heldout", max_tokens=eval_tokens)
    model_ = load_model(path, dtype=torch.float32)
    log(f"{path.name}: {blocks.shape[0]} held-out blocks of {blocks.shape[1]} tokens")
    t0 = time.perf_counter()
    base = perplexity(model_, blocks)
    res = {"model": str(path), "data": list(data), "date": date, "device": "cpu",
           "tokens": int(blocks.shape[0] * (blocks.shape[1] - 1)), "reference": {"dtype": "float32", "perplexity": base},
           "points": []}
    log(f"float32: perplexity {base:.3f} ({time.perf_counter() - t0:.0f} s)")
    names = dict(model_.named_parameters())
    for fmt in chosen["--formats"]:
        for scope in chosen["--scopes"]:
            for axis in chosen["--down-blocks"]:
                saved = quantized_copy(model_, fmt, scope, axis)
                ppl = perplexity(model_, blocks)
                for name, orig in saved.items():
                    names[name].data = orig
                point = {"format": fmt, "scope": scope, "down_blocks": axis, "matrices": len(saved),
                         "perplexity": ppl, "vs_float32": ppl / base - 1}
                res["points"].append(point)
                log(f"{fmt} {scope:6s} down blocks {axis:10s} ({len(saved)} matrices): perplexity {ppl:.3f} "
                    f"({100 * point['vs_float32']:+.2f}%)")
    decode_rows = []
    if decode_tokens:
        from hybrid_runtime.quant import quantize_model_
        few = blocks[:max(1, decode_tokens // (blocks.shape[1] - 1))]
        t0 = time.perf_counter()
        ref = decode_perplexity(model_, few)
        res["decode"] = {"tokens": int(few.shape[0] * (few.shape[1] - 1)), "float32": ref, "points": []}
        log(f"decode path, float32: perplexity {ref:.3f} ({time.perf_counter() - t0:.0f} s)")
        decode_rows = ["", f"Through the one-call CPU decode ({res['decode']['tokens']} tokens decoded one by one; "
                       "every matrix in blocks, the block kernels' int8 activations):", "",
                       "| weights | held-out ppl | vs fp32 |", "|---|---|---|", f"| fp32 | {ref:.3f} | - |"]
        for fmt in chosen["--formats"]:
            qmodel = load_model(path, dtype=torch.float32)
            quantize_model_(qmodel, fmt)
            ppl = decode_perplexity(qmodel, few)
            res["decode"]["points"].append({"format": fmt, "perplexity": ppl, "vs_float32": ppl / ref - 1})
            decode_rows.append(f"| {fmt} | {ppl:.3f} | {100 * (ppl / ref - 1):+.2f}% |")
            log(f"decode path, {fmt}: perplexity {ppl:.3f} ({100 * (ppl / ref - 1):+.2f}%)")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    rows = ["| format | scope | down blocked along | matrices | held-out ppl | vs fp32 |", "|---|---|---|---|---|---|",
            f"| fp32 | - | - | - | {base:.3f} | - |"]
    rows += [f"| {p['format']} | {p['scope']} | {'d (neuron rows)' if p['down_blocks'] == 'neuron' else 'f (checkpoint)'} | "
             f"{p['matrices']} | {p['perplexity']:.3f} | {100 * p['vs_float32']:+.2f}% |" for p in res["points"]]
    stem.with_suffix(".md").write_text(f"# Quantized weights, quality: {path.name}, {res['tokens']} held-out tokens\n\n"
                                       + "\n".join(rows + decode_rows) + "\n")
    print("\n".join(rows + decode_rows))
    return res


def main() -> None:
    import click

    from hybrid_runtime.errors import console_main

    @click.command(help=__doc__.splitlines()[0])
    @click.option("--model", default=None, help="An HF checkpoint (default: SmolLM2-135M-Instruct, fp32).")
    @click.option("--data", multiple=True, required=True, help="Text file (repeatable); its held-out split is used.")
    @click.option("--eval-tokens", type=int, default=16384, show_default=True)
    @click.option("--block-len", type=int, default=256, show_default=True)
    @click.option("--formats", default="q8_0,q4_0", show_default=True)
    @click.option("--scopes", default="ffn,blocks,all", show_default=True)
    @click.option("--down-blocks", default="neuron,checkpoint", show_default=True,
                  help="Axis of the FFN down matrix's blocks: neuron (along d, the engine's layout), checkpoint "
                       "(along f, HF's and GGUF's), or both.")
    @click.option("--out", default=str(Path(__file__).resolve().parent / "results"), show_default=True)
    @click.option("--decode-tokens", type=int, default=0, show_default=True,
                  help="Also measure perplexity through the CPU decode path (block kernels) over this many tokens.")
    @click.option("--force", is_flag=True, help="Replace today's result files.")
    def quality(model, data, eval_tokens, block_len, formats, scopes, down_blocks, out, force, decode_tokens):
        run_quality(model, list(data), eval_tokens, block_len, formats, scopes, down_blocks, out, force, decode_tokens)

    console_main(quality)


if __name__ == "__main__":
    main()
