"""Shared fields of the public-data configs (alpaca_sft.py, hh_rlhf.py) run by `instructrl.tools.finetune`.

The model config is not here: it is read from the imported Hugging Face checkpoint.
"""

import ml_collections

from instructrl import parallel


def base_config(task: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task                  # "sft" or "rm"
  c.seed = 0
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)      # (data, fsdp, tensor); (1, -1, 1) for FSDP on accelerators
  c.mesh.rules = parallel.DEFAULT_RULES

  c.init = ml_collections.ConfigDict()
  c.init.hf_dir = ""             # transformers save_pretrained directory (GPT-2 or LLaMA family, safetensors)
  c.init.stage = "pretrain"      # imported into workdir/<stage> once; later runs reuse it

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""          # tokenizer.json or sentencepiece .model; "" = init.hf_dir/tokenizer.json
  c.tokenizer.bos_id = -1        # -1: the tokenizer file's own special ids
  c.tokenizer.eos_id = -1
  c.tokenizer.pad_id = -1

  c.data = ml_collections.ConfigDict()
  c.data.train = ""              # JSONL(.gz/.bz2/.xz) or JSON array file (data/readers.py)
  c.data.valid = ""              # "" = split valid_fraction off train (seeded)
  c.data.schema = "auto"         # or a name from readers.SCHEMAS (alpaca, dolly, hh, oasst, ...)
  c.data.valid_fraction = 0.05
  c.data.on_invalid = "raise"    # "skip" drops bad records, logging each one's file:line
  # How a record's prompt is shown to the model (HH-RLHF's transcript form, so SFT and RM agree).
  c.prompt_template = "\n\nHuman: {prompt}\n\nAssistant:"
  c.model = ml_collections.ConfigDict()   # filled from the imported checkpoint at run time
  return c
