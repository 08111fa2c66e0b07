"""Damaged checkpoints and full disks, on StageCheckpoints directly (a small state, real Orbax files).

- A latest step that is truncated, bit-flipped, missing a file, or has unreadable meta is detected
  (manifest or failed restore), moved to <stage>/corrupt/ with a warning naming it, and the
  previous step is restored, bit-exact.
- A save that hits a real full disk (a 4 MiB tmpfs in a user+mount namespace) raises
  CheckpointSaveError saying so, and the previous step still verifies and restores.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructrl import checkpoints

ROOT = Path(__file__).resolve().parents[2]


def state_at(step: int) -> dict:
  rng = np.random.default_rng(step)
  return {"step": jnp.int32(step), "params": {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
                                              "b": jnp.asarray(rng.normal(size=(64,)), jnp.float32)}}


def abstract() -> dict:
  sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state_at(0))


def saved(tmp_path, steps=(1, 2, 3)) -> Path:
  d = tmp_path / "stage"
  c = checkpoints.StageCheckpoints(d, max_to_keep=5)
  for s in steps:
    c.save(s, state_at(s), {"complete": False})
  c.close()
  return d


def biggest_file(step_dir: Path) -> Path:
  return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(step_dir):
  f = biggest_file(step_dir)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_byte(step_dir):
  f = biggest_file(step_dir)
  b = bytearray(f.read_bytes())
  b[len(b) // 2] ^= 0xFF
  f.write_bytes(bytes(b))


def delete_file(step_dir):
  biggest_file(step_dir).unlink()


def bad_meta(step_dir):
  (step_dir / "meta" / "metadata").write_text("{not json")


def truncate_without_manifest(step_dir):
  # As if written before manifests existed (or killed between commit and manifest): the restore is the check.
  (step_dir / checkpoints.MANIFEST).unlink()
  truncate(step_dir)


FAULTS = [truncate, flip_byte, delete_file, bad_meta, truncate_without_manifest]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, fault, caplog):
  d = saved(tmp_path)
  fault(d / "3")
  c = checkpoints.StageCheckpoints(d, max_to_keep=5)
  with caplog.at_level(logging.WARNING):
    state, meta = c.restore(abstract())
  c.close()
  assert meta["step"] == 2 and int(state["step"]) == 2
  assert jax.tree.all(jax.tree.map(np.array_equal, state, state_at(2)))
  msg = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert str(d / "3") in msg and "falling back to step 2" in msg, msg
  assert not (d / "3").exists() and (d / "corrupt" / "3").is_dir()   # kept for inspection, out of the way


def test_every_checkpoint_damaged_means_start_over(tmp_path):
  d = saved(tmp_path, steps=(1,))
  flip_byte(d / "1")
  c = checkpoints.StageCheckpoints(d)
  assert c.restore(abstract()) is None and c.latest_step() is None
  # ... and the stage can save step 1 again (the damaged one is not in Orbax's way).
  c.save(1, state_at(1), {"complete": False})
  assert c.restore(abstract())[1]["step"] == 1
  c.close()


def test_handoff_of_a_damaged_final_checkpoint_says_rerun(tmp_path):
  d = tmp_path / "stage"
  c = checkpoints.StageCheckpoints(d, max_to_keep=5)
  model = {"d_model": 64}
  c.save(1, state_at(1), {"complete": False, "model": model})
  c.save(2, state_at(2), {"complete": True, "model": model})
  c.close()
  truncate(d / "2")
  with pytest.raises(FileNotFoundError, match="did not finish .latest step 1.; rerun it"):
    checkpoints.load_params(d, abstract()["params"], model)


def test_clean_checkpoints_pass_the_manifest_check(tmp_path):
  d = saved(tmp_path)
  for s in (1, 2, 3):
    assert checkpoints.manifest_problem(d / str(s)) is None
    files = json.loads((d / str(s) / checkpoints.MANIFEST).read_text())["files"]
    assert len(files) >= 5
  flip_byte(d / "2")
  assert "content hash differs" in checkpoints.manifest_problem(d / "2")


# ----------------------------------------------------------------------------- disk full

DISK_FULL = textwrap.dedent("""
    import os, subprocess, sys, json
    mnt = sys.argv[1]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "none", mnt], check=True)
    sys.path.insert(0, {root!r}); sys.path.insert(0, os.path.join({root!r}, "tests", "reliability"))
    import numpy as np, jax
    from instructrl import checkpoints
    from test_checkpoint_faults import state_at, abstract
    c = checkpoints.StageCheckpoints(os.path.join(mnt, "stage"), max_to_keep=5)
    c.save(1, state_at(1), {{"complete": False}})
    # Fill the disk, leaving less room than one checkpoint needs.
    with open(os.path.join(mnt, "filler"), "wb", buffering=0) as f:
      try:
        while True:
          f.write(b"x" * 4096)
      except OSError:
        pass
    os.truncate(os.path.join(mnt, "filler"), os.path.getsize(os.path.join(mnt, "filler")) - 8192)
    out = {{}}
    try:
      c.save(2, state_at(2), {{"complete": False}})
      out["error"] = None
    except checkpoints.CheckpointSaveError as e:
      out["error"] = str(e)
    out["leftovers"] = sorted(os.listdir(os.path.join(mnt, "stage")))
    out["problem"] = checkpoints.manifest_problem(checkpoints.Path(mnt) / "stage" / "1")
    state, meta = c.restore(abstract())
    out["restored_step"] = meta["step"]
    out["exact"] = bool(jax.tree.all(jax.tree.map(np.array_equal, state, state_at(1))))
    os.remove(os.path.join(mnt, "filler"))          # space freed: the same save now succeeds
    c.save(2, state_at(2), {{"complete": False}})
    out["after_freeing"] = c.restore(abstract())[1]["step"]
    print("RESULT " + json.dumps(out))
""")


def test_save_on_a_full_disk_stops_cleanly_and_keeps_the_previous_checkpoint(tmp_path):
  if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
    pytest.skip("needs `unshare -rm` (user + mount namespaces) to mount a small tmpfs")
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  code = DISK_FULL.format(root=str(ROOT))
  out = subprocess.run(["unshare", "-rm", sys.executable, "-c", code, str(mnt)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads([l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1][7:])
  assert r["error"] and "disk is full" in r["error"] and "previous checkpoint (step 1) is intact" in r["error"], r
  assert r["leftovers"] == ["1"], r          # no half-written step 2, no Orbax tmp folder left taking space
  assert r["problem"] is None and r["restored_step"] == 1 and r["exact"], r
  assert r["after_freeing"] == 2, r


CLI_DISK_FULL = r"""
set -u
mount -t tmpfs -o size=24m none "$MNT"
W="$MNT/w"
"$@" --workdir="$W" > "$OUT/first.log" 2>&1 &
PID=$!
while [ ! -e "$W/pretrain/5/instructrl_manifest.json" ] && kill -0 $PID 2>/dev/null; do sleep 0.01; done
dd if=/dev/zero of="$MNT/filler" bs=64k 2>/dev/null
truncate -s -128K "$MNT/filler"               # room for metric lines, not for a checkpoint
wait $PID; echo "first_rc=$?" > "$OUT/rc"
ls "$W/pretrain" > "$OUT/steps_after_failure"
rm "$MNT/filler"
"$@" --workdir="$W" > "$OUT/second.log" 2>&1; echo "second_rc=$?" >> "$OUT/rc"
ls "$W/pretrain" > "$OUT/steps_after_rerun"
"""


@pytest.mark.slow
def test_cli_on_a_full_disk_stops_with_a_clear_message_and_resumes(tmp_path):
  """Through the CLI: the disk fills up during pretraining (a real tmpfs); the run stops at the next save
  saying so, the previous checkpoint stays, and after space is freed the same command finishes."""
  if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
    pytest.skip("needs `unshare -rm` (user + mount namespaces) to mount a small tmpfs")
  from tests.reliability.kill_harness import cli_cmd, cli_env
  mnt, out = tmp_path / "mnt", tmp_path / "out"
  mnt.mkdir()
  out.mkdir()
  cmd = [c for c in cli_cmd(Path("unused"), "world,pretrain") if not c.startswith("--workdir=")]
  p = subprocess.run(["unshare", "-rm", "bash", "-c", CLI_DISK_FULL, "disk_full", *cmd], cwd=ROOT, timeout=400,
                     env={**cli_env(), "MNT": str(mnt), "OUT": str(out)}, capture_output=True, text=True)
  assert p.returncode == 0, p.stderr[-2000:]
  rc = dict(l.split("=") for l in (out / "rc").read_text().split())
  first = (out / "first.log").read_text()
  assert rc["first_rc"] != "0", first[-2000:]
  assert "CheckpointSaveError" in first and "failed (the disk is full)" in first, first[-3000:]
  assert "the previous checkpoint (step 5) is intact" in first, first[-3000:]
  assert (out / "steps_after_failure").read_text().split() == ["5"]   # no half-written step, no tmp folder
  assert rc["second_rc"] == "0", (out / "second.log").read_text()[-3000:]
  assert "resuming from step 5" in (out / "second.log").read_text()
  assert "20" in (out / "steps_after_rerun").read_text().split()


def test_a_damaged_kept_candidate_step_is_refused_not_replaced(tmp_path):
  """load_params(step=k) of a damaged earlier step says so; it never hands over another step's params."""
  d = tmp_path / "stage"
  c = checkpoints.StageCheckpoints(d, max_to_keep=5)
  model = {"d_model": 64}
  for s in (1, 2, 3):
    c.save(s, state_at(s), {"complete": s == 3, "model": model})
  c.close()
  params, meta = checkpoints.load_params(d, abstract()["params"], model, step=2)
  assert meta["step"] == 2 and np.array_equal(params["w"], state_at(2)["params"]["w"])
  flip_byte(d / "2")
  with pytest.raises(FileNotFoundError, match=r"no usable kept checkpoint at step 2 \(kept: \[1, 3\]\)"):
    checkpoints.load_params(d, abstract()["params"], model, step=2)


# ----------------------------------------------------------------------------- another config is not damage

def test_checkpoint_of_another_model_is_refused_not_quarantined(tmp_path):
  """A restore whose meta check refuses (another model) raises CheckpointMismatch before reading any
  array, and leaves every step where it is: no corrupt/ folder, nothing renamed."""
  d = tmp_path / "stage"
  c = checkpoints.StageCheckpoints(d, max_to_keep=5)
  for s in (1, 2):
    c.save(s, state_at(s), {"complete": False, "model": {"d_model": 64, "n_layers": 2}})
  c.close()
  before = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
  # The restore target has another shape: without the meta check Orbax's shape error read as damage.
  other = jax.tree.map(lambda x: jax.ShapeDtypeStruct((32,) + x.shape[1:], x.dtype, sharding=x.sharding)
                       if x.ndim else x, abstract())
  check = lambda meta: checkpoints.check_model(meta["model"], {"d_model": 64, "n_layers": 3}, str(d))
  c = checkpoints.StageCheckpoints(d, max_to_keep=5)
  with pytest.raises(checkpoints.CheckpointMismatch, match="model.n_layers: checkpoint has 2, config has 3"):
    c.restore(other, check=check)
  c.close()
  assert not (d / "corrupt").exists()
  assert sorted(str(p.relative_to(d)) for p in d.rglob("*")) == before


def test_a_restore_that_fails_although_the_meta_matches_is_damage(tmp_path):
  """The meta says the same model, yet the arrays do not restore: that step is damaged, set aside."""
  d = saved(tmp_path, steps=(1, 2))
  truncate_without_manifest(d / "2")
  c = checkpoints.StageCheckpoints(d, max_to_keep=5)
  seen = []
  state, meta = c.restore(abstract(), check=seen.append)
  c.close()
  assert meta["step"] == 1 and [m["step"] for m in seen] == [2, 1]
  assert (d / "corrupt" / "2").is_dir()


def test_recorded_meta_reads_without_touching_the_directory(tmp_path):
  d = saved(tmp_path, steps=(1, 2))
  before = {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
  assert checkpoints.recorded_meta(d)["step"] == 2
  bad_meta(d / "2")
  assert checkpoints.recorded_meta(d)["step"] == 1       # an unreadable meta: the next older step's
  assert checkpoints.recorded_meta(tmp_path / "none") is None and not (tmp_path / "none").exists()
  assert not (d / "corrupt").exists() and set(before) == {str(p) for p in tmp_path.rglob("*")}
