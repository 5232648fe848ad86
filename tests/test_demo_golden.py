"""Golden test of the embedded demo model (models/demo): greedy tokens reproduce exactly on the CPU.

The goldens (tests/golden/demo_golden.json) are made by tests/golden/make_demo_golden.py, in the
dtype `hybrid-run generate` picks per mode on the CPU (dense: bfloat16, exact / predictor: float32).
Each mode has its own golden; predictor mode may leave dense, and the agreement with dense measured
when the goldens were made is asserted too.

Threads: torch and Numba are pinned to the goldens' thread count (1). In float32 the logits
change in the last bits with the thread count: torch's CPU flash-attention kernel for one query
and the Numba cold-neuron decode kernel (one partial sum per thread, merged after) both split
their reductions by it. The dense bfloat16 path is bit-identical for 1 and 2 threads; that is
checked separately, as the default `hybrid-run` runs use all cores.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numba
import pytest
import torch

from hybrid_runtime.generate import SamplingParams
from hybrid_runtime.session import open_model

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "models" / "demo"
GOLDEN_PATH = Path(__file__).resolve().parent / "golden" / "demo_golden.json"
MODES = ("dense", "exact", "predictor")
REGENERATE = "regenerate with `python tests/golden/make_demo_golden.py --force`"

GOLDEN = json.loads(GOLDEN_PATH.read_text())
CASES = GOLDEN["cases"]


@pytest.fixture(scope="module", autouse=True)
def pinned_threads():
    saved = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(GOLDEN["threads"])
    numba.set_num_threads(GOLDEN["threads"])
    yield
    torch.set_num_threads(saved[0])
    numba.set_num_threads(saved[1])


@pytest.fixture(scope="module")
def models(pinned_threads):
    if not (DEMO_DIR / "hybrid.json").is_file():
        pytest.fail(f"{DEMO_DIR}: the embedded demo model is missing (bench/make_demo_model.sh builds it)")
    return {m: open_model(str(DEMO_DIR), mode=m, device="cpu") for m in MODES}


def greedy(lm, prompt: str) -> tuple[list[int], list[int]]:
    ids = lm.tokenizer(prompt).input_ids
    return ids, lm.generator().generate(ids, SamplingParams(max_new_tokens=GOLDEN["max_new_tokens"])).tokens


def agreement(tokens: list[int], ref: list[int]) -> dict:
    same = [a == b for a, b in zip(tokens, ref)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return {"agree": sum(same), "of": len(ref), "identical_prefix": prefix}


def test_goldens_belong_to_this_model():
    import hashlib
    for name, digest in GOLDEN["files_sha256"].items():
        actual = hashlib.sha256((DEMO_DIR / name).read_bytes()).hexdigest()
        assert actual == digest, f"models/demo/{name} changed since the goldens were made: {REGENERATE}"


@pytest.mark.parametrize("mode", MODES)
def test_greedy_tokens_match_golden(models, mode):
    lm = models[mode]
    for case in CASES:
        want = case["modes"][mode]
        assert str(lm.dtype).replace("torch.", "") == want["dtype"], f"{mode}: run dtype changed ({REGENERATE})"
        ids, tokens = greedy(lm, case["prompt"])
        assert ids == case["prompt_ids"], f"tokenizer output changed for {case['prompt']!r}"
        assert tokens == want["tokens"], (
            f"{mode}, prompt {case['prompt']!r}: tokens differ from step "
            f"{agreement(tokens, want['tokens'])['identical_prefix']} on (golden's smallest top-2 logit gap: "
            f"{want['min_top2_gap']:.4f})")
        assert lm.tokenizer.decode(tokens) == want["text"]


def test_agreement_with_dense(models):
    """The measured agreement with dense (stored with the goldens) is reproduced by fresh runs."""
    for case in CASES:
        dense = greedy(models["dense"], case["prompt"])[1]
        for mode in ("exact", "predictor"):
            got = agreement(greedy(models[mode], case["prompt"])[1], dense)
            assert got == case["modes"][mode]["agreement_with_dense"], f"{mode}, {case['prompt']!r}"
    # the predictor golden is not a copy of dense: at least one prompt makes it part from dense
    assert any(c["modes"]["predictor"]["tokens"] != c["modes"]["dense"]["tokens"] for c in CASES)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores")
def test_dense_is_thread_count_invariant(models):
    """The dense (bfloat16) golden holds at 2 torch threads as well (bit-identical logits)."""
    torch.set_num_threads(2)
    try:
        for case in CASES:
            assert greedy(models["dense"], case["prompt"])[1] == case["modes"]["dense"]["tokens"]
    finally:
        torch.set_num_threads(GOLDEN["threads"])
