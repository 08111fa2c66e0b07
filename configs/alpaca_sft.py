"""SFT on alpaca-style demonstrations (instruction/input/output; dolly and prompt/response read too)
from an imported GPT-2 / LLaMA checkpoint. Run with `instructrl.tools.finetune`:

  python -m instructrl.tools.finetune --config=configs/alpaca_sft.py --workdir=runs/alpaca \
      --config.init.hf_dir=checkpoints/gpt2 --config.data.train=data/alpaca_data.json

Hyper-parameters follow the paper's SFT (appendix C.1: cosine decay to 10%, no warm-up, residual
dropout 0.2) at a batch that fits one accelerator; the paper trains 16 epochs over ~13k demos.
"""

from configs.real_data import base_config


def get_config(arg: str = ""):
  c = base_config("sft")
  c.data.schema = "auto"         # alpaca_data.json is a JSON array; detection reads the first record
  c.data.on_invalid = "skip"     # public dumps hold a few empty outputs (AlpacaEval: 2 of 805)
  # Alpaca prompts already end in an instruction; the template turns them into one Human turn.
  c.prompt_template = "\n\nHuman: {prompt}\n\nAssistant: "
  from configs.instructgpt import _lm_stage
  c.sft = _lm_stage(steps=2000, batch_size=32, seq_len=512, learning_rate=2e-5, warmup_steps=0,
                    final_lr_fraction=0.1, log_every=10, eval_every=200, checkpoint_every=200, eval_batch_size=32)
  c.sft.model_overrides.resid_dropout = 0.2   # paper C.1
  if arg == "test":              # a few steps on the CPU (tests/hf/test_finetune.py)
    c.sft.update(steps=8, batch_size=4, seq_len=320, learning_rate=3e-3, log_every=1, eval_every=8,
                 checkpoint_every=4, eval_batch_size=2)
    c.sft.model_overrides.resid_dropout = 0.0
    c.data.valid_fraction = 0.2
  return c
