r"""The InstructGPT pipeline on a released checkpoint and public files: import -> sft -> rm -> ppo -> ppo_noptx -> eval.

  python -m instructrl.main --config=configs/public.py:tiny --workdir=runs/public \
      --config.data.hf_dir=exported/gpt \
      --config.data.demos=../shared/data/self-instruct/seed_tasks.jsonl \
      --config.data.rankings=../shared/data/oasst/en_100_tree.jsonl,../shared/data/hh-rlhf/harmless-base-test-first1000.jsonl.gz \
      --config.data.prompts=../shared/data/oasst/prompt_lottery_en_250_text.jsonl \
      --config.data.ptx=../shared/data/tinyshakespeare/input.txt

The same stages, loop, checkpoints, resume and locks as the task world (configs/instructgpt.py);
`data.source="files"` swaps the world for these files (stages/source.py, stages/data_import.py) and
the gold judge for a judge RM (stages/proxy_eval.py). The model is the checkpoint's: config.model is
filled from its config.json at start (its precision, remat and dropout fields stay the config's).
Presets: `smoke` (seconds of work, the test suite), `tiny` (this CPU, docs/real_data.md), `gpt2`
(the paper's recipe at a size one accelerator trains: GPT-2 small, 124M). The world block is unused.
"""

import ml_collections

from configs import instructgpt

PRESETS = ("smoke", "tiny", "gpt2")


def data_block() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.source = "files"             # "world": the task world (configs/instructgpt.py has no data block)
  d.hf_dir = ""                  # transformers save_pretrained directory: imported into W/pretrain once
  d.tokenizer = ""               # tokenizer.json, a directory with one, or a sentencepiece .model ("" = hf_dir)
  d.bos_id = -1                  # -1: the tokenizer's own special ids (tokenizer_config.json, ...)
  d.eos_id = -1
  d.pad_id = -1
  # Files, comma-separated; each file's schema is detected (data/readers.py: alpaca, dolly, self_instruct,
  # demo | hh, pair, ranked, oasst | prompt | txt, text; JSONL, JSON arrays, gzip/bzip2/xz, TFDS dirs).
  d.demos = ""                   # demonstrations (SFT)
  d.rankings = ""                # rankings, K >= 2: split by prompt between the policy's RM and the judge RM
  d.prompts = ""                 # PPO prompts ("" = the policy RM's training prompts)
  d.eval_prompts = ""            # held-out prompts for the report ("" = eval_fraction of the PPO prompts)
  d.ptx = ""                     # pretraining text: PPO-ptx's gradients, SFT's pretrain_mix, the LM-loss tax
  # Bare prompts become one Human turn; HH/OpenAssistant transcripts are kept as they are.
  d.prompt_template = "\n\nHuman: {prompt}\n\nAssistant:"
  d.on_invalid = "raise"         # "skip": drop bad records, logging each one's file:line
  d.valid_fraction = 0.1         # of demos, of each RM's rankings (by prompt), of the ptx text
  d.judge_fraction = 0.5         # of the ranking prompts, to the judge RM (the proxy gold)
  d.eval_fraction = 0.2          # of the prompt pool, held out for the report (without data.eval_prompts)
  d.dev_fraction = 0.1           # of the rest, the dev split (eval.split="dev")
  return d


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset = (arg or "tiny").strip()
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
  c = instructgpt.get_config("smoke" if preset == "smoke" else "tiny")
  c.preset = f"public:{preset}"
  c.stages = "import,sft,rm,ppo,ppo_noptx,eval"
  c.data = data_block()
  c.rm.init_stage = ""           # the RM's trunk: rm.policy, the SFT model (paper 3.5)
  # No prompted-GPT row (its few-shot prefix is the world's Q/A format): no prefix room either.
  c.eval.update(few_shot=0, prefix_len=0, prompted_at_policy_temperature=False, sft_at_baseline_temperature=False)
  if preset == "smoke":
    c.sft.update(steps=6, batch_size=4, seq_len=320, log_every=2, eval_every=6, checkpoint_every=3, eval_batch_size=2)
    c.rm.update(batch_size=2, eval_batch_size=2, seq_len=480, epochs=1.0, log_every=1, eval_every=100,
                checkpoint_every=2)
    c.ppo.update(total_episodes=8, batch_size=4, minibatch_size=2, ptx_batch_size=2, ptx_seq_len=64,
                 prompt_len=128, max_new_tokens=12, normalize_batches=1, checkpoint_every=1, warmup_iterations=0)
    c.eval.update(batch_size=4, prompt_len=128, max_new_tokens=12, report_prompts=8)
  elif preset == "tiny":
    c.sft.update(steps=300, batch_size=16, seq_len=160, learning_rate=3e-4, log_every=25, eval_every=100,
                 checkpoint_every=100, eval_batch_size=16, pretrain_mix=0.0)
    c.rm.update(batch_size=8, eval_batch_size=8, seq_len=190, learning_rate=1e-4, epochs=1.0, log_every=10,
                eval_every=50, checkpoint_every=50)
    c.ppo.update(total_episodes=32 * 40, batch_size=32, minibatch_size=8, ptx_batch_size=16, ptx_seq_len=128,
                 prompt_len=96, max_new_tokens=48, checkpoint_every=10)
    c.eval.update(batch_size=32, prompt_len=96, max_new_tokens=48, report_prompts=200)
  else:   # GPT-2 small (124M, 1024 positions) on one accelerator; the paper's recipe (appendix C) otherwise
    c.model.update(dtype="bfloat16")
    c.mesh.shape = (1, -1, 1)
    c.sft.update(steps=2000, batch_size=32, seq_len=512, learning_rate=2e-5, warmup_steps=0, log_every=10,
                 eval_every=200, checkpoint_every=200, eval_batch_size=32, pretrain_mix=0.1)
    c.sft.model_overrides.resid_dropout = 0.2
    c.rm.update(batch_size=64, eval_batch_size=64, seq_len=512, learning_rate=9e-6, epochs=1.0, log_every=10,
                eval_every=200, checkpoint_every=200)
    c.ppo.update(total_episodes=256 * 200, batch_size=256, minibatch_size=64, ptx_batch_size=64, ptx_seq_len=512,
                 prompt_len=256, max_new_tokens=256, learning_rate=1e-6, value_learning_rate=9e-6, kl_coef=0.02,
                 ptx_coef=27.8, ema_decay=0.992, checkpoint_every=20)
    c.eval.update(batch_size=64, prompt_len=256, max_new_tokens=256, report_prompts=500)
  return c
