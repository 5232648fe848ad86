"""Predictor-mode quality: how often hybrid decoding agrees with dense decoding.

For each prompt, dense greedy decoding produces N tokens. We report two figures:
  - teacher-forced agreement: feeding the dense sequence to the hybrid model, the share of
    positions where its greedy choice equals dense's (each position judged on the same context);
  - free-running agreement: the share of positions where the two models' own greedy
    generations are equal (identical prefix length / N shows where they first diverge).
Also --exact as a control (must agree 100% up to float ties).

All three modes run in the same dtype (--dtype; auto = what the hybrid modes use: float32 on
the CPU, the checkpoint's 16-bit type on CUDA). Otherwise the dense engine's own CPU policy
(float16 checkpoints run as bfloat16) would mix rounding differences into the figure.

    python bench/agreement.py --model models/demo --tokens 256 --out bench/results/agreement.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_runtime.generate import SamplingParams  # noqa: E402
from hybrid_runtime.session import open_model  # noqa: E402

PROMPTS = [
    "To be, or not to be, that is the question:",
    "ROMEO. But soft, what light through yonder window breaks?",
    "Of Man's first disobedience, and the fruit",
    "The Python tutorial explains how to define a function:",
    "KING LEAR. Blow, winds, and crack your cheeks!",
    "A list comprehension consists of brackets containing",
    "Now is the winter of our discontent",
    "The ``with`` statement is used to wrap the execution of a block",
]


@torch.inference_mode()
def teacher_forced_choices(lm, ids: list[int]) -> list[int]:
    """Greedy choice at every position of ids, one token at a time (decode path, as in generation)."""
    model = lm.model
    model.setup_cache(1, lm.context)
    dev = lm.device
    out = []
    for pos, tok in enumerate(ids[:-1]):
        logits = model(torch.tensor([[tok]], device=dev), torch.tensor([pos], device=dev))
        out.append(int(logits[0, -1].argmax()))  # deliberate sync: measurement
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--hot-fraction", type=float, default=None)
    p.add_argument("--gpu-memory", default=None)
    p.add_argument("--dtype", default="auto",
                   help="Run dtype of all modes (auto: float32 on the CPU, the checkpoint's on CUDA).")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice).")
    p.add_argument("--cold-format", choices=["bf16", "fp16", "int8"], default=None,
                   help="CPU storage of cold rows in the hybrid modes (int8: measures the quantization cost).")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    t0 = time.time()
    params = SamplingParams(max_new_tokens=a.tokens)
    exact = open_model(a.model, mode="exact", device=a.device, threads=a.threads,
                       dtype=None if a.dtype == "auto" else a.dtype,
                       hot_fraction=a.hot_fraction, gpu_memory=a.gpu_memory, cold_format=a.cold_format)
    dtype = str(exact.dtype).replace("torch.", "")  # the hybrid modes' choice under auto
    common = dict(device=a.device, dtype=dtype, hot_fraction=a.hot_fraction, gpu_memory=a.gpu_memory,
                  cold_format=a.cold_format)
    dense = open_model(a.model, mode="dense", device=a.device, dtype=dtype)
    runs = {"predictor": open_model(a.model, mode="predictor", **common), "exact": exact}
    results = {"model": str(dense.path), "device": str(dense.device), "dtype": dtype,
               "cold_format": a.cold_format or "checkpoint's 16-bit type",
               "threads": torch.get_num_threads(), "context": dense.context, "tokens": a.tokens, "prompts": []}
    totals = {m: {"tf_agree": 0, "free_agree": 0, "n": 0} for m in runs}
    for prompt in PROMPTS:
        ids = dense.tokenizer(prompt).input_ids
        gen = dense.generator()
        ref = gen.generate(ids, params).tokens
        entry = {"prompt": prompt, "dense_tokens": len(ref)}
        full = ids + ref
        for mode, lm in runs.items():
            # teacher forced over the generated part
            choices = teacher_forced_choices(lm, full)[len(ids) - 1:]
            tf = sum(int(c == r) for c, r in zip(choices, ref))
            own = lm.generator().generate(ids, params).tokens
            prefix = next((i for i, (x, y) in enumerate(zip(own, ref)) if x != y), min(len(own), len(ref)))
            free = sum(int(x == y) for x, y in zip(own, ref))
            entry[mode] = {"teacher_forced_agree": tf, "free_running_agree": free, "identical_prefix": prefix}
            totals[mode]["tf_agree"] += tf
            totals[mode]["free_agree"] += free
            totals[mode]["n"] += len(ref)
        results["prompts"].append(entry)
        print(f"{prompt[:40]!r:45s} " + "  ".join(
            f"{m}: tf {entry[m]['teacher_forced_agree']}/{len(ref)} prefix {entry[m]['identical_prefix']}"
            for m in runs), file=sys.stderr)
    results["summary"] = {m: {"teacher_forced_agreement": t["tf_agree"] / max(t["n"], 1),
                              "free_running_agreement": t["free_agree"] / max(t["n"], 1), "tokens": t["n"]}
                          for m, t in totals.items()}
    results["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(results["summary"], indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
