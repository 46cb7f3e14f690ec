"""Seeded prompts for speculative-decoding benchmarks: copy-heavy ones, where the answer repeats
much of the prompt (rewrite or summarise a given passage, fix a bug in a given function, answer
from a quoted document), and free-writing ones, where it does not.

    python tools/spec_workloads.py --kind copy --n 4 --seed 0      # prints the prompts as JSON

Passages are built from a seeded word list, so the same seed gives the same text everywhere,
and phrased for base models too (the bundled Gemma 3 270M continues text; it does not chat).
"""

from __future__ import annotations

import argparse
import json
import random

WORDS = ("river town bridge morning harbour market stone garden winter lantern road hill "
         "library letter window bakery train station clock tower orchard field storm ship "
         "teacher farmer painter doctor child neighbour mayor baker sailor traveller "
         "quiet old narrow bright cold warm green early late small long busy "
         "walks carries opens builds watches remembers finds follows crosses repairs "
         "slowly carefully often always never together again").split()
NAMES = ["Anna", "Tomas", "Mira", "Jonas", "Elena", "Pavel", "Lucia", "Oskar"]
FUNCTIONS = [
    ("total_price", "items", "total = 0\n    for item in items:\n        total += item.price * item.count\n    return totl"),
    ("average", "values", "if not values:\n        return 0\n    return sum(values) / len(value)"),
    ("longest_word", "text", "words = text.split()\n    best = ''\n    for w in words:\n        if len(w) > len(best):\n            best = w\n    return bets"),
    ("count_vowels", "word", "count = 0\n    for ch in word.lower():\n        if ch in 'aeiou':\n            count += 1\n    return cnt"),
]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 14))]
    return f"{rng.choice(NAMES)} {' '.join(words)}."


def _passage(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def copy_heavy(n: int, seed: int = 0) -> list[str]:
    """Prompts whose continuation copies: a rewrite, a bug fix, a quoted answer (in turn)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            passage = _passage(rng, 4)
            out.append(f"Original passage:\n{passage}\n\nThe same passage, rewritten with "
                       f"'{rng.choice(NAMES)}' as the first name and otherwise unchanged:\n")
        elif kind == 1:
            name, arg, body = FUNCTIONS[(i // 3) % len(FUNCTIONS)]
            code = f"def {name}({arg}):\n    {body}\n"
            out.append(f"This function has a typo in its last line:\n\n{code}\n"
                       f"The corrected function, in full:\n\ndef {name}({arg}):\n")
        else:
            doc = _passage(rng, 5)
            out.append(f"Document:\n{doc}\n\nQuestion: what does the document say, word for "
                       f"word?\nAnswer, quoting the document exactly:\n")
    return out


def free_writing(n: int, seed: int = 0) -> list[str]:
    """Prompts whose continuation is new text."""
    rng = random.Random(seed + 1)
    topics = ["a lighthouse keeper", "the first snow", "a lost letter", "a night train",
              "an old map", "a city garden", "a storm at sea", "a quiet library"]
    return [f"Write a short story about {rng.choice(topics)}, in your own words.\n\nStory:\n"
            for _ in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["copy", "free"], default="copy")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    prompts = (copy_heavy if args.kind == "copy" else free_writing)(args.n, args.seed)
    print(json.dumps(prompts, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
