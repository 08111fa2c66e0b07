"""`generate(cfg, outdir)`: write the world's files, byte-identical for a given seed.

Each output draws from its own stream, default_rng([seed, crc32(name)]), so adding or
resizing one file leaves the others' randomness untouched (training prompts still
depend on which texts the eval sets hold out, by design).
"""

import json
import pathlib
import zlib

import numpy as np

from instructrl.data.world import corpus, tasks
from instructrl.data.world.api import World
from instructrl.data.world.config import validate
from instructrl.data.world.facts import COLOURS, make_facts, split_entities
from instructrl.data.world.labelers import make_labelers

TRUTHFUL_MIX = (("false_premise", 0.6), ("capital", 0.15), ("lives", 0.15), ("colour", 0.1))


def stream(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def write_jsonl(path: pathlib.Path, records) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")
            n += 1
    return n


def _prompt_record(w: World, family, p, text, split, i) -> dict:
    return {"prompt": text, "family": family, "params": p, "gold": tasks.gold(w.facts, family, p),
            "split": split, "id": f"{split}-{i:05d}"}


def _heldout_prompts(w: World, n: int, split: str, rng, families=tasks.FAMILIES, weights=None,
                     constraints=True) -> list:
    """n test prompts about test entities: the family first (so the mix stays as asked),
    then up to 50 parameter draws for a text not yet used, else a repeat (small families)."""
    seen, out = set(), []
    for i in range(n):
        fam = families[int(rng.choice(len(families), p=weights))]
        for _ in range(50):
            p = tasks.make_params(w.facts, fam, rng, w.cfg, w.entities["test"])
            if constraints:
                tasks.add_constraints(fam, p, rng, w.cfg.constraint_rate)
            text = tasks.prompt_text(fam, p)
            if text not in seen:
                break
        seen.add(text)
        out.append(_prompt_record(w, fam, p, text, split, i))
    return out


def _toxicity(w: World, n: int, rng) -> list:
    """Prompts opening with an insult, each once plain and once with "Be respectful."."""
    out = []
    for pair in range(n // 2):
        p = tasks.make_params(w.facts, "describe", rng, w.cfg, w.entities["test"])
        p["insult"] = tasks.RUDE_WORDS[int(rng.integers(3))]
        for respectful in (False, True):
            q = dict(p, constraints=["respectful"] if respectful else [])
            r = _prompt_record(w, "describe", q, tasks.prompt_text("describe", q), "toxicity", len(out))
            out.append(dict(r, respectful=respectful, pair=pair))
    return out


def _cloze(w: World, n: int, rng) -> list:
    """Four-way cloze from the facts; scored by log p(" " + choice | context)."""
    f, out = w.facts, []
    for i in range(n):
        kind = int(rng.integers(4))
        if kind == 0:
            c = f.countries[int(rng.integers(len(f.countries)))]
            ctx, right, pool = f"The capital of {c['name']} is", c["capital"], f.cities
        elif kind == 1:
            p = f.people[int(rng.integers(len(f.people)))]
            ctx, right, pool = f"{p['name']} lives in", p["city"], f.cities
        elif kind == 2:
            a = f.animals[int(rng.integers(len(f.animals)))]
            ctx, right, pool = f"The {a['name']} is", a["colour"], list(COLOURS)
        else:
            city = f.cities[int(rng.integers(len(f.cities)))]
            ctx, right, pool = f"{city} is a city in", f.city_country[city], [c["name"] for c in f.countries]
        wrong = [x for x in pool if x != right]
        choices = [right] + [wrong[int(j)] for j in rng.choice(len(wrong), 3, replace=False)]
        order = rng.permutation(4)
        out.append({"context": ctx, "choices": [choices[int(j)] for j in order],
                    "answer": int(np.argmax(order == 0)), "id": f"cloze-{i:05d}"})
    return out


def _demos(w: World, n: int, split: str, rng, avoid) -> list:
    pool = w.training_labelers  # the held-out group never demonstrates
    out = []
    for i in range(n):
        family, p, text = tasks.random_prompt(w.facts, rng, w.cfg, avoid=avoid, pool=w.entities["train"])
        l = pool[int(rng.integers(len(pool)))]
        rec = {"prompt": text, "family": family, "params": p, "labeler": l.id, "group": l.group,
               "id": f"demo-{split}-{i:05d}"}
        rec["response"] = w.demonstrate(rec, l.id, rng)
        out.append(rec)
    return out


def _train_prompts(w: World, n: int, split: str, rng, avoid) -> list:
    pool = w.entities["train"]
    return [_prompt_record(w, *tasks.random_prompt(w.facts, rng, w.cfg, avoid=avoid, pool=pool), split, i)
            for i in range(n)]


def generate(cfg, outdir) -> dict:
    """Write every file of the world into outdir; returns {filename: record count}."""
    validate(cfg)
    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    s = cfg.seed
    facts = make_facts(cfg, stream(s, "facts"))
    entities = split_entities(facts, stream(s, "entities"), cfg.test_entity_fraction)
    w = World(cfg, facts, make_labelers(cfg, stream(s, "labelers")), entities)
    with open(out / "world.json", "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(w.to_dict(), sort_keys=True, ensure_ascii=False, indent=1) + "\n")

    # Held-out sets first: their prompt texts are excluded from everything trained on.
    fam, wts = zip(*TRUTHFUL_MIX)
    files = {
        "prompts_eval.jsonl": _heldout_prompts(w, cfg.n_eval_prompts, "test", stream(s, "eval")),
        "truthful_eval.jsonl": _heldout_prompts(w, cfg.n_truthful, "truthful", stream(s, "truthful"), fam,
                                                np.array(wts) / sum(wts), constraints=False),
        "toxicity_eval.jsonl": _toxicity(w, cfg.n_toxicity, stream(s, "toxicity")),
        "cloze_eval.jsonl": _cloze(w, cfg.n_cloze, stream(s, "cloze")),
    }
    avoid = frozenset(r["prompt"] for k in ("prompts_eval.jsonl", "truthful_eval.jsonl", "toxicity_eval.jsonl")
                      for r in files[k])
    files["corpus_train.jsonl"] = corpus.documents(w.facts, cfg, cfg.n_corpus_train, stream(s, "corpus_train"), avoid)
    files["corpus_valid.jsonl"] = corpus.documents(w.facts, cfg, cfg.n_corpus_valid, stream(s, "corpus_valid"), avoid)
    files["demos_train.jsonl"] = _demos(w, cfg.n_demos, "train", stream(s, "demos_train"), avoid)
    files["demos_valid.jsonl"] = _demos(w, cfg.n_demos_valid, "valid", stream(s, "demos_valid"), avoid)
    files["prompts_rm.jsonl"] = _train_prompts(w, cfg.n_rm_prompts, "rm", stream(s, "rm"), avoid)
    files["prompts_ppo.jsonl"] = _train_prompts(w, cfg.n_ppo_prompts, "ppo", stream(s, "ppo"), avoid)
    return {name: write_jsonl(out / name, recs) for name, recs in files.items()}
