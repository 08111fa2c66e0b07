"""Simulated labelers: demonstrations, rankings, and the candidate responses they see.

utility(labeler, response) = gold score + group taste . features(response); a ranking
is Plackett-Luce over utility / temperature, drawn by sorting utility / T + Gumbel noise,
so any pair is ordered with P = sigmoid((u_a - u_b) / T): Bradley-Terry, which is what
the RM's pairwise loss assumes. The temperature is calibrated so that two training
labelers agree on ~72.6% of pairs (the paper's figure).
"""

import dataclasses

import numpy as np

from instructrl.data.world import tasks
from instructrl.data.world.facts import invent_name
from instructrl.data.world.families import HEDGE, RUDE_REPLIES

OPENERS = ("Sure! ", "Of course. ", "Here is the answer: ", "Good question! ", "Happy to help. ")
CLOSERS = (" Hope this helps.", " Let me know if you need more.")
OFF_TOPIC = ("I do not know.", "Nobody knows.", "Why do you ask?", "Good luck with that.",
             "I like the {animal}.", "I went to {city} once.")
# (name, weight) of the candidate-response mixture; see sample_responses.
RESPONSE_KINDS = (("correct", 0.22), ("filler", 0.10), ("sentence", 0.06), ("ignore_constraint", 0.04),
                  ("wrong", 0.16), ("partial", 0.08), ("rude", 0.07), ("continue", 0.09),
                  ("hallucinated", 0.05), ("hedge", 0.03), ("off_topic", 0.04), ("echo", 0.03), ("empty", 0.03))
TASTES = ("short", "friendly", "sentence")  # the features group tastes weigh


@dataclasses.dataclass(frozen=True)
class Labeler:
    id: str
    group: int
    heldout: bool          # member of the held-out evaluator group
    temperature: float     # Plackett-Luce temperature: lower = more consistent
    taste: tuple           # weights on TASTES features, shared by the group
    filler_rate: float     # how often this labeler's demos open with "Sure! ..." (group habit)
    dev: bool = False      # member of the dev group: rates dev prompts for tuning, never trained on


def make_labelers(cfg, rng: np.random.Generator) -> list:
    groups = []
    for g in range(cfg.n_groups):
        filler = float(rng.uniform(0, cfg.demo_max_filler_rate))
        taste = cfg.taste_scale * rng.normal(size=len(TASTES))
        # A group that writes "Sure! ..." also likes reading it: taste and habit agree.
        taste[1] = cfg.taste_scale * (2 * filler / max(cfg.demo_max_filler_rate, 1e-9) - 1)
        groups.append((tuple(round(float(x), 6) for x in taste), round(filler, 6)))
    out = []
    for i in range(cfg.n_labelers):
        g = i % cfg.n_groups
        held, dev = g == cfg.heldout_group, g == cfg.dev_group
        t = cfg.labeler_temperature * float(np.exp(cfg.labeler_temperature_jitter * rng.normal()))
        t *= cfg.heldout_temperature_scale if held or dev else 1.0   # the dev group stands in for the held-out one
        out.append(Labeler(f"L{i:02d}", g, held, round(t, 6), groups[g][0], groups[g][1], dev))
    return out


def features(response: str) -> np.ndarray:
    n = len(tasks.tokens(response))
    friendly = response.startswith(tuple(o.strip() for o in OPENERS)) or response.endswith(tuple(c.strip() for c in CLOSERS))
    sentence = response.rstrip().endswith(".") and n >= 4
    return np.array([-min(n, 20) / 20, float(friendly), float(sentence)])


def plackett_luce(utilities, temperature: float, rng: np.random.Generator) -> list:
    """Indices best first: sort utility / T + Gumbel noise (an exact Plackett-Luce draw)."""
    z = np.asarray(utilities, np.float64) / temperature + rng.gumbel(size=len(utilities))
    return [int(i) for i in np.argsort(-z, kind="stable")]


def likert(utility: float, temperature: float, rng: np.random.Generator) -> int:
    """A 1-7 quality rating: the utility (gold score + taste, ~[0, 1]) on a 7-point scale, with
    Gaussian noise of sd temperature / 2 in utility units (a labeler's rating is noisier than
    their pairwise preference is consistent; ~1.2 points at the calibrated temperature)."""
    return int(np.clip(np.rint(1 + 6 * (utility + rng.normal(0.0, temperature / 2))), 1, 7))


def demonstrate(facts, cfg, record: dict, labeler: Labeler, rng: np.random.Generator) -> str:
    """Mostly right and concise, following the family's demonstration policy (families.py: errors,
    false premises rejected and unanswerable questions hedged at configured rates); constraints obeyed
    at cfg.demo_constraint_follow, else the labeler's habits (full sentences, the group's filler).
    The headroom RLHF finds is mostly in which prompts labelers demonstrate (cfg.demo_mix)."""
    family, p = record["family"], record["params"]
    fam = tasks.FAMILIES[family]
    ans = fam.demo_content(facts, cfg, p, rng)
    cons = p.get("constraints", [])
    if [c for c in cons if c != "respectful"] and rng.random() < cfg.demo_constraint_follow:
        return tasks.apply_constraints(facts, family, p, ans, cons)
    if fam.kind in ("fact", "insult") and rng.random() < cfg.demo_sentence_rate and fam.answer(facts, p) == ans:
        ans = fam.sentence(facts, p, ans)
    if rng.random() < labeler.filler_rate:
        ans = OPENERS[int(rng.integers(len(OPENERS)))] + ans
    return ans


def sample_responses(facts, record: dict, n: int, rng: np.random.Generator) -> list:
    """n candidates of mixed quality, like samples from a small, partly aligned LM."""
    names, w = zip(*RESPONSE_KINDS)
    w = np.array(w) / sum(w)
    return [_response(facts, record, names[int(rng.choice(len(names), p=w))], rng) for _ in range(n)]


def _response(facts, record: dict, kind: str, rng: np.random.Generator) -> str:
    family, p = record["family"], record["params"]
    fam = tasks.FAMILIES[family]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]
    gold = tasks.gold(facts, family, p)
    if kind == "correct" or (kind == "ignore_constraint" and not p.get("constraints")):
        return gold
    if kind == "filler":
        return pick(OPENERS) + gold + (pick(CLOSERS) if rng.random() < 0.3 else "")
    if kind == "sentence":
        return fam.sentence(facts, p, fam.answer(facts, p))
    if kind == "ignore_constraint":
        return fam.answer(facts, p).upper() if rng.random() < 0.3 else fam.sentence(facts, p, fam.answer(facts, p))
    if kind == "wrong":
        return fam.wrong(facts, p, rng)
    if kind == "partial":
        return fam.partial(facts, p, rng)
    if kind == "rude":
        return pick(RUDE_REPLIES) if rng.random() < 0.5 else gold + " " + pick(RUDE_REPLIES)
    if kind == "continue":  # the pretrained habit: the "answer" is the next instruction
        return tasks.prompt_text(*tasks.random_prompt(facts, rng, _MIX_ALL, mix=_MIX_ALL.prompt_mix)[:2])
    if kind == "hallucinated":
        return hallucinated(facts, record, rng)
    if kind == "hedge":
        return HEDGE
    if kind == "off_topic":
        return pick(OFF_TOPIC).format(animal=pick(facts.animals)["name"], city=pick(facts.cities))
    if kind == "echo":
        return tasks.prompt_text(family, p)
    if kind == "empty":
        return ""
    raise ValueError(f"kind: unknown response kind {kind!r}")


def hallucinated(facts, record: dict, rng: np.random.Generator) -> str:
    """An answer that states a fact the world does not contain (an invented name)."""
    family, p = record["family"], record["params"]
    fam = tasks.FAMILIES[family]
    if fam.kind == "unanswerable":
        return fam.wrong(facts, p, rng)
    name = invent_name(rng, 2, set(facts.names))
    if fam.kind == "false_premise":
        return f"Because {p['city']} was founded by {name}."
    return fam.sentence(facts, p, name) if fam.kind in ("fact", "insult") else name


class _AllSlots:
    """A config stand-in for drawing any prompt at all (the candidate mixture's "continue" kind)."""
    prompt_mix = {s: 1.0 for s in tasks.SLOTS}
    two_constraint_rate, respectful_rate = 0.3, 0.5


_MIX_ALL = _AllSlots()
