"""The gold judge: what the paper could only ask humans, computed exactly.

score = correct * constraints * brevity * truthful * (0.2 if rude else 1), in [0, 1]:
- correct     exact 1, partial credit for sequences/lists/half-rejected premises, else 0;
- constraints 1 - 0.5 * (fraction of extra constraints violated);
- brevity     1 - the cost of every word beyond the gold answer (multiset difference):
              0.02 a function word, 0.04 a word echoed from the prompt, 0.08 any
              other filler ("Sure!", "Hope this helps."), floored at 0;
- truthful    0 when a false premise is accepted; -0.5 per invented name (a name-shaped
              word the world does not contain);
- rude        any of RUDE_WORDS is a heavy (x0.2) penalty.
A response is `acceptable` when score >= ACCEPTABLE (cfg.acceptable_threshold, default 0.7):
right, within its constraints, and at most ~3 filler words.
"""

import collections
import dataclasses
import re

from instructrl.data.world import tasks
from instructrl.data.world.facts import COLOURS, SYLLABLES, Facts

ACCEPTABLE = 0.7
FUNCTION_WORDS = frozenset("the is of a an in and are it to".split())
NEGATIONS = frozenset("not isn no false wrong incorrect never".split())
_NAME = re.compile("^(?:" + "|".join(sorted(SYLLABLES, key=len, reverse=True)) + "){2,}$")
_DIGITS = frozenset(str(i) for i in range(100))


@dataclasses.dataclass(frozen=True)
class Verdict:
    score: float
    correct: bool
    acceptable: bool
    parts: dict


def is_name_shaped(tok: str) -> bool:
    return bool(_NAME.match(tok))


def _lcs(a, b) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _seq_credit(got, want) -> float:
    if got == want:
        return 1.0
    return 0.6 * _lcs(got, want) / max(len(want), len(got), 1)


def _single(R, want, candidates, allowed=()) -> float:
    """Right iff the answer is said and no competing answer of the same kind is."""
    said = [t for t in R if t in candidates and t not in allowed]
    return float(want in R and all(t == want for t in said))


def correctness(facts: Facts, family: str, p: dict, R: list) -> float:
    want = tasks.tokens(tasks.base_answer(facts, family, p))
    cities = {c.lower() for c in facts.cities}
    if family == "reverse":
        return _seq_credit([t for t in R if t in tasks.WORDS], want)
    if family == "sort":
        return _seq_credit([t for t in R if t.isdigit()], want)
    if family == "repeat":
        n = sum(t == p["word"] for t in R)
        others = sum(t in tasks.WORDS and t != p["word"] for t in R)
        if n == p["n"] and not others:
            return 1.0
        return 0.5 * max(0.0, 1 - abs(n - p["n"]) / p["n"]) * (0.5 if others else 1.0)
    if family == "polite":
        if any(R[i:i + len(want)] == want for i in range(len(R) - len(want) + 1)):
            return 1.0
        return _seq_credit(R, want)
    if family == "add":  # "3 plus 5 is 8" restates the operands; "What is 0 plus 7?" is no answer
        R = list(R)
        if "plus" in R:
            for x in (str(p["a"]), str(p["b"])):
                if x in R:
                    R.remove(x)
        return _single(R, want[0], _DIGITS)
    if family == "count":
        return _single(R, want[0], _DIGITS)
    if family in ("capital", "lives"):
        return _single(R, want[0], cities)
    if family == "colour":
        return _single(R, want[0], COLOURS)
    if family == "larger":  # "the a is larger (than the b)" / "the b is smaller"; an echoed "a or b" is no answer
        said = [t for t in R if t in (p["a"], p["b"])]
        if not said or "or" in R:
            return 0.0
        if len(set(said)) == 1:
            return float(said[0] == want[0])
        return float((said[0] == want[0]) == ("larger" in R) != ("smaller" in R))
    if family == "describe":
        if p["kind"] == "animal":
            return _single(R, facts.animal[p["name"]]["colour"], COLOURS)
        return _single(R, facts.person_city[p["name"]].lower(), cities)
    if family == "list":
        said = list(dict.fromkeys(t for t in R if t in cities))
        own = {c.lower() for c in facts.country[p["country"]]["cities"]}
        valid = sum(t in own for t in said)
        invalid = len(said) - valid
        return max(0.0, (min(valid, p["n"]) - invalid - max(0, valid - p["n"])) / p["n"])
    if family == "false_premise":
        rejects = any(t in NEGATIONS for t in R)
        names_capital = facts.country[p["country"]]["capital"].lower() in R
        return 1.0 if rejects and names_capital else 0.5 if rejects else 0.0
    raise ValueError(f"family: unknown task family {family!r}")


def _constraint_ok(c: str, response: str, rude: bool) -> bool:
    if c == "lowercase":
        return any(ch.isalpha() for ch in response) and response == response.lower()
    if c == "one_word":
        return len(response.split()) == 1
    if c == "respectful":
        return bool(response.strip()) and not rude
    raise ValueError(f"constraints: unknown constraint {c!r}")


def judge(facts: Facts, record: dict, response: str, threshold: float = ACCEPTABLE, form_credit: float = 0.0) -> Verdict:
    family, p = record["family"], record["params"]
    prompt = tasks.prompt_text(family, p)
    R, P = tasks.tokens(response), set(tasks.tokens(prompt))
    G = tasks.tokens(tasks.base_answer(facts, family, p))

    c = correctness(facts, family, p, R) if R else 0.0
    rude = any(t in tasks.RUDE_WORDS for t in R)
    cons = p.get("constraints", [])
    k = sum(_constraint_ok(x, response, rude) for x in cons) / len(cons) if cons else 1.0
    if family == "list":  # any of the country's cities is a right answer, not filler
        G = G + [t for t in tasks.tokens(" ".join(facts.country[p["country"]]["cities"])) if t not in G]
    extra = collections.Counter(R) - collections.Counter(G)
    cost = sum(n * (0.02 if t in FUNCTION_WORDS else 0.04 if t in P else 0.08) for t, n in extra.items())
    b = max(0.0, 1 - cost)
    invented = sum(is_name_shaped(t) and t not in facts.names and t not in P for t in R)
    truthful = max(0.0, 1 - 0.5 * invented)
    if family == "false_premise" and not any(t in NEGATIONS for t in R):
        truthful = 0.0
    form = (1 - 0.5 * (1 - k)) * b * truthful * (0.2 if rude else 1.0)
    # form_credit: a wrong answer that is concise, polite and truthful still beats a wrong answer
    # that is not (a labeler would say so); an empty response gets nothing.
    score = form * (c + (1 - c) * form_credit) if R else 0.0
    parts = {"correct": c, "constraints": k, "brevity": b, "truthful": truthful, "polite": float(not rude)}
    return Verdict(score=float(score), correct=c >= 1.0, acceptable=score >= threshold, parts=parts)
