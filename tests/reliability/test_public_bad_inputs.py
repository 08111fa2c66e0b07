"""Bad inputs to a public-data run (configs/public.py), each refused with an error that names the file:line or
the config field, before the import stage writes anything: no W/data, no W/data.tmp, no W/pretrain.

Groups: data files (the import stage reads them all before writing), the checkpoint's tokenizer, the
config (data.prompt_template, the stages a files run may run; config_check on main's path), the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="needs the `hf` extra (a local GPT-2 is made with transformers)")

from configs import instructgpt, public  # noqa: E402
from instructrl.config_check import check_config  # noqa: E402
from instructrl.data.records import RecordError  # noqa: E402
from instructrl.errors import ConfigError, UserError  # noqa: E402
from instructrl.stages import data_import  # noqa: E402
from tests.cli_helpers import cli_env  # noqa: E402
from tests.hf import hf_fixtures  # noqa: E402
from tests.reliability.test_config_refusals import assert_one_error_line, tree  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PUB = hf_fixtures.FIX / "public"
GOOD = dict(demos=f"{PUB / 'self_instruct_seed_tasks_first10.jsonl'}",
            rankings=f"{PUB / 'oasst_en_5_trees.jsonl'},{PUB / 'hh_harmless_base_test_first8.jsonl.gz'}",
            prompts=f"{PUB / 'oasst_prompt_lottery_first10.jsonl'}", ptx=f"{PUB / 'tinyshakespeare_head.txt'}")
K1 = '{"prompt": "y", "responses": ["a", "b"], "ranking": [1, 0]}\n{"prompt": "x", "responses": ["a"], "ranking": [0]}\n'


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return hf_fixtures.gpt2_with_tokenizer(tmp_path_factory.mktemp("bad") / "gpt2")


def make_config(checkpoint, **data):
  c = public.get_config("smoke")
  c.data.update(hf_dir=str(checkpoint), **GOOD)
  c.data.update(**data)
  return c


def write(path: Path, text: str) -> str:
  path.write_text(text)
  return str(path)


def with_config_json(hf_dir: Path, dest: Path, **changes) -> str:
  """A copy of the checkpoint directory whose config.json differs (the weights stay; the import's check
  reads config.json and the tokenizer before it reads any weight)."""
  shutil.copytree(hf_dir, dest)
  cfg = json.loads((dest / "config.json").read_text())
  (dest / "config.json").write_text(json.dumps({**cfg, **changes}))
  return str(dest)


# (id, data fields (a function of tmp_path and the GPT-2 dir), error type, words the message must hold).
# "{tmp}" in a needle is tmp_path.
BAD = [
    ("rankings record with K = 1 at line 2",
     lambda t, h: dict(rankings=f"{PUB / 'oasst_en_5_trees.jsonl'},{write(t / 'k1.jsonl', K1)}"),
     RecordError, ["{tmp}/k1.jsonl:2:", "K >= 2", "K=1"]),
    ("empty prompts file", lambda t, h: dict(prompts=write(t / "p.jsonl", "")), RecordError,
     ["{tmp}/p.jsonl", "no records"]),
    ("prompts file of blank lines", lambda t, h: dict(prompts=write(t / "p.jsonl", "\n  \n\t\n\n")), RecordError,
     ["{tmp}/p.jsonl", "no records"]),
    ("empty ptx file", lambda t, h: dict(ptx=write(t / "x.txt", "\n\n")), RecordError, ["{tmp}/x.txt:1:", "no text"]),
    ("a text file as prompts", lambda t, h: dict(prompts=GOOD["ptx"]), ConfigError,
     ["data.prompts", "tinyshakespeare_head.txt", "plain text file holds text records"]),
    ("demos as rankings", lambda t, h: dict(rankings=GOOD["demos"]), RecordError,
     ["self_instruct_seed_tasks_first10.jsonl:1:", "expected ranked records"]),
    ("a folder that is no dataset as demos", lambda t, h: dict(demos=str(t)), ConfigError,
     ["data.demos", "dataset_info.json"]),
    ("missing demos file", lambda t, h: dict(demos=str(t / "nope.jsonl")), ConfigError,
     ["data.demos=", "{tmp}/nope.jsonl does not exist"]),
    ("second rankings file missing", lambda t, h: dict(rankings=f"{GOOD['prompts']},{t / 'gone.jsonl.gz'}"),
     ConfigError, ["data.rankings=", "gone.jsonl.gz does not exist"]),
    ("missing ptx file", lambda t, h: dict(ptx=str(t / "nope.txt")), ConfigError, ["data.ptx=", "does not exist"]),
    ("hf_dir without config.json", lambda t, h: dict(hf_dir=str(t)), ConfigError, ["data.hf_dir=", "config.json"]),
    ("missing tokenizer", lambda t, h: dict(tokenizer=str(t / "tok.json")), ConfigError,
     ["data.tokenizer", "{tmp}/tok.json: no such file"]),
    ("tokenizer larger than the model's vocabulary",
     lambda t, h: dict(hf_dir=with_config_json(h, t / "small", vocab_size=700)), ConfigError,
     ["data.tokenizer=", "has 800 tokens, the checkpoint's vocabulary 700"]),
    ("EOS other than config.json's", lambda t, h: dict(hf_dir=with_config_json(h, t / "eos", eos_token_id=7)),
     ConfigError, ["data.tokenizer=", "eos_token_id=7", "data.eos_id=7"]),
    ("an EOS id past the vocabulary", lambda t, h: dict(eos_id=5000), ConfigError, ["data.eos_id=5000", "below 800"]),
    ("held-out prompts that are all the PPO prompts", lambda t, h: dict(eval_prompts=GOOD["prompts"]), ConfigError,
     ["data.prompts=", "no PPO prompt is left"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_data_is_refused_before_anything_is_written(case, hf_dir, tmp_path):
  _, data, error, needles = case
  config = make_config(hf_dir, **data(tmp_path, hf_dir))
  w = tmp_path / "w"
  w.mkdir()
  (w / "notes.txt").write_text("the user's")
  with pytest.raises(error) as e:
    data_import.run(config, w)
  assert isinstance(e.value, UserError)   # one `error:` line on the command line, not a traceback
  for needle in needles:
    assert needle.format(tmp=tmp_path) in str(e.value), (needle, str(e.value))
  assert sorted(p.name for p in w.iterdir()) == ["notes.txt"]


def test_following_the_eos_advice_imports(hf_dir, tmp_path):
  """Control for the EOS refusal: data.eos_id, as the message suggests, makes the same files import."""
  config = make_config(hf_dir, hf_dir=with_config_json(hf_dir, tmp_path / "eos", eos_token_id=7), eos_id=7)
  files, tokenizer, _, _ = data_import.build(config)
  assert tokenizer.eos_id == 7 and files["prompts_eval"]


def checked(config, stages, workdir=None):
  """main's order: the checkpoint's model into config.model, then check_config."""
  if "data" in config and config.data.source == "files":
    data_import.fill_model(config, workdir or Path("/nonexistent-workdir"))
  check_config(config, n_devices=1, stages=stages)


@pytest.mark.parametrize("template, needle", [
    ("Question: {{prompt}}\nAnswer:", "containing {prompt} and no other field"),   # a literal: one prompt for all
    ("Q: the prompt\nA:", "containing {prompt}"),
    ("{user} {prompt}", "(it has {user})"),
    ("{prompt.title}", "(it has {prompt.title})"),
    ("{prompt} {0}", "(it has {0})"),
    ("Q: {prompt", "expected '}' before end of string"),
    ("Q: {prompt\nA:", "unmatched '{'"),
    ("{prompt:{width}}", "KeyError('width')"),
])
def test_bad_templates_are_refused_by_config_check(hf_dir, template, needle):
  with pytest.raises(ConfigError) as e:
    checked(make_config(hf_dir, prompt_template=template), ["import", "sft"])
  assert str(e.value).startswith(f"data.prompt_template={template!r}: expected"), str(e.value)
  assert needle in str(e.value)


@pytest.mark.parametrize("template", ["\n\nHuman: {prompt}\n\nAssistant:", "### {prompt} {{braces}} {prompt}\n"])
def test_good_templates_pass(hf_dir, template):
  checked(make_config(hf_dir, prompt_template=template), ["import", "sft"])


@pytest.mark.parametrize("stages, needle", [
    (["world", "sft"], "no ['world'] with data.source='files'"),
    (["pretrain", "sft"], "no ['pretrain'] with data.source='files'"),
])
def test_world_stages_refused_for_files(hf_dir, stages, needle):
  with pytest.raises(ConfigError, match="stages=") as e:
    checked(make_config(hf_dir), stages)
  assert needle in str(e.value)


def test_import_needs_a_data_block():
  with pytest.raises(ConfigError, match=r"stages='import,sft': expected no 'import' stage without a data block"):
    checked(instructgpt.get_config("smoke"), ["import", "sft"])
  checked(instructgpt.get_config("smoke"), ["world", "pretrain"])   # control: the world's own stages pass


def cli(workdir, hf_dir, **data):
  flags = [f"--config.data.{k}={v}" for k, v in {**GOOD, "hf_dir": hf_dir, **data}.items()]
  cmd = [sys.executable, "-m", "instructrl.main", "--config=configs/public.py:smoke", f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**cli_env(),
                                                                                         "JAX_PLATFORMS": "cpu"})


def test_cli_refuses_a_bad_template_leaving_the_workdir_as_it_was(hf_dir, tmp_path):
  w = tmp_path / "w"
  w.mkdir()
  (w / "notes.txt").write_text("the user's")
  before = tree(w)
  assert_one_error_line(cli(w, hf_dir, prompt_template="{user} {prompt}"), "data.prompt_template=", "{user}")
  assert tree(w) == before


def test_cli_refuses_a_bad_rankings_file_naming_its_line(hf_dir, tmp_path):
  """A bad record is found by main's pre-flight (it reads every data file before the lock and config.json):
  a new workdir is not made, an existing one is left as it was."""
  bad = write(tmp_path / "k1.jsonl", K1)
  assert_one_error_line(cli(tmp_path / "new", hf_dir, rankings=bad), f"{bad}:2:", "K=1")
  assert not (tmp_path / "new").exists()
  w = tmp_path / "w"
  w.mkdir()
  (w / "notes.txt").write_text("the user's")
  before = tree(w)
  assert_one_error_line(cli(w, hf_dir, rankings=bad), f"{bad}:2:", "K=1")
  assert tree(w) == before
