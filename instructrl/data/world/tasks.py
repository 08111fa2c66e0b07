"""Prompts and answers of the task families (the table is families.py).

A record stores `family` and `params`; everything else (prompt, gold, the judge's verdict) is
recomputed from them plus the facts. Constraints ("Answer in one word.") ride in
params["constraints"].
"""

from __future__ import annotations

import numpy as np

from instructrl.data.world.facts import Facts
from instructrl.data.world import constraints as constraints_lib
from instructrl.data.world.constraints import CONSTRAINTS
from instructrl.data.world.families import FAMILIES, RUDE_REPLIES, RUDE_WORDS, SLOTS, WORDS, hedges, tokens

__all__ = ["CONSTRAINTS", "FAMILIES", "RUDE_REPLIES", "RUDE_WORDS", "SLOTS", "WORDS", "tokens", "hedges",
           "make_params", "prompt_text", "base_answer", "gold", "sentence", "wrong", "partial", "behaviour",
           "random_prompt", "plain_prompt", "FAMILY_NAMES", "apply_constraints", "draw_constraints"]

FAMILY_NAMES = tuple(FAMILIES)


def _family(name: str):
    if name not in FAMILIES:
        raise ValueError(f"family: unknown task family {name!r}; expected one of {FAMILY_NAMES}")
    return FAMILIES[name]


def make_params(facts: Facts, family: str, rng: np.random.Generator, pool: dict = None) -> dict:
    """Random parameters without constraints; entities come from `pool` ({"countries", "people",
    "animals": [names]}, see facts.split_entities), default every entity."""
    pool = pool or {"countries": [c["name"] for c in facts.countries], "people": [x["name"] for x in facts.people],
                    "animals": [x["name"] for x in facts.animals]}
    return dict(_family(family).params(facts, rng, pool), constraints=[])


def prompt_text(family: str, p: dict) -> str:
    base, cons = _family(family).prompt(p), [CONSTRAINTS[c].text for c in p.get("constraints", [])]
    if cons and base[-1] not in ".?!":   # "Count the words: cat dog. Answer in one word."
        base += "."
    return " ".join([base] + cons)


def base_answer(facts: Facts, family: str, p: dict) -> str:
    """The minimal correct answer, before constraints."""
    return _family(family).answer(facts, p)


def apply_constraints(facts: Facts, family: str, p: dict, answer: str, constraints) -> str:
    return constraints_lib.apply_constraints(facts, _family(family), p, answer, constraints)


def draw_constraints(family: str, rng: np.random.Generator, two_rate: float) -> list:
    return constraints_lib.draw_constraints(_family(family), rng, two_rate)


def gold(facts: Facts, family: str, p: dict) -> str:
    return apply_constraints(facts, family, p, base_answer(facts, family, p), p.get("constraints", []))


def sentence(facts: Facts, family: str, p: dict, answer: str = None) -> str:
    a = base_answer(facts, family, p) if answer is None else answer
    return _family(family).sentence(facts, p, a)


def wrong(facts: Facts, family: str, p: dict, rng: np.random.Generator) -> str:
    return _family(family).wrong(facts, p, rng)


def partial(facts: Facts, family: str, p: dict, rng: np.random.Generator) -> str:
    return _family(family).partial(facts, p, rng)


def behaviour(record: dict) -> str:
    """The prompt's slot: "constrained" when it carries a form constraint, else its family's kind
    ("plain" for a bare fact question)."""
    fam = _family(record["family"])
    if fam.kind == "fact":
        return "constrained" if record["params"].get("constraints") else "plain"
    return fam.kind


def _draw(facts, rng, slot: str, cfg, pool) -> tuple:
    names = SLOTS[slot]
    family = names[int(rng.integers(len(names)))]
    p = make_params(facts, family, rng, pool)
    if slot == "constrained":
        p["constraints"] = draw_constraints(family, rng, cfg.two_constraint_rate)
    elif slot == "insult" and rng.random() < cfg.respectful_rate:
        p["constraints"] = ["respectful"]
    return family, p


def random_prompt(facts: Facts, rng: np.random.Generator, cfg, mix=None, avoid=frozenset(), pool=None):
    """(family, params, prompt) of a random task, the slot drawn from `mix` ({slot: weight}; default
    cfg.prompt_mix). Prompts whose text is in `avoid` (held-out prompts) are redrawn within the slot
    first, so holding prompts out does not skew the mix."""
    mix = dict(cfg.prompt_mix if mix is None else mix)
    slots = [s for s in SLOTS if mix.get(s, 0) > 0]
    w = np.array([mix[s] for s in slots], np.float64)
    for _ in range(100):
        slot = slots[int(rng.choice(len(slots), p=w / w.sum()))]
        for _ in range(20):
            family, p = _draw(facts, rng, slot, cfg, pool)
            text = prompt_text(family, p)
            if text not in avoid:
                return family, p, text
    raise ValueError("n_eval_prompts: held-out prompts cover the whole prompt space; lower it")


def plain_prompt(facts: Facts, rng: np.random.Generator, cfg, avoid=frozenset(), pool=None):
    """A fact or computation question without any behaviour: few-shot examples show the format only."""
    return random_prompt(facts, rng, cfg, {"plain": 0.75, "computation": 0.25}, avoid, pool)
