"""Two JAX processes on 127.0.0.1 (4 simulated CPU devices each, one 8-device mesh) train SFT and RM
steps (the RM unpacked and packed, each host packing the data shards it holds) together, save Orbax checkpoints, and two new processes restore them on a different mesh.

What is checked: the two-process losses equal a one-device run of the same steps; each process read
only its half of every batch; only process 0 wrote metrics; the restored params equal the saved
ones exactly, on a (1, 2, 4) mesh after saving from (2, 2, 2). Loopback only, every process bounded
by a timeout and killed on failure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(style="gpt", vocab_size=64, max_len=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=8,
           d_ff=64, tie_embeddings=True, resid_dropout=0.1)
B_LM, T, B_RM, K = 8, 12, 4, 3


def lm_data(n=32, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(1, CFG["vocab_size"], (n, T + 1)).astype(np.int32)
  mask = rng.random((n, T + 1)) < 0.8
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": mask[:, 1:]}


def rm_data(n=16, seed=1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG["vocab_size"], (n, K, T)).astype(np.int32)
  mask = np.ones((n, K), bool)
  mask[::2, -1] = False                          # ragged K: every other prompt has 2 responses, not 3
  ranks = np.stack([rng.permutation(K) for _ in range(n)]).astype(np.int32)
  ranks[~mask] = K
  last = rng.integers(4, T, (n, K)).astype(np.int32)
  last[~mask] = 0
  return {"tokens": tokens, "last_index": last, "ranks": ranks, "mask": mask}


def batch_idx(n, b, step):
  return np.random.default_rng(step).permutation(n)[:b]


def run_steps(mesh, rules, reader=None):
  """2 SFT steps, 2 RM steps and 2 packed RM steps (rm.packing, without dropout: its masks follow the rows) on
  `mesh`; returns (states, losses, rows read per stage)."""
  import jax
  from instructrl.data import packing
  from instructrl.models.config import ModelConfig
  from instructrl.stages import lm, reward, train_state
  from configs import instructgpt
  stage = instructgpt._lm_stage(learning_rate=1e-2)
  out, losses, rows = {}, {}, {}
  for name, head, data, B in (("sft", "lm", lm_data(), B_LM), ("rm", "scalar", rm_data(), B_RM),
                              ("rm_packed", "scalar", rm_data(), B_RM)):
    cfg = ModelConfig(**{**CFG, "resid_dropout": 0.0}) if name == "rm_packed" else ModelConfig(**CFG)
    tx, schedule = train_state.make_optimizer(stage, total_steps=10)
    sh = train_state.state_shardings(cfg, tx, mesh, rules, head=head)
    params = train_state.init_params(cfg, jax.random.key(0), sh["params"], mesh, rules, head=head)
    state = train_state.new_state(params, tx, sh, mesh)
    if name == "sft":
      step, _ = lm.make_steps(cfg, tx, schedule, sh, mesh, rules)
    else:
      step, _, _ = reward.make_steps(cfg, "per_prompt", tx, schedule, sh, mesh, rules)
    read = []
    get = lambda idx, data=data, read=read: (read.append(idx.tolist()), {k: v[idx] for k, v in data.items()})[1]
    losses[name] = []
    shards = train_state.batch_shards(B, mesh, rules)
    pack_rows = max(packing.rows_needed(data["last_index"][i], data["mask"][i], T, shards)
                    for i in (batch_idx(len(data["mask"]), B, s) for s in range(2))) if name == "rm_packed" else 0
    with jax.set_mesh(mesh):
      for s in range(2):
        idx = batch_idx(len(data["mask"]), B, s)
        batch = (train_state.process_packed_batch(get, idx, pack_rows, 0, mesh, rules) if name == "rm_packed"
                 else train_state.process_batch(get, idx, mesh, rules))
        state, m = step(state, batch, jax.random.key(3))
        losses[name].append(float(m["loss"]))
    out[name], rows[name] = (state, sh), read
  return out, losses, rows


def _worker(phase: str, pid: int, port: int, workdir: str):
  import jax
  from jax.experimental import multihost_utils
  from instructrl import checkpoints, distributed, parallel
  from instructrl.metrics import MetricWriter
  from instructrl.models.config import ModelConfig
  from instructrl.stages import train_state
  from configs import instructgpt

  assert distributed.initialize("on", f"127.0.0.1:{port}", 2, pid, timeout_s=120)
  assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 4, 8)
  rules = parallel.DEFAULT_RULES
  gather = lambda tree: jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  result = {"pid": pid}
  if phase == "train":
    mesh = parallel.make_mesh((2, 2, 2))
    states, losses, rows = run_steps(mesh, rules)
    result.update(losses=losses, rows=rows)
    # Sampled tokens / scores come back sharded over 'batch' across both hosts: to_host gathers them.
    idx = batch_idx(32, B_LM, 0)
    sharded = train_state.process_batch(lambda i: {"x": lm_data()["inputs"][i]}, idx, mesh, rules)["x"]
    result["to_host_ok"] = bool(not sharded.is_fully_addressable and
                                np.array_equal(distributed.to_host(sharded), lm_data()["inputs"][idx]))
    writer = MetricWriter(workdir, "sft")
    writer.write(2, {"loss": losses["sft"][-1], "pid": pid}, prefix="train/")
    writer.close()
    for name, (state, _) in states.items():
      if name == "rm_packed":
        continue
      ckpt = checkpoints.StageCheckpoints(Path(workdir) / name)
      ckpt.save(2, state, {"stage": name})
      ckpt.close()
      params = gather(state["params"])
      if pid == 0:
        np.savez(Path(workdir) / f"{name}_saved.npz", **{"/".join(map(str, k)): v for k, v in
                                                         jax.tree_util.tree_flatten_with_path(params)[0]})
  else:
    mesh = parallel.make_mesh((1, 2, 4))       # another mesh shape than the one that saved
    cfg = ModelConfig(**CFG)
    tx, _ = train_state.make_optimizer(instructgpt._lm_stage(learning_rate=1e-2), total_steps=10)
    result["restored"] = {}
    for name, head in (("sft", "lm"), ("rm", "scalar")):
      sh = train_state.state_shardings(cfg, tx, mesh, rules, head=head)
      ckpt = checkpoints.StageCheckpoints(Path(workdir) / name)
      state, meta = ckpt.restore(train_state.abstract_state(cfg, tx, sh, head=head))
      ckpt.close()
      wq = state["params"]["layer_0"]["attn"]["wq"]
      assert wq.sharding.spec == sh["params"]["layer_0"]["attn"]["wq"].spec
      saved = np.load(Path(workdir) / f"{name}_saved.npz")
      params = {"/".join(map(str, k)): v for k, v in
                jax.tree_util.tree_flatten_with_path(gather(state["params"]))[0]}
      result["restored"][name] = {"step": int(state["step"]), "meta": meta["stage"],
                                  "max_diff": max(float(np.max(np.abs(params[k] - saved[k]))) for k in saved.files),
                                  "n_leaves": [len(params), len(saved.files)],
                                  "local_shards_wq": len(wq.addressable_shards)}
  print("RESULT " + json.dumps(result), flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_pair(phase: str, workdir: Path, timeout: int = 240) -> list[dict]:
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
         "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  procs = []
  for pid in range(2):
    code = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(ROOT)!r})
        import conftest  # the shared compile cache and full-precision matmuls
        spec = importlib.util.spec_from_file_location("_mh_worker", {os.path.abspath(__file__)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod._worker({phase!r}, {pid}, {port}, {str(workdir)!r})
    """)
    procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  results = []
  try:
    for pid, proc in enumerate(procs):
      stdout, stderr = proc.communicate(timeout=timeout)
      assert proc.returncode == 0, f"process {pid} ({phase}) failed:\n{stdout[-2000:]}\n{stderr[-5000:]}"
      line = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
      assert line, stdout[-2000:]
      results.append(json.loads(line[-1][len("RESULT "):]))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return results


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("multihost")
  train = run_pair("train", workdir)
  restore = run_pair("restore", workdir)
  return workdir, train, restore


@pytest.mark.slow
def test_two_processes_train_like_one_device(two_process_runs):
  import jax
  from instructrl import parallel
  _, train, _ = two_process_runs
  assert train[0]["losses"] == train[1]["losses"]     # one SPMD program: every process sees the same values
  assert train[0]["to_host_ok"] and train[1]["to_host_ok"]
  mesh = parallel.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _, ref, _ = run_steps(mesh, parallel.DEFAULT_RULES)
  for name in ("sft", "rm", "rm_packed"):
    np.testing.assert_allclose(train[0]["losses"][name], ref[name], rtol=1e-5, atol=1e-6)
    assert ref[name][1] < ref[name][0]


@pytest.mark.slow
def test_each_process_reads_only_its_rows(two_process_runs):
  _, train, _ = two_process_runs
  for name, B, n in (("sft", B_LM, 32), ("rm", B_RM, 16), ("rm_packed", B_RM, 16)):
    for step in range(2):
      a, b = (train[p]["rows"][name][step] for p in range(2))
      assert len(a) == len(b) == B // 2, (a, b)                  # half of the batch each
      assert sorted(a + b) == sorted(batch_idx(n, B, step).tolist())   # together: the whole batch, once


@pytest.mark.slow
def test_only_process_zero_writes_metrics(two_process_runs):
  workdir, _, _ = two_process_runs
  lines = (workdir / "metrics" / "sft.jsonl").read_text().splitlines()
  assert len(lines) == 1 and json.loads(lines[0])["train/pid"] == 0


@pytest.mark.slow
def test_checkpoint_restores_on_another_mesh(two_process_runs):
  _, _, restore = two_process_runs
  for r in restore:
    for name in ("sft", "rm"):
      got = r["restored"][name]
      assert got["step"] == 2 and got["meta"] == name
      assert got["n_leaves"][0] == got["n_leaves"][1] > 5
      assert got["max_diff"] == 0.0
      assert got["local_shards_wq"] == 4


def test_initialize_decides_from_flags_and_environment(monkeypatch):
  """Which runs connect (no connection is made here: every case returns or fails before it)."""
  from instructrl import distributed
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.detected_cluster() is None
  assert distributed.initialize("auto") is False          # one host: nothing to do
  assert distributed.initialize("off", "10.0.0.1:1234", 2, 0) is False
  with pytest.raises(ValueError, match="also give --num_processes and --process_id"):
    distributed.initialize("auto", "10.0.0.1:1234")
  with pytest.raises(ValueError, match="expected 0 <= process_id < --num_processes=2"):
    distributed.initialize("auto", "10.0.0.1:1234", 2, 2)
  monkeypatch.setenv("JAX_PROCESS_ID", "one")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='one': expected an integer"):
    distributed.initialize("auto", "10.0.0.1:1234", 2)
  with pytest.raises(ValueError, match="--distributed='sometimes'"):
    distributed.initialize("sometimes")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  monkeypatch.setenv("SLURM_JOB_ID", "77")
  assert distributed.detected_cluster() == "slurm"
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.detected_cluster() is None            # a one-task SLURM job is a single host
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1,t2,t3")
  assert distributed.detected_cluster() == "tpu-pod"
