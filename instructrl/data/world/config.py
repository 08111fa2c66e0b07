"""Presets for the task world: `get_config("smoke" | "tiny" | "small")`.

Sizes are chosen so that the whole InstructGPT pipeline is learnable by ~1M
parameter models on a 2-core CPU: small entity sets, digits, 3-5 word inputs,
and demonstrations that are scarce relative to the prompt space.
"""

import ml_collections

SIZES = ("smoke", "tiny", "small")


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
    if size not in SIZES:
        raise ValueError(f"size: unknown world preset {size!r}; expected one of {SIZES}")
    c = ml_collections.ConfigDict()
    c.size = size                      # name of the preset, recorded in world.json
    c.seed = 0                         # root seed; every file derives its own stream from it

    # --- facts -------------------------------------------------------------
    c.n_countries = 36                 # invented countries, each with a capital
    c.cities_per_country = 4           # cities per country, the capital included
    c.n_people = 72                    # people, each living in one city
    c.n_animals = 32                   # animals, each with a colour and a size

    # --- the pretraining "internet" ----------------------------------------
    c.n_corpus_train = 20_000          # documents in corpus_train.jsonl
    c.n_corpus_valid = 1_000           # held-out documents (alignment-tax loss)
    c.mix_encyclopedia = 0.40          # fact sentences
    c.mix_instructions = 0.25          # instruction lists running on into more instructions
    c.mix_forum = 0.15                 # Q/A threads answered wrongly, off-topic or rudely
    c.mix_qa = 0.20                    # Q/A documents, mostly correct (few-shot helps)
    c.forum_right_rate = 0.2           # fraction of forum answers that happen to be right
    c.qa_right_rate = 0.9              # fraction of Q/A-document answers that are right

    # --- prompts -------------------------------------------------------------
    c.constraint_rate = 0.3            # prompts carrying an extra constraint ("Answer in lowercase.")
    c.insult_rate = 0.2                # "describe" prompts opening with an insult (invites rudeness)
    c.n_demos = 3_000                  # labeler demonstrations for SFT
    c.n_demos_valid = 300              # held-out demonstrations (SFT validation, RM bias)
    c.n_rm_prompts = 2_000             # prompts whose policy samples get ranked for the RM
    c.n_ppo_prompts = 2_000            # prompts for PPO episodes
    c.n_eval_prompts = 500             # held-out test prompts (win rate, Likert)
    c.test_entity_fraction = 0.0       # entities asked about only in eval sets (0: none reserved; eval prompts
                                       # are still new texts). >0 needs knowledge extraction from encyclopedia
                                       # text alone, beyond the ~1M-param CPU models: at 0.25 tiny scored ~0%
                                       # on capital/list/lives
    c.n_truthful = 200                 # fact and false-premise questions
    c.n_toxicity = 200                 # toxicity prompts; half carry "Be respectful."
    c.n_cloze = 300                    # multiple-choice cloze items from the facts

    # --- labelers ------------------------------------------------------------
    c.n_labelers = 20                  # labeler pool, assigned round-robin to groups
    c.n_groups = 5                     # labeler groups (5-fold like the paper)
    c.heldout_group = 4                # held-out evaluator group: no demos, no training rankings
    c.labeler_temperature = 0.13       # Plackett-Luce temperature on utility: 70.9% (training groups) / 73.8%
                                       # (held-out) agreement on tiny SFT samples; 0.39 gave 62-65% there
    c.labeler_temperature_jitter = 0.1 # per-labeler log-normal spread of the temperature
    c.heldout_temperature_scale = 0.9  # held-out evaluators are a bit more consistent (paper: 77.3%)
    c.taste_scale = 0.05               # size of group taste weights (brevity, friendliness, sentences)
    c.demo_error_rate = 0.08           # demonstrations with a wrong answer
    c.demo_max_filler_rate = 0.5       # most filler-prone group adds "Sure! ..." this often
    c.demo_sentence_rate = 0.2         # demos answering facts with a full sentence
    c.demo_constraint_follow = 0.75    # demos that obey an extra constraint
    c.demo_premise_reject = 0.4        # demos that reject a false premise (the rest accept it)
    c.acceptable_threshold = 0.7       # gold score at or above which a response is acceptable
    c.form_credit = 0.2                # share of the score a wrong answer keeps for good form (judge.py)

    if size == "smoke":
        c.n_countries, c.n_people, c.n_animals = 8, 12, 8
        c.n_corpus_train, c.n_corpus_valid = 300, 50
        c.n_demos, c.n_demos_valid = 100, 20
        c.n_rm_prompts = c.n_ppo_prompts = c.n_eval_prompts = 50
        c.n_truthful, c.n_toxicity, c.n_cloze = 40, 20, 40
        c.n_labelers = 10
    elif size == "small":
        c.n_countries, c.n_people, c.n_animals = 60, 120, 40
        c.n_corpus_train, c.n_corpus_valid = 60_000, 3_000
        c.n_demos, c.n_demos_valid = 8_000, 800
        c.n_rm_prompts = c.n_ppo_prompts = 6_000
        c.n_eval_prompts = 1_000
        c.n_truthful, c.n_toxicity, c.n_cloze = 400, 400, 600
    return c


_NONNEG_INT = ("n_corpus_train", "n_corpus_valid", "n_demos", "n_demos_valid", "n_rm_prompts",
               "n_ppo_prompts", "n_eval_prompts", "n_truthful", "n_toxicity", "n_cloze")
_RATES = ("mix_encyclopedia", "mix_instructions", "mix_forum", "mix_qa", "forum_right_rate",
          "qa_right_rate", "constraint_rate", "insult_rate", "demo_error_rate", "demo_max_filler_rate",
          "demo_sentence_rate", "demo_constraint_follow", "demo_premise_reject", "acceptable_threshold", "form_credit",
          "test_entity_fraction")


def validate(c) -> None:
    """Raise ValueError naming the first out-of-range field."""
    def bad(field, why):
        raise ValueError(f"{field}: {why} (got {c[field]!r})")

    if not isinstance(c.seed, int) or c.seed < 0:
        bad("seed", "must be a non-negative int")
    for f in _NONNEG_INT:
        if not isinstance(c[f], int) or c[f] < 0:
            bad(f, "must be a non-negative int")
    for f in _RATES:
        if not 0.0 <= float(c[f]) <= 1.0:
            bad(f, "must lie in [0, 1]")
    if c.n_countries < 4:
        bad("n_countries", "must be at least 4 (two train, two test)")
    if not 2 <= c.cities_per_country <= 6:
        bad("cities_per_country", "must lie in [2, 6]")
    if c.n_people < 4:
        bad("n_people", "must be at least 4 (two train, two test)")
    if c.n_animals < 4:
        bad("n_animals", "must be at least 4 (two train, two test)")
    if c.n_groups < 2:
        bad("n_groups", "must be at least 2 (one held out)")
    if not 0 <= c.heldout_group < c.n_groups:
        bad("heldout_group", f"must lie in [0, n_groups={c.n_groups})")
    if c.n_labelers < 2 * c.n_groups:
        bad("n_labelers", f"must be at least 2 * n_groups = {2 * c.n_groups} (agreement needs pairs)")
    for f in ("labeler_temperature", "heldout_temperature_scale"):
        if not float(c[f]) > 0:
            bad(f, "must be positive")
    for f in ("labeler_temperature_jitter", "taste_scale"):
        if not float(c[f]) >= 0:
            bad(f, "must be non-negative")
    if c.mix_encyclopedia + c.mix_instructions + c.mix_forum + c.mix_qa <= 0:
        bad("mix_encyclopedia", "corpus mixture weights must not all be zero")
