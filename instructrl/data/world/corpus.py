"""The pretraining "internet": fluent, factual, and misaligned the way GPT-3 is.

- encyclopedia: true sentences about the facts (the model learns what it knows);
- instructions: task prompts one per line with no answers, so a bare "prompt\\n"
  is continued by another instruction (the blog post's "Explain X ... Explain Y ...");
- forum: "Q: ...\\nA: ..." threads answered wrongly, off-topic or rudely;
- qa: the same format, the facts mostly right (so few-shot prompting helps) but with the internet's
  habits (each family's `internet`, families.py): false premises accepted, answers invented where the
  world has none, insults answered in kind, and constraints ignored (cfg.internet_* rates). So prompted
  GPT knows the facts but not the behaviours the labelers reward.
"""

import numpy as np

from instructrl.data.world import labelers, tasks
from instructrl.data.world.facts import Facts

KINDS = ("encyclopedia", "instructions", "forum", "qa")


def _country_doc(f: Facts, c: dict, rng) -> list:
    others = c["cities"][1:]
    s = [f"{c['name']} is a country.", f"The capital of {c['name']} is {c['capital']}."]
    s += [f"{city} is a city in {c['name']}." for city in others]
    if rng.random() < 0.5:
        s.append(f"The cities of {c['name']} are {', '.join(c['cities'])}.")
    people = [p for p in f.people if p["city"] in c["cities"]]
    for i in rng.permutation(len(people))[: int(rng.integers(0, 3))]:
        s.append(f"{people[int(i)]['name']} lives in {people[int(i)]['city']}.")
    return s


def _person_doc(f: Facts, p: dict, rng) -> list:
    country = f.city_country[p["city"]]
    return [f"{p['name']} lives in {p['city']}.", f"{p['city']} is a city in {country}.",
            f"The capital of {country} is {f.country[country]['capital']}."][: int(rng.integers(2, 4))]


def _animal_doc(f: Facts, a: dict, rng) -> list:
    s = [f"The {a['name']} is an animal.", f"The {a['name']} is {a['colour']}."]
    for j in rng.choice(len(f.animals), 2, replace=False):
        b = f.animals[int(j)]
        if b["name"] != a["name"]:
            rel = "larger" if a["size"] > b["size"] else "smaller"
            s.append(f"The {a['name']} is {rel} than the {b['name']}.")
    return s


def encyclopedia(f: Facts, rng) -> str:
    r = rng.random()
    if r < 0.4:
        s = _country_doc(f, f.countries[int(rng.integers(len(f.countries)))], rng)
    elif r < 0.7:
        s = _person_doc(f, f.people[int(rng.integers(len(f.people)))], rng)
    else:
        s = _animal_doc(f, f.animals[int(rng.integers(len(f.animals)))], rng)
    return " ".join(s)


def instructions(f: Facts, rng, cfg, avoid) -> str:
    return "\n".join(tasks.random_prompt(f, rng, cfg, avoid=avoid)[2] for _ in range(int(rng.integers(3, 7))))


def _qa(q: str, a: str) -> str:
    return f"Q: {q}\nA: {a}"


def forum(f: Facts, rng, cfg, avoid) -> str:
    out = []
    for _ in range(int(rng.integers(1, 4))):
        family, p, q = tasks.random_prompt(f, rng, cfg, avoid=avoid)
        rec = {"family": family, "params": p}
        r = rng.random()
        if r < cfg.forum_right_rate:   # right, in the internet's habits (never the gold form by design)
            a = tasks.FAMILIES[family].internet(f, cfg, p, rng)
        else:
            kind = ("wrong", "rude", "off_topic", "continue", "hallucinated")[int(rng.integers(5))]
            a = labelers._response(f, rec, kind, rng)
        out.append(_qa(q, a))
    return "\n\n".join(out)


def internet_answer(f: Facts, cfg, family: str, p: dict, rng) -> str:
    """A Q/A document's answer: right at cfg.qa_right_rate, in the internet's habits (see module doc)."""
    fam = tasks.FAMILIES[family]
    if rng.random() >= cfg.qa_right_rate:
        return fam.wrong(f, p, rng)
    a = fam.internet(f, cfg, p, rng)
    if p.get("constraints") and rng.random() >= cfg.internet_ignores_constraints:
        a = tasks.gold(f, family, p)
    return a


def qa(f: Facts, rng, cfg, avoid) -> str:
    out = []
    for _ in range(int(rng.integers(2, 5))):
        family, p, q = tasks.random_prompt(f, rng, cfg, avoid=avoid)
        out.append(_qa(q, internet_answer(f, cfg, family, p, rng)))
    return "\n\n".join(out)


def documents(f: Facts, cfg, n: int, rng: np.random.Generator, avoid=frozenset()):
    """Yield n {"text": ...} records drawn from the configured mixture; prompts in
    `avoid` (the held-out test prompts) never appear, so evaluation is uncontaminated."""
    w = np.array([cfg.mix_encyclopedia, cfg.mix_instructions, cfg.mix_forum, cfg.mix_qa], np.float64)
    kinds = rng.choice(len(KINDS), size=n, p=w / w.sum())
    for k in kinds:
        if k == 0:
            text = encyclopedia(f, rng)
        elif k == 1:
            text = instructions(f, rng, cfg, avoid)
        elif k == 2:
            text = forum(f, rng, cfg, avoid)
        else:
            text = qa(f, rng, cfg, avoid)
        yield {"text": text}
