"""Regenerate tests/golden/demo_golden.json: greedy tokens of the embedded demo model (models/demo).

    python tests/golden/make_demo_golden.py            # refuses to overwrite
    python tests/golden/make_demo_golden.py --force

For each prompt in PROMPTS and each mode (dense, exact, predictor), on the CPU, in the dtype that
`hybrid-run generate` picks for that mode (dense: the checkpoint's float16 runs as bfloat16;
exact / predictor: float32 with 16-bit cold rows), greedy decoding of MAX_NEW_TOKENS tokens.
Stored per mode: the tokens, their text, the agreement with dense, and the smallest top-1/top-2
logit gap along the way (how far the golden is from a near-tie; a tiny gap would make it flip on
rounding noise). The sha256 of the model files is stored so that a new demo model is reported as
"regenerate the goldens", not as a regression.

Threads are pinned to THREADS (torch and Numba) for every mode: in float32 on the CPU, torch's
flash-attention kernel for one query and the Numba cold-neuron decode kernel both split their
reductions by the thread count, so logits change in the last bits with the thread count
(the dense bfloat16 path happens not to). See tests/test_demo_golden.py.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numba
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hybrid_runtime.generate import SamplingParams  # noqa: E402
from hybrid_runtime.session import open_model  # noqa: E402

DEMO_DIR = REPO / "models" / "demo"
GOLDEN = Path(__file__).resolve().parent / "demo_golden.json"
MODES = ("dense", "exact", "predictor")
THREADS = 1
MAX_NEW_TOKENS = 40
# Chosen among ~40 candidates for wide top-2 gaps in every mode: dense bfloat16 logits often tie
# exactly (then the golden hangs on the last bit), these two keep >= 2 bfloat16 steps between the
# top two tokens for all 40 steps; the float32 modes' gaps (>= 0.002) are far above rounding noise
# (~1e-6). The predictor mode parts from dense on both, so it has goldens of its own.
PROMPTS = ["Python is an easy to learn,", "The :keyword:`if` statement"]
HASHED_FILES = ("model.safetensors", "predictors.safetensors", "hybrid.json", "tokenizer.json")


def file_hashes(model_dir: Path) -> dict[str, str]:
    return {name: hashlib.sha256((model_dir / name).read_bytes()).hexdigest() for name in HASHED_FILES}


def pin_threads(n: int) -> None:
    torch.set_num_threads(n)
    numba.set_num_threads(n)


def greedy(lm, prompt: str, n: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy tokens) through the generator that `hybrid-run generate` uses."""
    ids = lm.tokenizer(prompt).input_ids
    return ids, lm.generator().generate(ids, SamplingParams(max_new_tokens=n)).tokens


@torch.inference_mode()
def top2_gaps(lm, ids: list[int], tokens: list[int]) -> list[float]:
    """Top-1 minus top-2 logit at every generated position, on the generator's path (prefill, then
    one token per step); also checks that the argmax there is the generated token."""
    model = lm.model
    model.setup_cache(1, lm.context)
    logits = model(torch.tensor([ids]), torch.arange(len(ids)))[0, -1]                  # (V,)
    gaps = []
    for i, tok in enumerate(tokens):
        top = logits.float().topk(2)
        if int(top.indices[0]) != tok:
            raise RuntimeError(f"replay disagrees with generation at step {i}: {int(top.indices[0])} != {tok}")
        gaps.append(float(top.values[0] - top.values[1]))
        if i + 1 < len(tokens):
            logits = model(torch.tensor([[tok]]), torch.tensor([len(ids) + i]))[0, -1]
    return gaps


def agreement(tokens: list[int], ref: list[int]) -> dict:
    same = [a == b for a, b in zip(tokens, ref)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return {"agree": sum(same), "of": len(ref), "identical_prefix": prefix}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--force", action="store_true", help="overwrite demo_golden.json")
    a = p.parse_args()
    if GOLDEN.exists() and not a.force:
        sys.exit(f"error: {GOLDEN} exists (use --force to overwrite)")
    pin_threads(THREADS)
    lms = {m: open_model(str(DEMO_DIR), mode=m, device="cpu") for m in MODES}
    cases = []
    for prompt in PROMPTS:
        case = {"prompt": prompt, "modes": {}}
        for mode, lm in lms.items():
            ids, tokens = greedy(lm, prompt, MAX_NEW_TOKENS)
            case["prompt_ids"] = ids
            gaps = top2_gaps(lm, ids, tokens)
            case["modes"][mode] = {"dtype": str(lm.dtype).replace("torch.", ""), "tokens": tokens,
                                   "text": lm.tokenizer.decode(tokens), "min_top2_gap": min(gaps)}
        dense = case["modes"]["dense"]["tokens"]
        for mode in ("exact", "predictor"):
            case["modes"][mode]["agreement_with_dense"] = agreement(case["modes"][mode]["tokens"], dense)
        cases.append(case)
        print(f"{prompt!r}: " + "  ".join(
            f"{m}: min gap {case['modes'][m]['min_top2_gap']:.4f}" for m in MODES) + "  " + "  ".join(
            f"{m} agrees with dense on {case['modes'][m]['agreement_with_dense']['agree']}/{MAX_NEW_TOKENS}"
            for m in ("exact", "predictor")), file=sys.stderr)
    golden = {"model": "models/demo", "files_sha256": file_hashes(DEMO_DIR), "device": "cpu",
              "threads": THREADS, "max_new_tokens": MAX_NEW_TOKENS, "torch": torch.__version__,
              "numba": numba.__version__, "cases": cases}
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    main()
