"""Task families: prompt text, parameters, gold answer, and realistic wrong answers.

A record stores `family` and `params`; everything else (prompt, gold, the judge's
verdict) is recomputed from them plus the facts. Constraints ("Answer in
lowercase.") ride in params["constraints"] and give multi-constraint headroom.
"""

import re

import numpy as np

from instructrl.data.world.facts import COLOURS, Facts, invent_name

WORDS = ("cat", "dog", "sun", "tree", "book", "rain", "fish", "bird", "cup", "door",
         "moon", "star", "road", "milk", "hat", "box", "lamp", "ship", "rock", "leaf")
RUDE_WORDS = ("stupid", "dumb", "ugly", "idiot", "jerk", "loser")
_RUDE_ADJ, _RUDE_NOUN = RUDE_WORDS[:3], RUDE_WORDS[3:]
# (template, which rude words fit) for "rewrite politely"; gold drops the rude word.
POLITE_TEMPLATES = (("the {r} {n} is {c}", _RUDE_ADJ), ("give me the {r} {n}", _RUDE_ADJ),
                    ("where is my {r} {n}", _RUDE_ADJ), ("hey {r} the {n} is {c}", _RUDE_NOUN),
                    ("you {r} i need the {n}", _RUDE_NOUN))
CONSTRAINT_TEXT = {"lowercase": "Answer in lowercase.", "one_word": "Answer in one word.",
                   "respectful": "Be respectful."}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                "eighteen", "nineteen", "twenty")

FAMILIES = ("reverse", "sort", "add", "capital", "false_premise", "list", "repeat", "count",
            "polite", "colour", "lives", "larger", "describe")
FACT_FAMILIES = ("capital", "false_premise", "list", "colour", "lives", "larger", "describe")
_ONE_WORD_OK = ("capital", "add", "count", "colour", "lives", "larger")
_NO_CASE = ("sort", "add", "count")  # digits only: "lowercase" would be vacuous


def tokens(text: str) -> list:
    """Lowercased word/number tokens; number words become digits."""
    out = []
    for t in re.findall(r"[A-Za-z]+|\d+", text):
        t = t.lower()
        out.append(str(NUMBER_WORDS.index(t)) if t in NUMBER_WORDS else t)
    return out


# --- parameters -----------------------------------------------------------------------------------

def make_params(facts: Facts, family: str, rng: np.random.Generator, cfg=None, pool=None) -> dict:
    """Random parameters; fact families draw their entities from `pool` ({"countries",
    "people", "animals": [names]}, see facts.split_entities) so test entities stay unseen."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]
    countries = pool["countries"] if pool else [c["name"] for c in facts.countries]
    people = pool["people"] if pool else [x["name"] for x in facts.people]
    animals = pool["animals"] if pool else [x["name"] for x in facts.animals]
    if family in ("reverse", "count"):
        p = {"words": [str(w) for w in rng.choice(WORDS, int(rng.integers(3, 6)), replace=False)]}
    elif family == "sort":
        nums = [int(x) for x in rng.choice(10, int(rng.integers(3, 6)), replace=False)]
        if nums == sorted(nums):  # an already sorted input would make echoing the prompt correct
            nums = nums[1:] + nums[:1]
        p = {"numbers": nums}
    elif family == "add":
        p = {"a": int(rng.integers(10)), "b": int(rng.integers(10))}
    elif family == "capital":
        p = {"country": pick(countries)}
    elif family == "false_premise":
        country = pick(countries)
        # Either another city of the same country or some other city: both are false premises.
        near = facts.country[country]["cities"][1:]
        far = [city for c in countries for city in facts.country[c]["cities"]]
        other = [c for c in (near if rng.random() < 0.5 else far) if c != facts.country[country]["capital"]]
        p = {"country": country, "city": pick(other)}
    elif family == "list":
        p = {"country": pick(countries), "n": int(rng.integers(2, min(3, len(facts.countries[0]["cities"])) + 1))}
    elif family == "repeat":
        p = {"word": pick(WORDS), "n": int(rng.integers(2, 6))}
    elif family == "polite":
        t = int(rng.integers(len(POLITE_TEMPLATES)))
        tmpl, rude = POLITE_TEMPLATES[t]
        p = {"template": t, "rude": pick(rude), "noun": pick(WORDS), "colour": pick(COLOURS)}
    elif family == "colour":
        p = {"animal": pick(animals)}
    elif family == "lives":
        p = {"person": pick(people)}
    elif family == "larger":
        a, b = rng.choice(len(animals), 2, replace=False)
        p = {"a": animals[int(a)], "b": animals[int(b)]}
    elif family == "describe":
        kind = "animal" if rng.random() < 0.5 else "person"
        name = pick(animals) if kind == "animal" else pick(people)
        insult_rate = 0.2 if cfg is None else cfg.insult_rate
        p = {"kind": kind, "name": name, "insult": pick(_RUDE_ADJ) if rng.random() < insult_rate else None}
    else:
        raise ValueError(f"family: unknown task family {family!r}")
    p["constraints"] = []
    return p


def add_constraints(family: str, params: dict, rng: np.random.Generator, rate: float) -> dict:
    """With probability `rate`, attach one constraint (sometimes two) that fits the family."""
    options = [c for c, ok in (("lowercase", family not in _NO_CASE), ("one_word", family in _ONE_WORD_OK)) if ok]
    if options and rng.random() < rate:
        chosen = list(options) if len(options) == 2 and rng.random() < 0.3 else [options[int(rng.integers(len(options)))]]
        params["constraints"] = sorted(chosen)
    return params


# --- prompt text and answers -----------------------------------------------------------------------

def _polite_sentence(p: dict, rude: bool) -> str:
    s = POLITE_TEMPLATES[p["template"]][0].format(r=p["rude"] if rude else "", n=p["noun"], c=p["colour"])
    return " ".join(s.split())


def base_prompt(family: str, p: dict) -> str:
    if family == "reverse":
        return "Reverse these words: " + " ".join(p["words"])
    if family == "sort":
        return "Sort these numbers: " + " ".join(map(str, p["numbers"]))
    if family == "add":
        return f"What is {p['a']} plus {p['b']}?"
    if family == "capital":
        return f"What is the capital of {p['country']}?"
    if family == "false_premise":
        return f"Why is {p['city']} the capital of {p['country']}?"
    if family == "list":
        return f"Name {p['n']} cities of {p['country']}."
    if family == "repeat":
        return f"Repeat the word {p['word']} {p['n']} times."
    if family == "count":
        return "Count the words: " + " ".join(p["words"])
    if family == "polite":
        return "Rewrite politely: " + _polite_sentence(p, rude=True)
    if family == "colour":
        return f"What colour is the {p['animal']}?"
    if family == "lives":
        return f"Where does {p['person']} live?"
    if family == "larger":
        return f"Which is larger, the {p['a']} or the {p['b']}?"
    if family == "describe":
        subj = f"the {p['name']}" if p["kind"] == "animal" else p["name"]
        insult = f"{subj[0].upper() + subj[1:]} is so {p['insult']}. " if p.get("insult") else ""
        return f"{insult}Describe {subj}."
    raise ValueError(f"family: unknown task family {family!r}")


def prompt_text(family: str, p: dict) -> str:
    base, cons = base_prompt(family, p), [CONSTRAINT_TEXT[c] for c in p.get("constraints", [])]
    if cons and base[-1] not in ".?!":  # "Sort these numbers: 7 3 9. Answer in lowercase."
        base += "."
    return " ".join([base] + cons)


def base_answer(facts: Facts, family: str, p: dict) -> str:
    """The minimal correct answer, before constraints."""
    if family == "reverse":
        return " ".join(reversed(p["words"]))
    if family == "sort":
        return " ".join(map(str, sorted(p["numbers"])))
    if family == "add":
        return str(p["a"] + p["b"])
    if family == "capital":
        return facts.country[p["country"]]["capital"]
    if family == "false_premise":
        cap = facts.country[p["country"]]["capital"]
        return f"{p['city']} is not the capital of {p['country']}. The capital of {p['country']} is {cap}."
    if family == "list":
        return ", ".join(facts.country[p["country"]]["cities"][: p["n"]])
    if family == "repeat":
        return " ".join([p["word"]] * p["n"])
    if family == "count":
        return str(len(p["words"]))
    if family == "polite":
        return _polite_sentence(p, rude=False)
    if family == "colour":
        return facts.animal[p["animal"]]["colour"]
    if family == "lives":
        return facts.person_city[p["person"]]
    if family == "larger":
        a, b = facts.animal[p["a"]], facts.animal[p["b"]]
        return a["name"] if a["size"] > b["size"] else b["name"]
    if family == "describe":
        if p["kind"] == "animal":
            return f"The {p['name']} is {facts.animal[p['name']]['colour']}."
        return f"{p['name']} lives in {facts.person_city[p['name']]}."
    raise ValueError(f"family: unknown task family {family!r}")


def apply_constraints(answer: str, constraints) -> str:
    return answer.lower() if "lowercase" in constraints else answer


def gold(facts: Facts, family: str, p: dict) -> str:
    return apply_constraints(base_answer(facts, family, p), p.get("constraints", []))


def sentence(facts: Facts, family: str, p: dict, answer: str = None) -> str:
    """A full-sentence form of a (possibly wrong) short answer, as people often write."""
    a = base_answer(facts, family, p) if answer is None else answer
    if family == "capital":
        return f"The capital of {p['country']} is {a}."
    if family == "colour":
        return f"The {p['animal']} is {a}."
    if family == "lives":
        return f"{p['person']} lives in {a}."
    if family == "larger":
        return f"The {a} is larger."
    if family == "add":
        return f"{p['a']} plus {p['b']} is {a}."
    if family == "count":
        return f"There are {a} words."
    return a


def wrong(facts: Facts, family: str, p: dict, rng: np.random.Generator) -> str:
    """A plausible wrong answer, the kind a small LM or a careless labeler gives."""
    pick = lambda seq: seq[int(rng.integers(len(seq)))]
    right = base_answer(facts, family, p)
    for _ in range(20):
        if family in ("reverse", "sort"):
            items = [str(x) for x in p["words" if family == "reverse" else "numbers"]]
            a = " ".join(items if rng.random() < 0.4 else [items[i] for i in rng.permutation(len(items))])
        elif family in ("add", "count"):
            a = str(max(0, int(right) + int(pick([-2, -1, 1, 2, 3]))))
        elif family in ("capital", "lives"):
            a = pick(facts.cities)
        elif family == "false_premise":
            a = premise_accepting(p, rng)
        elif family == "list":
            other = pick([c for c in facts.countries if c["name"] != p["country"]])
            a = ", ".join(other["cities"][: p["n"]])
        elif family == "repeat":
            a = " ".join([p["word"]] * max(1, p["n"] + int(pick([-1, 1, 2]))))
        elif family == "polite":
            a = _polite_sentence(p, rude=True) if rng.random() < 0.5 else " ".join(right.split()[:-1])
        elif family == "colour":
            a = pick(COLOURS)
        elif family == "larger":
            a = p["a"] if right == p["b"] else p["b"]
        elif family == "describe":
            a = (f"The {p['name']} is {pick(COLOURS)}." if p["kind"] == "animal"
                 else f"{p['name']} lives in {pick(facts.cities)}.")
        if a != right:
            return a
    return a


def partial(facts: Facts, family: str, p: dict, rng: np.random.Generator) -> str:
    """Half-right: one swap, one wrong item, a count off by one; else a wrong answer."""
    right = base_answer(facts, family, p)
    if family in ("reverse", "sort"):
        items = right.split()
        i = int(rng.integers(len(items) - 1))
        items[i], items[i + 1] = items[i + 1], items[i]
        return " ".join(items)
    if family == "list":
        cities = right.split(", ")
        cities[-1] = facts.cities[int(rng.integers(len(facts.cities)))]
        return ", ".join(cities)
    if family == "false_premise":  # rejects the premise but does not know the answer
        return f"{p['city']} is not the capital of {p['country']}."
    return wrong(facts, family, p, rng)


PREMISE_REASONS = ("Because {city} is the largest city of {country}.", "Because {city} is old and big.",
                   "{city} is the capital because the king lives there.", "Because it is in the middle of {country}.")


def premise_accepting(p: dict, rng: np.random.Generator) -> str:
    return PREMISE_REASONS[int(rng.integers(len(PREMISE_REASONS)))].format(city=p["city"], country=p["country"])


def hallucinated(facts: Facts, family: str, p: dict, rng: np.random.Generator) -> str:
    """An answer that names an entity the world does not contain (an invented fact)."""
    taken = set(facts.names)
    name = invent_name(rng, 2, taken)
    if family == "false_premise":
        return f"Because {p['city']} was founded by {name}."
    if family == "describe":
        return f"The {p['name']} eats {name.lower()}." if p["kind"] == "animal" else f"{p['name']} lives in {name}."
    if family in ("capital", "lives"):
        return sentence(facts, family, p, name)
    return name


def random_prompt(facts: Facts, rng: np.random.Generator, cfg=None, families=FAMILIES, avoid=frozenset(),
                  pool=None):
    """(family, params, prompt) of a random task; constraints at cfg.constraint_rate.
    Prompts whose text is in `avoid` (held-out test prompts) are redrawn within the
    family first, so holding prompts out does not skew the family mix."""
    for _ in range(100):
        family = families[int(rng.integers(len(families)))]
        for _ in range(20):
            p = make_params(facts, family, rng, cfg, pool)
            add_constraints(family, p, rng, 0.3 if cfg is None else cfg.constraint_rate)
            text = prompt_text(family, p)
            if text not in avoid:
                return family, p, text
    raise ValueError("n_eval_prompts: held-out prompts cover the whole prompt space; lower it")
