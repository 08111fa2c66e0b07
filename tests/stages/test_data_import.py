"""The import stage (stages/data_import.py) on the public excerpts in tests/fixtures/public and a local GPT-2:
which prompt lands in which split (no prompt both trained on and held out, the two RMs on disjoint
prompts), that nothing read is lost or altered beyond the template, and that a rerun writes nothing while
another data config is refused naming the field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="needs the `hf` extra (a local GPT-2 is made with transformers)")

from configs import public  # noqa: E402
from instructrl.data import readers  # noqa: E402
from instructrl.stages import data_import  # noqa: E402
from tests.hf import hf_fixtures  # noqa: E402

PUB = hf_fixtures.FIX / "public"
DEMOS = [PUB / "self_instruct_seed_tasks_first10.jsonl", PUB / "self_instruct_user_oriented_first5.jsonl"]
RANKINGS = [PUB / "oasst_en_5_trees.jsonl", PUB / "hh_harmless_base_test_first8.jsonl.gz"]
LOTTERY = PUB / "oasst_prompt_lottery_first10.jsonl"
PTX = PUB / "tinyshakespeare_head.txt"
# First Human turns of ranked conversations (one OpenAssistant tree root, one HH-RLHF single-turn prompt):
# put in a prompts file bare, the template makes them the rankings' prompts exactly.
SHARED = ["Who invented the honeycomb?", "What will happen if I drive my car into the water?"]
RANKING_FILES = ("rankings_train", "rankings_valid", "rankings_judge_train", "rankings_judge_valid")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return hf_fixtures.gpt2_with_tokenizer(tmp_path_factory.mktemp("import") / "gpt2")


def make_config(hf_dir, seed=0, **data):
  c = public.get_config("smoke")
  c.seed = seed
  c.data.update(hf_dir=str(hf_dir), demos=",".join(map(str, DEMOS)), rankings=",".join(map(str, RANKINGS)),
                prompts=str(LOTTERY), ptx=str(PTX))
  c.data.update(**data)
  return c


def write_prompts(path: Path, prompts: list[str]) -> str:
  path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
  return str(path)


def prompts(files, *names) -> set[str]:
  return {r["prompt"] for n in names for r in files[n]}


def ranked_records() -> list[dict]:
  return [r for p in RANKINGS for r in readers.read(p, kind="ranked")]


def as_model_record(r, template):
  return {**r, "prompt": data_import.model_prompt(r["prompt"], template),
          "responses": [data_import.model_response(x) for x in r["responses"]]}


def canon(records) -> list[str]:
  return sorted(json.dumps(r, sort_keys=True) for r in records)


# (id, data fields beside make_config's; "{tmp}" in a value is the test's tmp_path). Each mode draws its
# prompt pool differently: a prompts file that repeats two ranked prompts, the rankings' own prompts, an
# explicit held-out file (two ranked prompts and two of the prompts file).
MODES = {
    "prompts file sharing ranked prompts": lambda tmp: dict(
        prompts=write_prompts(tmp / "prompts.jsonl", [json.loads(l) for l in LOTTERY.read_text().splitlines()]
                              + SHARED)),
    "prompts from the rankings": lambda tmp: dict(prompts=""),
    "explicit eval prompts": lambda tmp: dict(
        eval_prompts=write_prompts(tmp / "eval.jsonl", SHARED + [json.loads(l) for l in
                                                                 LOTTERY.read_text().splitlines()[:2]])),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", list(MODES))
def test_splits_keep_prompts_apart(hf_dir, tmp_path, mode, seed):
  """The judge RM and the policy's RM train on disjoint prompts; the report's prompts are trained on by no
  stage and are not dev prompts; dev prompts are not PPO's; every held-out split is non-empty."""
  c = make_config(hf_dir, seed, **MODES[mode](tmp_path))
  files = data_import.build(c)[0]
  judge, policy = prompts(files, *RANKING_FILES[2:]), prompts(files, *RANKING_FILES[:2])
  ranked, ppo = judge | policy, prompts(files, "prompts_ppo")
  held, dev = prompts(files, "prompts_eval"), prompts(files, "prompts_dev")
  assert judge and policy and not judge & policy
  assert held and not held & (ppo | ranked | dev)
  assert not dev & (ppo | ranked)
  assert ppo
  if mode == "prompts from the rankings":   # PPO samples the policy RM's prompts, never the judge's
    assert ppo <= policy
  if mode == "explicit eval prompts":
    given = [json.loads(l) for l in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert held == {data_import.model_prompt(p, c.data.prompt_template) for p in given}
  for name in ("demos_valid", "corpus_valid", "rankings_valid", "rankings_judge_valid"):
    assert files[name], name


def test_shared_prompts_are_really_shared(hf_dir, tmp_path):
  """The modes above test something: SHARED, templated, are prompts of the rankings read."""
  template = make_config(hf_dir).data.prompt_template
  ranked = {data_import.model_prompt(r["prompt"], template) for r in ranked_records()}
  assert {data_import.model_prompt(p, template) for p in SHARED} <= ranked


@pytest.mark.parametrize("mode", list(MODES))
def test_nothing_read_is_lost(hf_dir, tmp_path, mode):
  """Demos and ptx text are split, not dropped; a ranking is dropped only when its prompt is held out
  (eval or dev); the PPO prompts are the pool less those."""
  c = make_config(hf_dir, **MODES[mode](tmp_path))
  files = data_import.build(c)[0]
  t = c.data.prompt_template
  demos = [r for p in DEMOS for r in readers.read(p, kind="demo")]
  assert canon(files["demos_train"] + files["demos_valid"]) == canon(
      [{"prompt": t.format(prompt=r["prompt"]), "response": data_import.model_response(r["response"])}
       for r in demos])
  assert canon(files["corpus_train"] + files["corpus_valid"]) == canon(readers.read(PTX, kind="text"))
  held_out = prompts(files, "prompts_eval", "prompts_dev")
  expected = [r for r in (as_model_record(r, t) for r in ranked_records()) if r["prompt"] not in held_out]
  assert canon(sum((files[n] for n in RANKING_FILES), [])) == canon(expected)
  assert len(expected) < len(ranked_records()) or mode == "prompts file sharing ranked prompts"
  if c.data.prompts:
    pool = {data_import.model_prompt(r["prompt"], t) for r in readers.read(c.data.prompts, kind="prompt")}
    assert prompts(files, "prompts_ppo") == pool - held_out


def test_template_for_bare_prompts_transcripts_kept_and_one_space(hf_dir):
  """Bare prompts (instructions, the prompt lottery) get data.prompt_template; HH-RLHF and OpenAssistant
  transcripts are kept byte for byte; every response starts with exactly one space."""
  template = "### Question\n{prompt}\n### Answer:"
  files = data_import.build(make_config(hf_dir, prompt_template=template))[0]
  instructions = {r["prompt"] for p in DEMOS for r in readers.read(p, kind="demo")}
  assert prompts(files, "demos_train", "demos_valid") == {template.format(prompt=p) for p in instructions}
  lottery = {template.format(prompt=r["prompt"]) for r in readers.read(LOTTERY, kind="prompt")}
  assert prompts(files, "prompts_ppo", "prompts_dev", "prompts_eval") <= lottery
  transcripts = {r["prompt"] for r in ranked_records()}
  assert all(p.startswith("\n\nHuman: ") and p.endswith("\n\nAssistant:") for p in transcripts)
  assert prompts(files, *RANKING_FILES) <= transcripts
  responses = [r["response"] for n in ("demos_train", "demos_valid") for r in files[n]] + [
      x for n in RANKING_FILES for r in files[n] for x in r["responses"]]
  assert responses and all(r.startswith(" ") and not r[1].isspace() for r in responses)


def tree(root: Path) -> dict:
  """Every file under root: its bytes' sha256 and its mtime (a rewrite with the same bytes changes it)."""
  return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
  w = tmp_path_factory.mktemp("imported") / "w"
  data_import.run(make_config(hf_dir), w)
  return w


def test_import_writes_the_layout_and_a_marker(imported):
  assert sorted(p.name for p in imported.iterdir()) == ["data", "pretrain"]
  m = json.loads((imported / "data" / "COMPLETE").read_text())
  for name, n in m["counts"].items():
    assert len((imported / "data" / f"{name}.jsonl").read_text().splitlines()) == n, name
  files = {p.relative_to(imported / "data").as_posix() for p in (imported / "data").rglob("*") if p.is_file()}
  assert set(m["files"]) == files - {"COMPLETE"}
  assert (imported / "data" / "tokenizer" / "tokenizer.json").is_file()
  tok = data_import.load_tokenizer(imported / "data")
  assert (tok.vocab_size, tok.eos_id) == (m["tokenizer"]["vocab_size"], m["tokenizer"]["eos_id"])


def test_rerun_writes_nothing(hf_dir, imported):
  before = tree(imported)
  data_import.run(make_config(hf_dir), imported)
  assert tree(imported) == before


def test_same_seed_same_bytes_in_another_workdir(hf_dir, imported, tmp_path):
  data_import.run(make_config(hf_dir), tmp_path / "w2")
  strip = lambda t: {k: v[0] for k, v in t.items()}
  assert strip(tree(tmp_path / "w2" / "data")) == strip(tree(imported / "data"))
  # ... and the seed decides: another one splits otherwise (so the equality above can fail).
  assert data_import.build(make_config(hf_dir, seed=1))[0] != data_import.build(make_config(hf_dir))[0]


@pytest.mark.parametrize("change, needle", [
    (dict(valid_fraction=0.2), "data.valid_fraction: imported 0.1, config 0.2"),
    (dict(prompt_template="Q: {prompt}\nA:"), "data.prompt_template: imported"),
    (dict(ptx=""), "data.ptx: imported"),
    (dict(seed=3), "seed: imported 0, config 3"),
])
def test_another_data_config_is_refused_naming_the_field(hf_dir, imported, change, needle):
  """By the stage and by main's pre-flight (before the lock and config.json); the workdir is untouched."""
  from instructrl import main
  c = make_config(hf_dir, **change)
  before = tree(imported)
  with pytest.raises(data_import.DataMismatch, match="use a new --workdir") as e:
    data_import.run(c, imported)
  assert needle in str(e.value)
  data_import.fill_model(c, imported)
  with pytest.raises(data_import.DataMismatch) as e:
    main.preflight(c, imported, ["import", "sft"])
  assert needle in str(e.value)
  assert tree(imported) == before


def test_a_training_setting_is_not_a_data_change(hf_dir, imported):
  """Control for the refusals above: a field outside data (and seed) does not touch the import."""
  c = make_config(hf_dir)
  c.sft.learning_rate = 1e-3
  before = tree(imported)
  data_import.run(c, imported)
  assert tree(imported) == before


def test_an_interrupted_import_starts_over(hf_dir, imported, tmp_path):
  """What a kill leaves (a half-written W/data.tmp, a W/pretrain without a complete step) is replaced, and the
  result is the uninterrupted import's."""
  w = tmp_path / "w"
  (w / "data.tmp" / "tokenizer").mkdir(parents=True)
  (w / "data.tmp" / "demos_train.jsonl").write_text('{"prompt": "half')
  (w / "pretrain" / "0").mkdir(parents=True)
  data_import.run(make_config(hf_dir), w)
  assert sorted(p.name for p in w.iterdir()) == ["data", "pretrain"]
  strip = lambda t: {k: v[0] for k, v in t.items()}
  assert strip(tree(w / "data")) == strip(tree(imported / "data"))
  from instructrl import checkpoints
  assert checkpoints.recorded_meta(w / "pretrain")["complete"]


def first_turn(prompt: str) -> str:
  return prompt.split("\n\nAssistant:", 1)[0]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_splits_keep_conversations_apart(hf_dir, seed):
  """OpenAssistant trees as the prompt pool (every prompter turn, as docs/real_data.md's recipe reads them):
  a held-out prompt's conversation (its first Human turn) is trained on by no stage, and the judge RM's
  conversations are not the policy RM's."""
  files = data_import.build(make_config(hf_dir, seed, prompts=str(RANKINGS[0])))[0]
  turns = lambda *names: {first_turn(r["prompt"]) for n in names for r in files[n]}
  trained = turns(*RANKING_FILES, "prompts_ppo")
  assert turns("prompts_eval") and not turns("prompts_eval") & (trained | turns("prompts_dev"))
  assert not turns("prompts_dev") & trained
  assert not turns(*RANKING_FILES[2:]) & turns(*RANKING_FILES[:2])
