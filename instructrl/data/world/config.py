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
    c.version = 2                      # world v2: behaviour-rich prompts, additive judge, dev split
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
    # Prompt-mix slots (families.SLOTS) of the RM, PPO, dev and eval prompts: 79% carry a behaviour visible
    # in the text (a constraint, a false premise, a question the world has no answer to, an insult).
    c.prompt_mix = ml_collections.ConfigDict(dict(
        constrained=0.45, false_premise=0.12, unanswerable=0.12, insult=0.10, plain=0.14, computation=0.07))
    # The labelers' demonstrations under-cover those behaviours, as the paper's labeler-written prompts
    # differed from its API prompts (section 3.2): SFT learns facts and format, rarely the behaviours.
    c.demo_mix = ml_collections.ConfigDict(dict(
        constrained=0.04, false_premise=0.015, unanswerable=0.015, insult=0.02, plain=0.76, computation=0.15))
    c.two_constraint_rate = 0.3        # constrained prompts carrying a second (compatible) constraint
    c.respectful_rate = 0.5            # insult prompts adding "Be respectful."
    c.n_demos = 3_000                  # labeler demonstrations for SFT
    c.n_demos_valid = 300              # held-out demonstrations (SFT validation, RM bias)
    c.n_rm_prompts = 2_000             # prompts whose policy samples get ranked for the RM
    c.n_ppo_prompts = 2_000            # prompts for PPO episodes
    c.n_dev_prompts = 500              # dev prompts: every tuning decision is read here, by the dev group
    c.n_eval_prompts = 500             # held-out test prompts (win rate, Likert), read once per final config
    c.test_entity_fraction = 0.0       # entities asked about only in eval sets (0: none reserved; eval prompts
                                       # are still new texts). >0 needs knowledge extraction from encyclopedia
                                       # text alone, beyond the ~1M-param CPU models: at 0.25 tiny scored ~0%
                                       # on capital/list/lives
    c.n_truthful = 200                 # false-premise, unanswerable and fact questions
    c.n_toxicity = 200                 # insult prompts; half carry "Be respectful."
    c.n_cloze = 300                    # multiple-choice cloze items from the facts

    # --- the internet's habits (corpus Q/A and forum answers) --------------------------------------
    c.internet_ignores_constraints = 0.9   # answers in its own form whatever the prompt asks
    c.internet_accepts_premises = 0.9      # "Because Venmi is old and big."
    c.internet_invents = 0.9               # "The king of Zarlo is Mibatu."
    c.internet_rude = 0.5                  # answers an insult prompt in kind

    # --- labelers ------------------------------------------------------------
    c.n_labelers = 20                  # labeler pool, assigned round-robin to groups
    c.n_groups = 5                     # labeler groups (5-fold like the paper)
    c.heldout_group = 4                # held-out evaluator group: no demos, no training rankings; rates test
    c.dev_group = 3                    # dev evaluator group: no demos, no training rankings; rates dev prompts
    c.labeler_temperature = 0.15       # Plackett-Luce temperature on utility, set for the paper's 72.6% agreement
                                       # on tiny's RM comparisons (0.13 gave 76.5%; docs/world.md)
    c.labeler_temperature_jitter = 0.1 # per-labeler log-normal spread of the temperature
    c.heldout_temperature_scale = 0.9  # held-out (and dev) evaluators are a bit more consistent (paper: 77.3%)
    c.taste_scale = 0.05               # size of group taste weights (brevity, friendliness, sentences)
    c.demo_error_rate = 0.08           # demonstrations with a wrong answer
    c.demo_max_filler_rate = 0.5       # most filler-prone group adds "Sure! ..." this often
    c.demo_sentence_rate = 0.3         # demos answering facts with a full sentence (no constraint asked)
    c.demo_constraint_follow = 0.7     # demos that obey the prompt's constraints
    c.demo_premise_reject = 0.6        # demos that reject a false premise (the rest accept it)
    c.demo_hedge = 0.6                 # demos that hedge on an unanswerable question (the rest invent)
    c.demo_insult_echo = 0.5           # demos to insult prompts that repeat the insult ("... So dumb.")
    c.acceptable_threshold = 0.7       # gold score at or above which a response is acceptable

    if size == "smoke":
        c.n_countries, c.n_people, c.n_animals = 8, 12, 8
        c.n_corpus_train, c.n_corpus_valid = 300, 50
        c.n_demos, c.n_demos_valid = 100, 20
        c.n_rm_prompts = c.n_ppo_prompts = c.n_eval_prompts = c.n_dev_prompts = 50
        c.n_truthful, c.n_toxicity, c.n_cloze = 40, 20, 40
        c.n_labelers = 10
    elif size == "small":
        c.n_countries, c.n_people, c.n_animals = 60, 120, 40
        c.n_corpus_train, c.n_corpus_valid = 60_000, 3_000
        c.n_demos, c.n_demos_valid = 8_000, 800
        c.n_rm_prompts = c.n_ppo_prompts = 6_000
        c.n_eval_prompts = c.n_dev_prompts = 1_000
        c.n_truthful, c.n_toxicity, c.n_cloze = 400, 400, 600
    return c


_NONNEG_INT = ("n_corpus_train", "n_corpus_valid", "n_demos", "n_demos_valid", "n_rm_prompts",
               "n_ppo_prompts", "n_dev_prompts", "n_eval_prompts", "n_truthful", "n_toxicity", "n_cloze")
_RATES = ("mix_encyclopedia", "mix_instructions", "mix_forum", "mix_qa", "forum_right_rate",
          "qa_right_rate", "two_constraint_rate", "respectful_rate", "demo_error_rate", "demo_max_filler_rate",
          "demo_sentence_rate", "demo_constraint_follow", "demo_premise_reject", "demo_hedge", "demo_insult_echo",
          "acceptable_threshold", "test_entity_fraction", "internet_ignores_constraints",
          "internet_accepts_premises", "internet_invents", "internet_rude")
SLOT_NAMES = ("plain", "constrained", "computation", "false_premise", "unanswerable", "insult")


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
    if not 0 <= c.heldout_group < c.n_groups:
        bad("heldout_group", f"must lie in [0, n_groups={c.n_groups})")
    if not 0 <= c.dev_group < c.n_groups or c.dev_group == c.heldout_group:
        bad("dev_group", f"must lie in [0, n_groups={c.n_groups}) and differ from heldout_group={c.heldout_group}")
    if c.n_groups < 3:
        bad("n_groups", "must be at least 3 (training, dev and held-out groups)")
    for mix in ("prompt_mix", "demo_mix"):
        got = dict(c[mix])
        if set(got) - set(SLOT_NAMES) or any(not float(v) >= 0 for v in got.values()) or sum(got.values()) <= 0:
            raise ValueError(f"{mix}: expected non-negative weights, not all zero, over the slots {SLOT_NAMES} "
                             f"(got {got!r})")
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
