"""Deterministic word-salad text for the tokenizer, ProSparse and training tests (no corpus needed)."""
from __future__ import annotations

import random

WORDS = ("the a cat dog bird sat ran flew on over under mat tree house red blue big small quickly slowly "
         "and then when it was").split()


def make_text(n_lines: int, seed: int = 0) -> str:
    """n_lines sentences of 4-12 words from WORDS, one per line; the same text for the same seed."""
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n_lines)) + "\n"
