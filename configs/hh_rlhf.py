"""Reward model on Anthropic HH-RLHF pairs (chosen/rejected transcripts, split into the shared
conversation and the two final answers) from an imported GPT-2-shaped model. Run with `instructrl.tools.finetune`:

  python -m instructrl.tools.finetune --config=configs/hh_rlhf.py --workdir=runs/hh \
      --config.init.hf_dir=checkpoints/gpt2 \
      --config.data.train=hh-rlhf/helpful-base/train.jsonl.gz --config.data.valid=hh-rlhf/helpful-base/test.jsonl.gz

HH prompts are already transcripts ending in "\\n\\nAssistant:", so they are used as they are
(rm.format_prompts = False). Paper C.2: one epoch, lr 9e-6 at 6B, cosine to 10%, 64 prompts a batch.
"""

from configs.real_data import base_config


def get_config(arg: str = ""):
  from configs.instructgpt import _lm_stage
  c = base_config("rm")
  c.data.schema = "hh"
  c.rm = _lm_stage(learning_rate=1e-5, batch_size=64, eval_batch_size=64, seq_len=512, log_every=10,
                   eval_every=200, checkpoint_every=200)
  c.rm.steps = 0                 # 0: ceil(epochs * train prompts / batch_size)
  c.rm.epochs = 1.0              # paper C.2: one epoch (more overfits)
  c.rm.init_stage = "pretrain"   # the trunk: the imported model ("sft" after an alpaca_sft run in the same workdir)
  c.rm.format_prompts = False    # HH prompts are transcripts already
  if arg == "test":
    c.rm.update(steps=4, batch_size=2, eval_batch_size=2, seq_len=480, learning_rate=1e-3, log_every=1, eval_every=4,
                checkpoint_every=4)
    c.data.valid_fraction = 0.25
  return c
