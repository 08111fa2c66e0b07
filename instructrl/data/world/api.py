"""`World`: facts + labeler pool, reloaded from world.json, with the labelers' and
the judge's behaviour as methods. Everything random takes an explicit Generator."""

import json
import pathlib

import ml_collections
import numpy as np

from instructrl.data.world import judge as judge_lib
from instructrl.data.world import labelers as lab
from instructrl.data.world import tasks
from instructrl.data.world.facts import Facts
from instructrl.errors import MissingInput


class World:
    def __init__(self, cfg, facts: Facts, labelers: list, entities: dict = None):
        self.cfg, self.facts, self.labelers = cfg, facts, list(labelers)
        self.entities = entities  # {"train"|"test": {"countries"|"people"|"animals": [names]}}
        self.holdout = frozenset()  # eval prompt texts; few-shot examples never show one
        self._by_id = {l.id: l for l in self.labelers}

    # --- persistence -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"config": self.cfg.to_dict(), "facts": self.facts.to_dict(), "entities": self.entities,
                "labelers": [dict(vars(l), taste=list(l.taste)) for l in self.labelers]}

    @classmethod
    def load(cls, outdir) -> "World":
        path = pathlib.Path(outdir) / "world.json"
        if not path.exists():
            raise MissingInput(f"{path}: no world there; generate it first (python -m instructrl.main "
                               f"--config=... --workdir=W --stages=world), or point --workdir at a run that has one")
        d = json.loads(path.read_text(encoding="utf-8"))
        ls = [lab.Labeler(**dict(l, taste=tuple(l["taste"]))) for l in d["labelers"]]
        w = cls(ml_collections.ConfigDict(d["config"]), Facts.from_dict(d["facts"]), ls, d.get("entities"))
        evals = [pathlib.Path(outdir) / f for f in ("prompts_eval.jsonl", "truthful_eval.jsonl", "toxicity_eval.jsonl",
                                                     "prompts_dev.jsonl")]
        w.holdout = frozenset(json.loads(line)["prompt"] for f in evals if f.exists()
                              for line in f.read_text(encoding="utf-8").splitlines())
        return w

    # --- labelers --------------------------------------------------------------------------------
    def labeler(self, labeler_id: str) -> lab.Labeler:
        if labeler_id not in self._by_id:
            raise ValueError(f"labeler_id: unknown labeler {labeler_id!r}")
        return self._by_id[labeler_id]

    @property
    def training_labelers(self) -> list:
        """Labelers who demonstrate and whose rankings train the RM: neither the dev nor the held-out group."""
        return [l for l in self.labelers if not l.heldout and not l.dev]

    @property
    def heldout_labelers(self) -> list:
        return [l for l in self.labelers if l.heldout]

    @property
    def dev_labelers(self) -> list:
        return [l for l in self.labelers if l.dev]

    def raters(self, split: str) -> list:
        """The group that judges a split: dev prompts by the dev group, test prompts by the held-out group."""
        if split not in ("dev", "test"):
            raise ValueError(f"split: expected 'dev' or 'test', got {split!r}")
        return self.dev_labelers if split == "dev" else self.heldout_labelers

    def utility(self, record: dict, response: str, labeler_id: str) -> float:
        """Noise-free utility: gold score + the labeler's group taste."""
        l = self.labeler(labeler_id)
        return self.judge(record, response).score + float(np.dot(l.taste, lab.features(response)))

    def rank(self, record: dict, responses: list, labeler_id: str, rng: np.random.Generator) -> list:
        u = [self.utility(record, r, labeler_id) for r in responses]
        return lab.plackett_luce(u, self.labeler(labeler_id).temperature, rng)

    def prefers(self, record: dict, a: str, b: str, labeler_id: str, rng: np.random.Generator) -> float:
        """1 if the labeler ranks a above b, 0 if below, 0.5 for identical texts (nothing to prefer)."""
        if a.strip() == b.strip():
            return 0.5
        return float(self.rank(record, [a, b], labeler_id, rng)[0] == 0)

    def likert(self, record: dict, response: str, labeler_id: str, rng: np.random.Generator) -> int:
        """The labeler's 1-7 rating of one response (labelers.likert)."""
        return lab.likert(self.utility(record, response, labeler_id), self.labeler(labeler_id).temperature, rng)

    def demonstrate(self, record: dict, labeler_id: str, rng: np.random.Generator) -> str:
        return lab.demonstrate(self.facts, self.cfg, record, self.labeler(labeler_id), rng)

    def sample_responses(self, record: dict, n: int, rng: np.random.Generator) -> list:
        return lab.sample_responses(self.facts, record, n, rng)

    # --- judge and formats -----------------------------------------------------------------------
    def judge(self, record: dict, response: str) -> judge_lib.Verdict:
        return judge_lib.judge(self.facts, record, response, self.cfg.get("acceptable_threshold", judge_lib.ACCEPTABLE))

    def gold(self, record: dict) -> str:
        return tasks.gold(self.facts, record["family"], record["params"])

    def few_shot_prefix(self, rng: np.random.Generator, k: int = 2) -> str:
        """k solved examples in the corpus Q/A format; the prompted baseline appends
        "Q: " + prompt + "\\nA:". Plain questions only: the prefix teaches the format, not the behaviours."""
        shots = []
        for _ in range(k):
            pool = self.entities["train"] if self.entities else None
            family, p, q = tasks.plain_prompt(self.facts, rng, self.cfg, avoid=self.holdout, pool=pool)
            shots.append(f"Q: {q}\nA: {tasks.gold(self.facts, family, p)}\n\n")
        return "".join(shots)

    @staticmethod
    def format_prompt(prompt_text: str) -> str:
        return prompt_text + "\n"
