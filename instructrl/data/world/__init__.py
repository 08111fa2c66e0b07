"""The embedded task world: facts, task families, a pretraining "internet",
simulated labelers and a gold judge, generated from a seed in seconds.

    from instructrl.data import world
    cfg = world.get_config("tiny")
    world.generate(cfg, "runs/tiny/world")
    w = world.World.load("runs/tiny/world")
    w.judge(record, response).score
"""

from instructrl.data.world.api import World
from instructrl.data.world.config import SIZES, get_config, validate
from instructrl.data.world.facts import Facts
from instructrl.data.world.generate import generate
from instructrl.data.world.judge import ACCEPTABLE, Verdict
from instructrl.data.world.constraints import CONSTRAINTS
from instructrl.data.world.labelers import CLOSERS, OFF_TOPIC, OPENERS, Labeler
from instructrl.data.world.families import RUDE_REPLIES
from instructrl.data.world.tasks import FAMILY_NAMES as FAMILIES, RUDE_WORDS

# Every fixed phrase labelers or the judge's tables use, for the tokenizer's coverage.
PHRASES = tuple(OPENERS + CLOSERS + OFF_TOPIC + RUDE_REPLIES) + tuple(c.text for c in CONSTRAINTS.values())

__all__ = ["PHRASES", "World", "SIZES", "get_config", "validate", "Facts", "generate", "ACCEPTABLE", "Verdict",
           "Labeler", "FAMILIES", "RUDE_WORDS"]
