"""The constraint table: explicit, surface-checkable instructions a prompt may carry ("Answer in one
word.", "Start with 'Answer:'."). A family lists the ones its answers can obey in `Family.fits`
(families.py); the gold answer applies them in ORDER, the judge checks each on the response's surface.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Constraint:
    text: str
    apply: Callable      # (answer, family, facts, params) -> answer obeying it
    check: Callable      # (response, rude) -> bool
    excludes: tuple = ()


def _numbered(a: str, *_) -> str:
    return " ".join(f"{i}. {x}" for i, x in enumerate(a.split(", "), 1))


CONSTRAINTS = {
    "sentence": Constraint("Answer in a full sentence.", lambda a, fam, f, p: fam.sentence(f, p, a),
                           lambda r, rude: len(r.split()) >= 4 and r.rstrip().endswith("."), ("one_word",)),
    "one_word": Constraint("Answer in one word.", lambda a, *_: a,
                           lambda r, rude: len(r.split()) == 1, ("sentence", "opening")),
    "numbered": Constraint("Answer as a numbered list.", _numbered,
                           lambda r, rude: bool(re.search(r"(^|\s)1\.\s", r)) and bool(re.search(r"\s2\.\s", r))),
    "opening": Constraint("Start with 'Answer:'.", lambda a, *_: "Answer: " + a,
                          lambda r, rude: r.lower().startswith("answer:"), ("one_word",)),
    "lowercase": Constraint("Answer in lowercase.", lambda a, *_: a.lower(),
                            lambda r, rude: any(ch.isalpha() for ch in r) and r == r.lower()),
    "respectful": Constraint("Be respectful.", lambda a, *_: a, lambda r, rude: bool(r.strip()) and not rude),
}
ORDER = tuple(CONSTRAINTS)   # application order: the form first, lowercase last


def apply_constraints(facts, fam, p: dict, answer: str, constraints) -> str:
    """`answer` to family `fam`'s prompt with params p, made to obey `constraints`."""
    for c in ORDER:
        if c in constraints:
            answer = CONSTRAINTS[c].apply(answer, fam, facts, p)
    return answer


def draw_constraints(fam, rng, two_rate: float) -> list:
    """One constraint that fits family `fam`, two (compatible) with probability two_rate."""
    fits = list(fam.fits)
    first = fits[int(rng.integers(len(fits)))]
    chosen = [first]
    rest = [c for c in fits if c != first and c not in CONSTRAINTS[first].excludes
            and first not in CONSTRAINTS[c].excludes]
    if rest and rng.random() < two_rate:
        chosen.append(rest[int(rng.integers(len(rest)))])
    return sorted(chosen)
