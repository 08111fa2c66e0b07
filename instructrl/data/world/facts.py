"""The world's facts: invented countries, cities, people and animals.

Names are built from a small syllable set so a ~1000-piece tokenizer splits them
into a few reusable pieces, and so a model can plausibly *invent* a name (which
the judge then flags as an invented fact).
"""

import dataclasses
import re

import numpy as np

SYLLABLES = ("ba", "ka", "lo", "mi", "ra", "ven", "tor", "sel", "du", "ni", "po", "zar",
             "te", "vo", "lin", "ash", "mer", "qui", "fen", "ol", "ru", "dan", "si", "gul")
_NAME_SHAPED = re.compile("^(?:" + "|".join(sorted(SYLLABLES, key=len, reverse=True)) + "){2,}$")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "grey")


def is_name_shaped(tok: str) -> bool:
    """Whether a lowercased token could be a name of this world (two or more of its syllables)."""
    return bool(_NAME_SHAPED.match(tok))


def invent_name(rng: np.random.Generator, n_syll: int, taken: set, capital: bool = True) -> str:
    """A fresh pronounceable name not in `taken` (which it updates)."""
    while True:
        name = "".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), n_syll))
        name = name.capitalize() if capital else name
        if name.lower() not in taken:
            taken.add(name.lower())
            return name


@dataclasses.dataclass
class Facts:
    countries: list  # [{"name", "capital", "cities": [capital, other, ...]}]
    people: list     # [{"name", "city"}]
    animals: list    # [{"name", "colour", "size"}]; size decides "larger than"

    def __post_init__(self):
        # Lookups used by tasks and the judge (derived, never serialised).
        self.country = {c["name"]: c for c in self.countries}
        self.city_country = {city: c["name"] for c in self.countries for city in c["cities"]}
        self.person_city = {p["name"]: p["city"] for p in self.people}
        self.animal = {a["name"]: a for a in self.animals}
        self.cities = sorted(self.city_country)
        self.names = {n.lower() for n in list(self.country) + self.cities + list(self.person_city) + list(self.animal)}

    def to_dict(self) -> dict:
        return {"countries": self.countries, "people": self.people, "animals": self.animals}

    @classmethod
    def from_dict(cls, d: dict) -> "Facts":
        return cls(d["countries"], d["people"], d["animals"])


def make_facts(cfg, rng: np.random.Generator) -> Facts:
    taken: set = set()
    countries = []
    for _ in range(cfg.n_countries):
        name = invent_name(rng, int(rng.integers(2, 4)), taken)
        cities = [invent_name(rng, 2, taken) for _ in range(cfg.cities_per_country)]
        countries.append({"name": name, "capital": cities[0], "cities": cities})
    all_cities = [city for c in countries for city in c["cities"]]
    people = [{"name": invent_name(rng, 2, taken), "city": all_cities[int(rng.integers(len(all_cities)))]}
              for _ in range(cfg.n_people)]
    # Animals are lowercase common nouns ("the zarlo"); sizes are a permutation so "larger" is total.
    sizes = rng.permutation(cfg.n_animals) + 1
    animals = [{"name": invent_name(rng, 2, taken, capital=False),
                "colour": COLOURS[int(rng.integers(len(COLOURS)))], "size": int(s)} for s in sizes]
    return Facts(countries, people, animals)


def split_entities(facts: Facts, rng: np.random.Generator, test_fraction: float) -> dict:
    """Disjoint train/test pools of countries, people and animals: fact prompts for
    evaluation ask about entities no demonstration or training prompt asked about
    (the model still knows them from the pretraining corpus)."""
    out = {"train": {}, "test": {}}
    if test_fraction == 0:   # no reserved entities: eval prompts are new texts about known entities
        for key, items in (("countries", facts.countries), ("people", facts.people), ("animals", facts.animals)):
            out["train"][key] = out["test"][key] = sorted(x["name"] for x in items)
        return out
    for key, items in (("countries", facts.countries), ("people", facts.people), ("animals", facts.animals)):
        names = [items[int(i)]["name"] for i in rng.permutation(len(items))]
        k = min(max(2, round(test_fraction * len(names))), len(names) - 2)  # "larger" needs two of each
        out["test"][key], out["train"][key] = sorted(names[:k]), sorted(names[k:])
    return out
