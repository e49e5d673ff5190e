"""A fixed, generated corpus of short English sentences (8 to 14 words, about 12 to 18 tokens): the same list for a
given ``count`` and ``seed`` on every machine, for the load generator, the tests and the benchmarks."""

from __future__ import annotations

import random

_SUBJECTS = ("the engineer", "a small dog", "my neighbour", "the committee", "a tired student", "the old train",
             "our new server", "the river", "a quiet child", "the market", "the orchestra", "a delivery drone")
_VERBS = ("repaired", "watched", "ignored", "painted", "measured", "carried", "described", "followed", "cleaned",
          "counted", "forgot", "discovered")
_OBJECTS = ("the broken bicycle", "a bright red kite", "every single invoice", "the morning news",
            "a pile of wet leaves", "the last chapter", "three green bottles", "the mountain road",
            "a cup of cold coffee", "the quarterly report", "an unusual bird", "the kitchen window")
_TAILS = ("before the storm arrived", "in the middle of the night", "without saying a word",
          "while everyone was asleep", "near the old harbour", "after a very long week", "for no clear reason",
          "during the lunch break", "with great care", "at the edge of town", "as the sun went down",
          "on a rainy Tuesday")


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` sentences, generated from ``seed`` (distinct within the first 20,000)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_TAILS)]
        out.append(f"{' '.join(words).capitalize()} (note {i}).")
    return out
