"""Time to lower and compile the SFT train step at two depths, layers as a loop and as a scan; one JSON object.

  python benchmarks/compile_time.py                                  # 1.3b at 4 and 24 layers, mesh (1,8,1)
  python benchmarks/compile_time.py --preset=smoke --layers=1,2 --mesh=1,1,1 --batch_size=4 --seq_len=16  # seconds

Nothing is allocated: the state and the batch are jax.ShapeDtypeStruct with the stage's shardings, and
the step (instructrl/stages/lm.py, the SFT stage's model_overrides applied) is only lowered and compiled.
The 8 devices are simulated host devices (XLA_FLAGS is set here, before JAX starts). Each (depth,
layout) gets a fresh jit, and the persistent compilation cache is off, so every compile is a full one;
an untimed 1-layer compile runs first so that no timed one carries the process's start-up costs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_compilation_cache", False)

from benchmarks.common import environment  # noqa: E402
from configs import instructgpt  # noqa: E402
from instructrl import parallel  # noqa: E402
from instructrl.models.config import ModelConfig  # noqa: E402
from instructrl.stages import lm, train_state  # noqa: E402


def compile_seconds(preset: str, layers: int, scan: bool, mesh_shape, batch_size: int | None,
                    seq_len: int | None) -> dict:
  config = instructgpt.get_config(preset)
  B, T = batch_size or config.sft.batch_size, seq_len or config.sft.seq_len
  model = {**config.model, **config.sft.model_overrides, "n_layers": layers, "scan_layers": scan}
  model["max_len"] = max(model["max_len"], T)
  cfg = ModelConfig.from_dict(model)
  mesh = parallel.make_mesh(mesh_shape, devices=jax.devices()[:math.prod(mesh_shape)])
  rules = parallel.rules_from_config(config.mesh.rules)
  tx, schedule = train_state.make_optimizer(config.sft, config.sft.steps)
  shardings = train_state.state_shardings(cfg, tx, mesh, rules)
  state = train_state.abstract_state(cfg, tx, shardings)
  rows = parallel.batch_sharding(mesh, rules)
  batch = {"inputs": jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=rows),
           "targets": jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=rows),
           "mask": jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=rows)}
  key = jax.eval_shape(lambda: jax.random.key(0))
  train, _ = lm.make_steps(cfg, tx, schedule, shardings, mesh, rules)
  with parallel.activate(mesh, rules):
    t0 = time.perf_counter()
    lowered = train.lower(state, batch, key)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
  return {"layers": layers, "scan_layers": scan, "params": cfg.num_params(), "lower_s": round(t1 - t0, 3),
          "compile_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="1.3b")
  p.add_argument("--layers", default="4,24", help="two depths, comma-separated")
  p.add_argument("--mesh", default="1,8,1", help="(data, fsdp, tensor)")
  p.add_argument("--batch_size", type=int, default=None, help="default: the preset's sft.batch_size")
  p.add_argument("--seq_len", type=int, default=None, help="default: the preset's sft.seq_len")
  args = p.parse_args(argv)
  depths = [int(x) for x in args.layers.split(",")]
  mesh_shape = tuple(int(x) for x in args.mesh.split(","))
  # One untimed compile first: the process's first compile also pays one-off costs (XLA and LLVM start-up).
  compile_seconds(args.preset, 1, True, mesh_shape, args.batch_size, 16)
  results = [compile_seconds(args.preset, n, scan, mesh_shape, args.batch_size, args.seq_len)
             for scan in (True, False) for n in depths]
  ratio = lambda scan: next(r["total_s"] for r in results if r["scan_layers"] == scan and r["layers"] == depths[-1]) \
      / next(r["total_s"] for r in results if r["scan_layers"] == scan and r["layers"] == depths[0])
  out = {"benchmark": "compile_time", "preset": args.preset, "mesh": list(mesh_shape), "depths": depths,
         "results": results,
         f"ratio_{depths[-1]}_over_{depths[0]}": {"scan": round(ratio(True), 3), "loop": round(ratio(False), 3)},
         "env": environment()}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
