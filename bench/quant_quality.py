"""Quality cost of quantized weights: held-out perplexity with Q8_0 / Q4_0 blocks against full precision.

Each setting quantizes a set of weight matrices to llama.cpp's block format and back
(`hybrid_runtime.quant.fake_quantize`: the values a kernel reading those blocks computes with), then runs
the engine in fp32 over the same held-out blocks. Settings: the FFN only (what cold rows would hold), every
linear layer of the blocks (attention + FFN), and every matrix (+ embeddings / lm_head). Writes
`<out>/<device>-<date>-quant-quality.{json,md}`.

    python -m bench.quant_quality --data corpus/*.txt      # SmolLM2-135M-Instruct (bench/real_model.py)
"""
from __future__ import annotations

import argparse
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="An HF checkpoint (default: SmolLM2-135M-Instruct, fp32).")
    ap.add_argument("--data", nargs="+", required=True, help="Text files; the held-out split (last 5%%) is used.")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--block-len", type=int, default=256)
    ap.add_argument("--formats", default="q8_0,q4_0")
    ap.add_argument("--scopes", default="ffn,blocks,all")
    ap.add_argument("--down-blocks", default="neuron,checkpoint",
                    help="Axis of the FFN down matrix's blocks: neuron (along d, the engine's layout), checkpoint "
                         "(along f, HF's and GGUF's), or both.")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)

    from bench.real_model import build_smollm2
    from convert.data import load_token_blocks
    from hybrid_runtime.loading import load_model, load_tokenizer
    path = Path(args.model) if args.model else build_smollm2()
    blocks = load_token_blocks(args.data, load_tokenizer(path), args.block_len, "heldout", max_tokens=args.eval_tokens)
    model = load_model(path, dtype=torch.float32)
    log(f"{path.name}: {blocks.shape[0]} held-out blocks of {blocks.shape[1]} tokens")
    t0 = time.perf_counter()
    base = perplexity(model, blocks)
    res = {"model": str(path), "data": args.data, "date": time.strftime("%Y-%m-%d"), "device": "cpu",
           "tokens": int(blocks.shape[0] * (blocks.shape[1] - 1)), "reference": {"dtype": "float32", "perplexity": base},
           "points": []}
    log(f"float32: perplexity {base:.3f} ({time.perf_counter() - t0:.0f} s)")
    names = dict(model.named_parameters())
    for fmt in args.formats.split(","):
        for scope in args.scopes.split(","):
            for axis in args.down_blocks.split(","):
                saved = quantized_copy(model, fmt, scope, axis)
                ppl = perplexity(model, blocks)
                for name, data in saved.items():
                    names[name].data = data
                point = {"format": fmt, "scope": scope, "down_blocks": axis, "matrices": len(saved),
                         "perplexity": ppl, "vs_float32": ppl / base - 1}
                res["points"].append(point)
                log(f"{fmt} {scope:6s} down blocks {axis:10s} ({len(saved)} matrices): perplexity {ppl:.3f} "
                    f"({100 * point['vs_float32']:+.2f}%)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu-{res['date']}-quant-quality"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    rows = ["| format | scope | down blocked along | matrices | held-out ppl | vs fp32 |", "|---|---|---|---|---|---|",
            f"| fp32 | - | - | - | {base:.3f} | - |"]
    rows += [f"| {p['format']} | {p['scope']} | {'d (neuron rows)' if p['down_blocks'] == 'neuron' else 'f (checkpoint)'} | "
             f"{p['matrices']} | {p['perplexity']:.3f} | {100 * p['vs_float32']:+.2f}% |" for p in res["points"]]
    stem.with_suffix(".md").write_text(f"# Quantized weights, quality: {path.name}, {res['tokens']} held-out tokens\n\n"
                                       + "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
