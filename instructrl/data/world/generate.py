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
from instructrl.data.world.facts import make_facts, split_entities
from instructrl.data.world.labelers import make_labelers

# The TruthfulQA analog: false premises, questions the world has no answer to, and plain fact questions.
TRUTHFUL_MIX = {"false_premise": 0.4, "unanswerable": 0.4, "plain": 0.2}


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


def _heldout_prompts(w: World, n: int, split: str, rng, mix=None, avoid=frozenset()) -> list:
    """n distinct prompts about test entities drawn from `mix` (default the world's prompt_mix), none
    of them in `avoid`; when a slot's texts run out, the slot is redrawn (random_prompt's rule)."""
    seen, out = set(avoid), []
    for i in range(n):
        family, p, text = tasks.random_prompt(w.facts, rng, w.cfg, mix, avoid=seen, pool=w.entities["test"])
        seen.add(text)
        out.append(_prompt_record(w, family, p, text, split, i))
    return out


def _toxicity(w: World, n: int, rng) -> list:
    """Insult prompts, each once plain and once with "Be respectful."."""
    out = []
    for pair in range(n // 2):
        p = tasks.make_params(w.facts, "insult", rng, w.entities["test"])
        for respectful in (False, True):
            q = dict(p, constraints=["respectful"] if respectful else [])
            r = _prompt_record(w, "insult", q, tasks.prompt_text("insult", q), "toxicity", len(out))
            out.append(dict(r, respectful=respectful, pair=pair))
    return out


# Cloze kinds and their shares. The first version (one fact, three random distractors of the right type)
# was saturated: 99-100% for GPT, SFT, PPO and PPO-ptx on tiny, so it could not show an alignment tax.
# Every kind here has plausible distractors and needs what the pretraining corpus teaches:
# - larger: the size order of the animals, stated pair by pair in encyclopedia text (never whole): one
#   of the 3 next smaller animals among the 3 next larger ones;
# - count: the Q/A documents' word counting, the distractors within 2 of the answer;
# - capital / lives: which city of a country is its capital, or where a person lives, the distractors
#   being the same country's other cities (every model knows these: they anchor the scale).
# Tried and dropped on tiny's models: Q/A addition with near sums (19-24% for every model, below
# chance: not learned), Q/A sorting against reorderings (100% for every model). Measured: README,
# "Alignment tax".
CLOZE_KINDS = (("larger", 0.5), ("count", 0.3), ("capital", 0.1), ("lives", 0.1))


def _cloze_item(w: World, kind: str, rng):
    """(context, right answer, distractors, fallback distractors) of one item; None when this draw
    cannot make one. The fallback tops the distractors up to three in worlds with fewer cities a country."""
    f = w.facts
    pick = lambda seq: seq[int(rng.integers(len(seq)))]
    if kind == "larger":
        # Near in the order: the answer is among the 3 next smaller animals, the distractors are the 3
        # next larger ones (any smaller vs any larger was 95% for GPT: far pairs are easy).
        a = pick(f.animals)
        smaller = [b["name"] for b in f.animals if 0 < a["size"] - b["size"] <= 3]
        larger = [b["name"] for b in f.animals if 0 < b["size"] - a["size"] <= 3]
        if not smaller or len(larger) < 3:
            return None
        return f"The {a['name']} is larger than the", pick(smaller), larger, []
    if kind == "capital":
        c = pick(f.countries)
        return f"The capital of {c['name']} is", c["capital"], c["cities"][1:], f.cities
    if kind == "lives":
        p = pick(f.people)
        return f"{p['name']} lives in", p["city"], f.country[f.city_country[p["city"]]]["cities"], f.cities
    if kind == "count":
        q = tasks.make_params(f, "count", rng)
        n = len(q["words"])
        return f"Q: {tasks.prompt_text('count', q)}\nA:", str(n), [str(n + d) for d in (-2, -1, 1, 2) if n + d > 0], []
    raise ValueError(f"cloze kind: unknown {kind!r}; expected one of {[k for k, _ in CLOZE_KINDS]}")


def _cloze(w: World, n: int, rng) -> list:
    """Four-way multiple choice, scored by log p(" " + choice | context); see CLOZE_KINDS."""
    # "larger" needs an animal with a smaller one and three larger ones: at least 5 animals.
    kinds, shares = zip(*[(k, s) for k, s in CLOZE_KINDS if k != "larger" or len(w.facts.animals) >= 5])
    out = []
    while len(out) < n:
        kind = kinds[int(rng.choice(len(kinds), p=np.array(shares) / sum(shares)))]
        got = None
        while got is None:   # redraw the same kind (redrawing the kind would skew the shares)
            got = _cloze_item(w, kind, rng)
        ctx, right, near, far = got
        wrong = sorted(set(near) - {right})
        wrong = [wrong[int(j)] for j in rng.permutation(len(wrong))[:3]]
        far = sorted(set(far) - {right} - set(wrong))
        wrong += [far[int(j)] for j in rng.choice(len(far), 3 - len(wrong), replace=False)]
        choices = [right] + wrong
        order = rng.permutation(4)
        out.append({"context": ctx, "choices": [choices[int(j)] for j in order], "kind": kind,
                    "answer": int(np.argmax(order == 0)), "id": f"cloze-{len(out):05d}"})
    return out


def _demos(w: World, n: int, split: str, rng, avoid) -> list:
    pool = w.training_labelers  # the held-out and dev groups never demonstrate
    out = []
    for i in range(n):
        family, p, text = tasks.random_prompt(w.facts, rng, w.cfg, w.cfg.demo_mix, avoid=avoid,
                                              pool=w.entities["train"])
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

    # Held-out sets first: their prompt texts are excluded from everything trained on. The dev split is
    # drawn like the test split but disjoint from it: tuning reads dev, the report reads test once.
    files = {
        "prompts_eval.jsonl": _heldout_prompts(w, cfg.n_eval_prompts, "test", stream(s, "eval")),
        "truthful_eval.jsonl": _heldout_prompts(w, cfg.n_truthful, "truthful", stream(s, "truthful"), TRUTHFUL_MIX),
        "toxicity_eval.jsonl": _toxicity(w, cfg.n_toxicity, stream(s, "toxicity")),
        "cloze_eval.jsonl": _cloze(w, cfg.n_cloze, stream(s, "cloze")),
    }
    test = frozenset(r["prompt"] for k in ("prompts_eval.jsonl", "truthful_eval.jsonl", "toxicity_eval.jsonl")
                     for r in files[k])
    files["prompts_dev.jsonl"] = _heldout_prompts(w, cfg.n_dev_prompts, "dev", stream(s, "dev"), avoid=test)
    avoid = test | {r["prompt"] for r in files["prompts_dev.jsonl"]}
    files["corpus_train.jsonl"] = corpus.documents(w.facts, cfg, cfg.n_corpus_train, stream(s, "corpus_train"), avoid)
    files["corpus_valid.jsonl"] = corpus.documents(w.facts, cfg, cfg.n_corpus_valid, stream(s, "corpus_valid"), avoid)
    files["demos_train.jsonl"] = _demos(w, cfg.n_demos, "train", stream(s, "demos_train"), avoid)
    files["demos_valid.jsonl"] = _demos(w, cfg.n_demos_valid, "valid", stream(s, "demos_valid"), avoid)
    files["prompts_rm.jsonl"] = _train_prompts(w, cfg.n_rm_prompts, "rm", stream(s, "rm"), avoid)
    files["prompts_ppo.jsonl"] = _train_prompts(w, cfg.n_ppo_prompts, "ppo", stream(s, "ppo"), avoid)
    return {name: write_jsonl(out / name, recs) for name, recs in files.items()}
