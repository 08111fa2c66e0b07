"""A catalogue of bad inputs, each fed to the reader (or check) that meets it in a run, each expected to
fail with a message that names the problem (and file:line for files). Table-driven: one row = one input.

Groups: JSONL files (every record schema, ranked/pair/HH readers), batching (over-long sequences, K
beyond k_max), configs (out-of-range values, unknown keys, mismatched tokenizer), checkpoints (a model
config or world that does not match), and the CLI itself (a subprocess, as a user runs it).
"""

from __future__ import annotations

import gzip
import subprocess

import pytest

from instructrl import checkpoints
from instructrl.data import batching, rankings
from instructrl.data.records import RecordError, load_jsonl
from tests.reliability.kill_harness import ROOT, cli_cmd, cli_env

READERS = {s: (lambda p, s=s: load_jsonl(p, s)) for s in ("text", "demo", "eval", "pair", "ranked")}
READERS["ranked file"] = rankings.load_ranked    # ranked / pair / HH-RLHF, validated beyond field types
GOOD = {"text": '{"text": "ok"}', "demo": '{"prompt": "p", "response": "r"}', "eval": '{"prompt": "p", "family": "f"}',
        "pair": '{"prompt": "p", "chosen": "a", "rejected": "b"}',
        "ranked": '{"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0]}'}
GOOD["ranked file"] = GOOD["ranked"]
HH = '"\\n\\nHuman: {q}\\n\\nAssistant: {a}"'

# (id, reader, file body (lines after one good line, so the bad one is line 2), words the error must contain)
FILES = [
    ("bad JSON", "demo", '{"prompt": "p", "response": }', ["invalid JSON"]),
    ("truncated last line", "demo", '{"prompt": "p", "resp', ["invalid JSON"]),
    ("truncated mid-string", "text", '{"text": "half a sen', ["invalid JSON"]),
    ("not an object", "text", '["text"]', ["expected a JSON object", "list"]),
    ("a bare string", "demo", '"hello"', ["expected a JSON object", "str"]),
    ("missing field", "demo", '{"prompt": "p"}', ["missing field 'response'"]),
    ("missing family", "eval", '{"prompt": "p"}', ["missing field 'family'"]),
    ("wrong type int", "text", '{"text": 5}', ["field 'text' should be str, got int"]),
    ("wrong type null", "demo", '{"prompt": null, "response": "r"}', ["field 'prompt' should be str, got NoneType"]),
    ("wrong type list", "pair", '{"prompt": "p", "chosen": ["a"], "rejected": "b"}', ["'chosen' should be str"]),
    ("empty string", "demo", '{"prompt": "p", "response": ""}', ["field 'response' is empty"]),
    ("whitespace only", "demo", '{"prompt": " \\t\\n ", "response": "r"}', ["field 'prompt' is empty"]),
    ("empty text", "text", '{"text": ""}', ["field 'text' is empty"]),
    ("empty pair side", "pair", '{"prompt": "p", "chosen": "", "rejected": "b"}', ["'chosen' is empty"]),
    ("lone surrogate", "demo", '{"prompt": "p\\ud800q", "response": "r"}', ["unpaired UTF-16 surrogate", "'prompt'"]),
    ("lone low surrogate", "text", '{"text": "x\\udfff"}', ["unpaired UTF-16 surrogate", "character 1"]),
    ("surrogate in a response", "ranked", '{"prompt": "p", "responses": ["a", "\\ud83d"], "ranking": [0, 1]}',
     ["'responses[1]'", "surrogate"]),
    ("invalid UTF-8", "text", b'{"text": "caf\xe9"}', ["not valid UTF-8", "0xe9"]),
    ("invalid UTF-8 continuation", "demo", b'{"prompt": "\xc3\x28", "response": "r"}', ["not valid UTF-8"]),
    ("UTF-8 BOM mid-file", "text", '\ufeff{"text": "x"}', ["invalid JSON"]),
    ("NaN literal as text", "text", '{"text": NaN}', ["should be str, got float"]),
    ("ranking not a permutation (repeat)", "ranked file", '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}',
     ["must be a permutation of range(3)", "repeated [0]"]),
    ("ranking out of range", "ranked file", '{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]}',
     ["permutation", "out of range [2]"]),
    ("ranking too short", "ranked file", '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}',
     ["permutation", "missing [2]"]),
    ("ranking non-integer", "ranked file", '{"prompt": "p", "responses": ["a", "b"], "ranking": [0, "1"]}',
     ["non-integer entries ['1']"]),
    ("ranking bool", "ranked file", '{"prompt": "p", "responses": ["a", "b"], "ranking": [true, 0]}', ["non-integer"]),
    ("ranking float", "ranked file", '{"prompt": "p", "responses": ["a", "b"], "ranking": [0.0, 1.0]}', ["non-integer"]),
    ("K = 1", "ranked file", '{"prompt": "p", "responses": ["a"], "ranking": [0]}', ["K >= 2", "K=1"]),
    ("K = 0", "ranked file", '{"prompt": "p", "responses": [], "ranking": []}', ["K >= 2", "K=0"]),
    ("duplicate responses", "ranked file", '{"prompt": "p", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}',
     ["duplicate responses at indices [0, 2]"]),
    ("response not a string", "ranked file", '{"prompt": "p", "responses": ["a", 3], "ranking": [0, 1]}',
     ["responses[1] should be str, got int"]),
    ("empty response", "ranked file", '{"prompt": "p", "responses": ["a", " "], "ranking": [0, 1]}', ["responses[1] is empty"]),
    ("responses not a list", "ranked", '{"prompt": "p", "responses": "ab", "ranking": [0, 1]}',
     ["field 'responses' should be list"]),
    ("pair: chosen == rejected", "ranked file", '{"prompt": "p", "chosen": "a", "rejected": "a"}', ["duplicate responses"]),
    ("unknown record shape", "ranked file", '{"question": "q", "answer": "a"}', ["not a ranked record", "['answer', 'question']"]),
    ("HH: no Assistant turn", "ranked file", '{"chosen": "\\n\\nHuman: hi", "rejected": "\\n\\nHuman: yo"}',
     ["no '\\n\\nAssistant:' turn"]),
    ("HH: conversations differ", "ranked file",
     '{"chosen": ' + HH.format(q="a", a="x") + ', "rejected": ' + HH.format(q="b", a="y") + '}', ["differ before"]),
    ("HH: missing side", "ranked file", '{"chosen": ' + HH.format(q="a", a="x") + '}', ["missing field 'rejected'"]),
]


@pytest.mark.parametrize("case", FILES, ids=[c[0] for c in FILES])
def test_bad_record_files(case, tmp_path):
  _, reader, body, needles = case
  path = tmp_path / "data.jsonl"
  good = GOOD[reader].encode()
  path.write_bytes(good + b"\n" + (body if isinstance(body, bytes) else body.encode("utf-8")) + b"\n" + good + b"\n")
  with pytest.raises(RecordError) as e:
    READERS[reader](path)
  msg = str(e.value)
  assert msg.startswith(f"{path}:2:"), msg          # file and line first
  for needle in needles:
    assert needle in msg, (needle, msg)


def test_valid_unicode_is_accepted(tmp_path):
  """Controls: the checks above are not a blanket refusal of non-ASCII text."""
  path = tmp_path / "ok.jsonl"
  texts = ["naïve café", "日本語のテキスト", "emoji 🙂 + ZWJ 👩‍💻", "RTL שלום", "combining e\u0301", "tab\\tand\\nnewline"]
  path.write_text("".join('{"text": "%s"}\n' % t for t in texts), encoding="utf-8")
  assert len(load_jsonl(path, "text")) == len(texts)


def test_missing_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
    load_jsonl(tmp_path / "nope.jsonl", "demo")


def _gzip_cut(path, good):
  data = gzip.compress(b"".join(good + b"\n" for _ in range(3000)))
  path.write_bytes(data[:len(data) // 2])


def _gzip_bad_crc(path, good):
  data = bytearray(gzip.compress(good + b"\n" + good + b"\n"))
  data[-8] ^= 0xFF
  path.write_bytes(bytes(data))


# (id, how the file is made, what the error must say). Compression is told from the content, not the name.
COMPRESSED = [("truncated .jsonl.gz", _gzip_cut, "the gzip stream ends early (truncated file)"),
              ("gzip with a bad CRC", _gzip_bad_crc, "the gzip stream is damaged (BadGzipFile: CRC check failed")]


@pytest.mark.parametrize("case", COMPRESSED, ids=[c[0] for c in COMPRESSED])
@pytest.mark.parametrize("reader", ["demo", "ranked file"])
def test_bad_compressed_files(case, reader, tmp_path):
  _, make, needle = case
  path = tmp_path / "data.jsonl.gz"
  make(path, GOOD[reader].encode())
  with pytest.raises(RecordError) as e:
    READERS[reader](path)
  msg = str(e.value)
  line = int(msg[len(f"{path}:"):].split(":")[0])   # the last whole line + 1
  assert msg.startswith(f"{path}:{line}: ") and needle in msg and f"{line - 1} whole line(s) read" in msg, msg


def test_plain_or_gzip_whatever_the_name(tmp_path):
  good = GOOD["demo"].encode() + b"\n"
  plain, packed = tmp_path / "plain.jsonl.gz", tmp_path / "packed.jsonl"
  plain.write_bytes(good * 2)
  packed.write_bytes(gzip.compress(good * 2))
  assert load_jsonl(plain, "demo") == load_jsonl(packed, "demo") == [{"prompt": "p", "response": "r"}] * 2


# ----------------------------------------------------------------------------- batching

class CharTokenizer:
  bos_id, eos_id, pad_id = 1, 2, 0

  def encode_batch(self, texts):
    return [[4 + ord(c) % 60 for c in t] for t in texts]


def over_long_demos():
  batching.prompt_response_examples(CharTokenizer(), ["a long prompt"] * 3, ["a long response"] * 3, 8, what="demos")


def over_long_rankings():
  recs = [{"prompt": "a long prompt", "responses": ["long response one", "long response two"], "ranking": [0, 1]}]
  rankings.ranked_examples(CharTokenizer(), recs, 8, 2, what="rm train")


def k_beyond_k_max():
  recs = [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]}]
  rankings.ranked_examples(CharTokenizer(), recs, 32, 2, what="rm train")


def corpus_shorter_than_a_window():
  batching.pack_texts([[5, 6]], 64)


BATCHING = [("over-long demos", over_long_demos, ["demos", "longer than seq_len=8"]),
            ("over-long rankings", over_long_rankings, ["rm train", "longer than seq_len=8"]),
            ("K beyond k_max", k_beyond_k_max, ["K=3", "more than k_max=2"]),
            ("corpus shorter than a window", corpus_shorter_than_a_window, ["fewer than one window of seq_len=64"])]


@pytest.mark.parametrize("case", BATCHING, ids=[c[0] for c in BATCHING])
def test_bad_batches(case):
  _, fn, needles = case
  with pytest.raises(ValueError) as e:
    fn()
  for needle in needles:
    assert needle in str(e.value), (needle, str(e.value))


# ----------------------------------------------------------------------------- configs and checkpoints

CONFIGS = [
    ("steps 0", {"pretrain.steps": 0}, ["pretrain.steps=0", "positive"]),
    ("negative batch", {"sft.batch_size": -4}, ["sft.batch_size=-4"]),
    ("seq_len > max_len", {"sft.seq_len": 4096}, ["sft.seq_len=4096 exceeds model.max_len"]),
    ("warmup >= steps", {"pretrain.warmup_steps": 1000}, ["warmup_steps=1000"]),
    ("K < 2 choices", {"rm.k_choices": (1, 4)}, ["rm.k_choices=(1, 4)", "K must be >= 2"]),
    ("valid_fraction 1.5", {"rm.valid_fraction": 1.5}, ["rm.valid_fraction=1.5"]),
    ("rm epochs 0", {"rm.epochs": 0.0}, ["rm.epochs=0.0"]),
    ("rm lengths > max_len", {"rm.max_new_tokens": 1000}, ["exceed model.max_len"]),
    ("eval lengths > max_len", {"eval.max_new_tokens": 1000}, ["exceeds model.max_len"]),
    ("on_nonfinite unknown", {"ppo.on_nonfinite": "ignore"}, ["ppo.on_nonfinite='ignore'", "'stop' or 'skip'"]),
    ("negative skip limit", {"sft.max_nonfinite_skips": -1}, ["sft.max_nonfinite_skips=-1"]),
    ("tokenizer larger than model vocab", {"tokenizer.vocab_size": 4096},
     ["tokenizer.vocab_size=4096 exceeds model.vocab_size=512"]),
    ("model style", {"model.style": "gpt3"}, ["style"]),
]


@pytest.mark.parametrize("case", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_config_values(case):
  from configs import instructgpt
  from instructrl.main import check_config
  _, changes, needles = case
  c = instructgpt.get_config("smoke")
  for key, value in changes.items():
    block, field = key.split(".")
    c[block][field] = value
  with pytest.raises(ValueError) as e:
    check_config(c)
  for needle in needles:
    assert needle in str(e.value), (needle, str(e.value))


def test_model_config_not_matching_the_checkpoint():
  with pytest.raises(checkpoints.CheckpointMismatch, match="n_layers: checkpoint has 2, config has 3"):
    checkpoints.check_model({"n_layers": 2, "d_model": 64}, {"n_layers": 3, "d_model": 64}, "/w/pretrain")


def test_checkpoint_of_another_world_or_tokenizer():
  with pytest.raises(checkpoints.CheckpointMismatch, match="trained on world/tokenizer aaaa.*now bbbb"):
    checkpoints.check_world({"world": "aaaa"}, "bbbb", "/w/sft")


def test_checkpoint_trained_under_other_settings():
  import ml_collections
  saved = {"learning_rate": 1e-4, "kl_coef": 0.1, "log_every": 1, "k_choices": [4, 5]}
  meta = {"settings": saved, "complete": True}
  asked = ml_collections.ConfigDict({**saved, "learning_rate": 2e-5, "k_choices": (4, 5)})
  with pytest.raises(checkpoints.CheckpointMismatch,
                     match=r"/w/ppo_noptx finished under other training settings \(ppo.learning_rate: checkpoint "
                           r"has 0.0001, config has 2e-05\); use a new --workdir, or delete /w/ppo_noptx"):
    checkpoints.check_settings(meta, asked, "/w/ppo_noptx", "ppo")
  # How often a run logs or saves is not a training setting; tuples and lists compare equal (JSON).
  checkpoints.check_settings(meta, ml_collections.ConfigDict({**saved, "log_every": 10, "k_choices": (4, 5)}),
                             "/w/ppo", "ppo")
  checkpoints.check_settings({"complete": True}, asked, "/w/ppo", "ppo")   # saved before settings were recorded
  with pytest.raises(checkpoints.CheckpointMismatch, match="was interrupted under other training settings"):
    checkpoints.check_settings({"settings": saved}, asked, "/w/ppo", "ppo")
  # A setting added after the checkpoint was saved is read there as its LATER_FIELDS value: an old run
  # resumes under that value and is refused under another.
  checkpoints.check_settings(meta, ml_collections.ConfigDict({**saved, "rm_uncertainty_coef": 0.0}), "/w/ppo", "ppo")
  with pytest.raises(checkpoints.CheckpointMismatch, match="ppo.rm_uncertainty_coef: checkpoint has 0.0, config has 0.5"):
    checkpoints.check_settings(meta, ml_collections.ConfigDict({**saved, "rm_uncertainty_coef": 0.5}), "/w/ppo", "ppo")


# ----------------------------------------------------------------------------- the CLI (subprocesses)

CLI = [("unknown config key", ["--config.model.nonexistent=1"], "nonexistent"),
       ("wrong value type", ["--config.pretrain.steps=many"], "pretrain.steps"),
       ("out-of-range value", ["--config.rm.on_nonfinite=ignore"], "rm.on_nonfinite='ignore'")]


@pytest.mark.slow   # three CLI start-ups; tests/test_main.py checks flag errors in the fast suite
@pytest.mark.parametrize("case", CLI, ids=[c[0] for c in CLI])
def test_cli_refuses_bad_flags_before_any_work(case, tmp_path):
  _, flags, needle = case
  out = subprocess.run(cli_cmd(tmp_path / "w", "world", flags), cwd=ROOT, env=cli_env(), capture_output=True,
                       text=True, timeout=120)
  assert out.returncode != 0 and needle in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "w" / "world").exists()


def test_catalogue_size():
  n = len(FILES) + len(COMPRESSED) + 1 + len(BATCHING) + len(CONFIGS) + 2 + len(CLI) + 1
  print(f"BAD INPUT CATALOGUE: {n} bad inputs ({len(FILES)} record files, {len(COMPRESSED) + 1} compressed files, "
        f"{len(BATCHING)} batching, {len(CONFIGS)} config values, 2 checkpoint mismatches, {len(CLI)} CLI flags, "
        f"1 missing file)")
  assert n >= 50
