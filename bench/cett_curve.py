"""Sparsity beyond zero on a real model: the CETT curve of a SiLU model in every mode, measured.

For each CETT target: `hybrid-convert all --cett T` (magnitude profile with per-layer cuts, predictors,
pack), then `evaluate_modes` on held-out text: perplexity of dense / exact (the magnitude-thresholded
FFN) / predictor mode on the same tokens, FFN sparsity, predictor recall and density, greedy agreement
with dense (teacher-forced and free-running). Writes `<out>/<device>-<date>-cett.{json,md}`.

    python -m bench.cett_curve --data corpus/*.txt            # SmolLM2-135M-Instruct (bench/real_model.py)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from hybrid_runtime.errors import log


def _md_table(res: dict) -> str:
    rows = ["| CETT | mode | held-out ppl | vs dense | FFN sparsity | predictor recall | predicted density | "
            "teacher-forced agreement | free-running agreement |", "|---|---|---|---|---|---|---|---|---|"]
    for point in res["points"]:
        for mode, r in point["eval"]["modes"].items():
            if mode == "dense" and point is not res["points"][0]:
                continue
            rows.append(f"| {point['cett'] if mode != 'dense' else '-'} | {mode} | {r['perplexity']:.3f} | "
                        f"{100 * r.get('perplexity_vs_dense', 0):+.2f}% | {100 * r['ffn_sparsity']:.1f}% | "
                        f"{r.get('predictor_recall', float('nan')):.3f} | "
                        f"{100 * r.get('predicted_density', float('nan')):.1f}% | "
                        f"{100 * r.get('teacher_forced_agreement', 1):.1f}% | "
                        f"{100 * r.get('free_running', {}).get('agreement', 1):.1f}% |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="A SiLU HF checkpoint (default: SmolLM2-135M-Instruct).")
    ap.add_argument("--data", nargs="+", required=True, help="Text files: calibration (train split) and eval "
                                                              "(held-out split: the last 5%% of each file).")
    ap.add_argument("--cett", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--tokens", type=int, default=16384, help="Calibration tokens to profile.")
    ap.add_argument("--samples-per-layer", type=int, default=16384)
    ap.add_argument("--max-epochs", type=int, default=8)
    ap.add_argument("--ranks", default="64", help="Predictor ranks to try (auto: a search, slow on the CPU).")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--block-len", type=int, default=256)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "hybrid-runtime" / "cett-curve"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    import torch

    from bench.real_model import build_smollm2
    from convert.data import load_token_blocks
    from convert.evaluate import evaluate_modes, format_modes_table
    from hybrid_runtime.loading import load_tokenizer
    model = Path(args.model) if args.model else build_smollm2()
    blocks = load_token_blocks(args.data, load_tokenizer(model), args.block_len, "heldout",
                               max_tokens=args.eval_tokens)
    res = {"model": str(model), "data": args.data, "date": time.strftime("%Y-%m-%d"), "device": "cpu",
           "threads": torch.get_num_threads(), "settings": vars(args), "points": []}
    for cett in [float(c) for c in args.cett.split(",")]:
        hyb = Path(args.work) / f"cett-{cett:g}"
        t0 = time.perf_counter()
        if not (hyb / "hybrid.json").is_file():
            cmd = [sys.executable, "-c", "from convert.cli import main; main()", "all", "-m", str(model),
                   *[a for d in args.data for a in ("--data", d)], "--out", str(hyb), "--cett", str(cett),
                   "--tokens", str(args.tokens), "--block-len", str(args.block_len),
                   "--samples-per-layer", str(args.samples_per_layer), "--max-epochs", str(args.max_epochs),
                   "--ranks", args.ranks, "--device", "cpu", "--dtype", "float32"]
            work = hyb.with_name(hyb.name + ".work")
            # an interrupted build continues where it stopped (its profile, the layers already trained)
            cmd.append("--resume" if (work / "profile").is_dir() and any((work / "profile").iterdir()) else "--force")
            subprocess.run(cmd, check=True)
        built = time.perf_counter() - t0
        ev = evaluate_modes(hyb, blocks, ("exact", "predictor"), batch_size=4, progress=True)
        log(f"CETT {cett}:\n" + format_modes_table(ev))
        res["points"].append({"cett": cett, "hybrid_dir": str(hyb), "build_seconds": built, "eval": ev,
                              "magnitude_cuts": json.loads((hyb / "hybrid.json").read_text())["activity"]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu-{res['date']}-cett"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(f"# CETT curve: {model.name}, CPU, {res['date']}\n\n"
                                       f"Held-out tokens: {res['points'][0]['eval']['tokens']}; "
                                       f"calibration tokens: {args.tokens}.\n\n" + _md_table(res) + "\n")
    print(_md_table(res))


if __name__ == "__main__":
    main()
