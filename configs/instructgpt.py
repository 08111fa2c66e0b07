"""InstructGPT presets: CPU-sized `smoke` / `tiny` / `small` and the paper's GPT-3 shapes.

Launch (the whole spine on the CPU demo preset):
  python -m instructrl.main --config=configs/instructgpt.py:tiny --workdir=runs/tiny
Override any field:
  python -m instructrl.main --config=configs/instructgpt.py:smoke --workdir=runs/smoke \
      --stages=world,pretrain,sft --config.sft.learning_rate=3e-4

Paper numbers come from Ouyang et al. 2022 (arXiv 2203.02155), appendix C; each carries a
comment naming the section. Derived numbers (tokens per step, epochs) are computed, not typed.
Options follow the preset after a comma: `tiny,round2` runs two rounds of comparisons in one workdir
(docs/pipeline.md, "Two rounds of comparisons"); a paper preset's `1.3b,rm6b` gives the reward model and
PPO's value function the paper's 6B shape (docs/scaling.md, "The paper presets").
"""

import math

import ml_collections

from instructrl import parallel
from instructrl.data import world as world_lib

PRESETS = ("smoke", "tiny", "small", "1.3b", "6b", "175b")
PAPER_PRESETS = ("1.3b", "6b", "175b")
# Options after a preset's name, comma-separated (`1.3b,rm6b`, `tiny,round2`).
OPTIONS = {"rm6b": "the paper's 6B reward model and value function (C.2, C.4) for this policy size",
           "round2": "a second round of comparisons ranking round one's PPO-ptx samples (rm.rounds=2)"}
PAPER_ONLY = ("rm6b",)
# GPT-3 table 2.1 (Brown et al. 2020): (layers, width, heads); head size 128 everywhere, so 1.3B has
# 24 heads of 128 on a 2048-wide stream.
GPT3_SHAPES = {"1.3b": (24, 2048, 24), "6b": (32, 4096, 32), "175b": (96, 12288, 96)}


def _lm_stage(**kw):
  """Fields shared by the pretrain and sft stages."""
  c = ml_collections.ConfigDict()
  c.steps = 100                  # optimizer steps
  c.batch_size = 32              # sequences per step (global, across all devices)
  # Gradient accumulation: each step's batch in this many micro-batches of batch_size / microbatches rows
  # (a divisor; its rows still split over data x fsdp), one update after them. The step's loss, metrics and
  # update are the whole batch's; activation memory is one micro-batch's (docs/scaling.md). 1: one pass.
  c.microbatches = 1
  c.seq_len = 64                 # tokens per sequence (static shape)
  c.learning_rate = 1e-3         # peak learning rate
  c.warmup_steps = 0             # linear warm-up from 0
  c.final_lr_fraction = 0.1      # cosine decay to this fraction of the peak (paper C.1: 10%)
  c.b1 = 0.9                     # Adam beta1 (paper C: 0.9)
  c.b2 = 0.95                    # Adam beta2 (paper C: 0.95)
  c.weight_decay = 0.0           # AdamW decoupled weight decay on matrices
  c.grad_clip = 1.0              # clip the global gradient norm
  c.log_every = 10               # steps between metric lines
  c.eval_every = 100             # steps between validation passes
  c.eval_batch_size = 32         # sequences per validation batch
  c.checkpoint_every = 100       # steps between checkpoints (the last step is always saved)
  c.keep_checkpoints = 2         # newest checkpoints kept on disk
  c.keep_period = 0              # also keep every step divisible by this (0: none); SFT's candidates for ppo.select_sft_by_rm
  c.on_nonfinite = "stop"        # a NaN/inf loss or gradient: "stop" the run, or "skip" the batch (update not applied)
  c.max_nonfinite_skips = 3      # with "skip": stop after this many non-finite steps in a row
  c.model_overrides = ml_collections.ConfigDict({"resid_dropout": 0.0})  # stage-only model fields (dropout)
  c.update(kw)
  return c


def _rm_stage():
  """Reward model (paper section 3.5, appendix C.2)."""
  c = _lm_stage(
      learning_rate=9e-6,        # paper C.2: lr 9e-6, cosine to 10%
      batch_size=64,             # paper C.2: 64 prompts a batch, each with all its C(K,2) comparisons
      eval_batch_size=32,        # validation prompts per batch
  )
  del c["steps"]                 # derived: ceil(epochs * prompts / batch_size), see stages/reward.py
  c.epochs = 1.0                 # paper C.2: a single epoch (more overfits)
  c.formulation = "per_prompt"   # "per_prompt" (paper) or "shuffled_pairs" (the ablation it argues against)
  c.pair_batch_size = 64         # comparisons per batch in the shuffled-pairs ablation
  c.policy = "sft"               # the policy whose samples the labelers rank; its trunk initialises the RM
  c.base_workdir = ""            # "": the RM starts from this run's rm.policy stage; else from that stage of
                                 # another run on the same world, with that run's model (a larger RM, as the
                                 # paper's 6B RM); PPO's value function follows it
  c.init_stage = ""              # the stage whose trunk initialises the RM ("": rm.policy; e.g. "pretrain")
  # The RM's size where it is not the policy's: model fields among d_model, n_layers, n_heads, n_kv_heads,
  # head_dim, d_ff (the paper's 6B RM for every policy: the paper presets' `,rm6b`). PPO's value function
  # follows the RM. Another size than the policy's needs rm.base_workdir (a run of that size, for the trunk).
  c.model_shape = ml_collections.ConfigDict()
  # Where the K ranked responses come from (weights per response slot): "policy" (rm.policy at
  # rm.sample_temperature), "pretrain" (bare prompt) and "pretrain_few_shot" (prompted GPT), both at
  # eval.baseline_temperature, "ppo" (an earlier PPO policy, rm.ppo_source), and "mismatched" (rm.policy's
  # answer to another RM prompt, half the time of the same task family; not in the paper). Paper 3.5:
  # comparisons rank outputs of several models, later ones of its RL policies.
  c.source_mix = ml_collections.ConfigDict({"policy": 1.0, "pretrain": 0.0, "pretrain_few_shot": 0.0, "ppo": 0.0,
                                            "mismatched": 0.0})
  c.ppo_source = ""              # with source_mix.ppo > 0: an earlier run's finished ppo stage dir (same world);
                                 # a leading {workdir} is this run's workdir (round two's "{workdir}/round1/ppo")
  # Rank empty samples too (the labelers see a policy that says nothing, and rank it low). Dropping them
  # (False, the earlier behaviour) leaves the RM blind there: on tiny (world v1), PPO-ptx then answered 20 of 32
  # held-out "reverse" prompts with nothing.
  c.keep_empty = True
  # Iterated collection (paper 3.5: comparisons gathered over rounds, later ones ranking the RL policies'
  # samples): comma-separated `comparisons` dirs of earlier rounds on the same world, ADDED to this round's
  # (train to train, valid to valid) rather than replaced by it. "": this round's comparisons only. A leading
  # {workdir} is this run's workdir, recorded as written (so a moved workdir still matches its checkpoints).
  c.extra_comparisons = ""
  # Rounds of collection in one workdir (stages/rounds.py): 1, or 2 (the `,round2` option): round one's RM
  # and PPO-ptx (stages rm_round1, ppo_round1) under W/round1, then the rm stage collects again with
  # round2_mix, its "ppo" share sampled from round one's PPO-ptx, and trains on both rounds' comparisons.
  c.rounds = 1
  # Episodes of round one's PPO-ptx (stage ppo_round1; 0: ppo.total_episodes). Its policy only supplies round
  # two's samples to rank.
  c.round1_ppo_episodes = 0
  # Chosen on tiny's dev split (docs/results.md): PPO-ptx's win rate vs SFT 61.3% -> 65.0% (seed 0) and
  # 55.3% -> 64.4% (seed 1) with round two at this mix; on test, 3 seeds: 59.6% (one round) -> 65.2%.
  c.round2_mix = ml_collections.ConfigDict({"policy": 0.3, "pretrain": 0.1, "pretrain_few_shot": 0.15, "ppo": 0.3,
                                            "mismatched": 0.15})
  c.n_prompts = 2000             # RM prompts sampled and ranked (<= world.n_rm_prompts)
  c.valid_fraction = 0.2         # of those, held out for validation accuracy
  c.k_choices = (4, 5, 6, 7, 8, 9)  # paper 3.5: K = 4..9 responses per prompt
  c.sample_temperature = 1.0     # sampling temperature of the ranked responses
  c.prompt_len = 32              # prompt tokens when sampling (left-padded)
  c.max_new_tokens = 32          # response cap when sampling
  c.collect_batch_prompts = 16   # prompts per sampling batch (calls of prompts x (expected draws + 2) rows a source)
  c.seq_len = 64                 # prompt + response tokens per RM sequence
  # Pack each training batch's responses end to end into rows of seq_len, each attending only to itself
  # (data/packing.py): the same scores up to float rounding, from the rows the tokens fill instead of
  # batch_size x max(k_choices) (a quarter of those on tiny's round two). Per-prompt formulation only,
  # without micro-batches. Validation and scoring stay unpacked.
  c.packing = False
  c.rankings_per_prompt = 1      # training rankings of each prompt, each by another training group (paper: 1)
  # Weight of a pair of two rm.policy samples in the per-prompt loss, every other pair 1 (paper: all 1). Those
  # are the pairs PPO has to tell apart; the mixed ones keep the RM anchored on off-policy garbage.
  c.policy_pair_weight = 1.0
  # The labeler group never trained on (held-out accuracy; paper: 69.6% vs 72.4%) is world.heldout_group, the
  # group whose labelers also judge the evaluation: one field, so the RM can never train on the eval raters.
  # The gold probe (final metrics): on up to this many RM validation prompts, how often the RM orders
  # (rm.policy greedy, rm.policy at ppo.temperature) answer pairs as the gold judge does; 0: off.
  c.gold_probe_prompts = 500
  # An ensemble of RMs on the same comparisons (not in the paper; Coste et al. 2023, "Reward model ensembles
  # help mitigate overoptimization"): PPO's reward is the members' mean minus ppo.rm_uncertainty_coef times
  # their std. Member 0 is W/rm (the value function's init); the others (W/rm_ensemble/member{i}) differ in
  # head init and data order, and with ensemble_bootstrap each trains on a resample of the training prompts.
  # Measured on tiny seed 0, world v1: 4 members with coef 1 gave PPO-ptx a 52.0% win rate vs 53.9% with a
  # single RM; members from one SFT trunk err together, so 1 (the paper's single RM) stays the default.
  c.ensemble_size = 1
  c.ensemble_bootstrap = True
  c.model_overrides = ml_collections.ConfigDict({"resid_dropout": 0.0})
  return c


def _ppo_stage():
  """PPO-ptx (paper section 3.5, appendix C.4); lm-human-preferences defaults where it is silent."""
  c = ml_collections.ConfigDict()
  c.policy_init = "sft"          # paper C.3 starts from SFT trained with 10% pretraining data mixed in
  c.select_sft_by_rm = False     # paper C.1: start from the SFT candidate (sft.keep_period) the RM scores best
  c.select_prompts = 128         # RM validation prompts each SFT candidate answers for that choice
  c.n_prompts = 2000             # PPO prompts used (<= world.n_ppo_prompts); paper: ~31k
  c.total_episodes = 256_000     # paper C.4: 256k episodes
  c.batch_size = 512             # paper C.4: episodes per iteration (rollout batch)
  c.minibatch_size = 64          # paper C.4: minibatch 64
  c.ppo_epochs = 1               # paper C.4: one inner epoch over each rollout batch
  c.learning_rate = 1e-5         # policy lr: an assumption (not among the paper numbers in DESIGN.md)
  c.value_learning_rate = 9e-6   # paper C.4: value lr 9e-6
  c.warmup_iterations = 10       # paper C.4: 10 iterations of warm-up from a tenth of the peak, then constant
  c.kl_coef = 0.02               # paper C.4: beta, KL reward coefficient against the SFT model
  c.adaptive_kl = False          # Ziegler et al. (2019) controller instead of a fixed beta
  c.target_kl = 6.0              # nats per episode for the adaptive controller (lm-human-preferences)
  c.kl_horizon = 10000           # episodes (lm-human-preferences)
  c.ptx_coef = 27.8              # paper C.4: gamma; 0 gives plain PPO
  c.ptx_batch_size = 512         # pretraining sequences per minibatch: 8x the episodes (paper C.4)
  # Gradient accumulation inside each minibatch: its episodes and its ptx rows both split into this many
  # micro-batches (divisors of minibatch_size and ptx_batch_size), one policy and one value update after
  # them, equal to the minibatch's; memory of one micro-batch (docs/scaling.md). 1: one pass.
  c.microbatches = 1
  c.ptx_seq_len = 64             # tokens per pretraining sequence
  c.ema_decay = 0.992            # paper C.4: EMA of the policy weights
  # When the EMA steps: "iteration" (once per rollout batch, after its updates: decay^n weighs n iterations
  # back) or "update" (after every optimizer update: decay^n weighs n minibatch updates back, epochs x
  # minibatches of them per iteration). C.4 does not say; per iteration keeps the EMA's horizon independent
  # of the minibatch count (paper scale: 0.992 ~ the last 125 of ~500 iterations).
  c.ema_every = "iteration"
  c.discount = 1.0               # GAE discount; paper C.4: no discount (the paper's gamma is ptx_coef)
  c.gae_lambda = 0.95            # lm-human-preferences default (the paper gives none)
  c.clip = 0.2                   # paper C.4: PPO clip
  c.value_clip = 0.2             # lm-human-preferences: value clipping (cliprange_value)
  c.whiten_advantages = True     # lm-human-preferences default
  c.normalize_score = True       # lm-human-preferences: RM scores of the initial policy's samples scaled to std 1
  c.normalize_batches = 2        # rollouts that estimate that std
  c.temperature = 1.0            # paper C.4: sampling temperature 1
  c.prompt_len = 32              # prompt tokens (left-padded)
  c.max_new_tokens = 32          # response cap
  # A response that reaches max_new_tokens without EOS is scored by the RM with an EOS placed after its last
  # token (where the RM was trained to read a score); this is then added to its score as well (0: nothing).
  c.missing_eos_penalty = 0.0
  # "rm": the trained reward model (the paper). "gold": the task world's gold judge scores each sample, an
  # oracle RM: a diagnostic (not in the paper) of what PPO at these settings reaches with a perfect reward,
  # which separates "the RM is the limit" from "the RL budget is". One process only.
  c.reward = "rm"
  c.rm_uncertainty_coef = 0.0    # with an RM ensemble: reward = members' mean - this x their std (0: mean)
  # Comma-separated run dirs on the same world whose finished `rm` stages join this run's RM as ensemble
  # members (their trunks come from other seeds' pretraining and SFT); "": none (the paper's single RM).
  c.rm_runs = ""
  c.grad_clip = 1.0              # global gradient-norm clip, policy and value
  c.b1 = 0.9                     # paper C: Adam beta1
  c.b2 = 0.95                    # paper C: Adam beta2
  c.log_every = 1                # iterations between metric lines
  c.sample_every = 10            # iterations between sample texts (prompt, response, RM score, gold) in the log
  c.eval_every = 1_000_000       # (no periodic eval inside PPO yet)
  c.checkpoint_every = 10        # iterations between checkpoints
  c.keep_checkpoints = 2
  c.on_nonfinite = "stop"        # a NaN/inf loss or gradient: "stop", or "skip" the iteration's update
  c.max_nonfinite_skips = 3      # with "skip": stop after this many non-finite iterations in a row
  return c


def _model(**kw):
  c = ml_collections.ConfigDict(dict(
      style="gpt",               # "gpt" (GPT-2/3: learned positions, LayerNorm, GELU, tied) or "llama"
      vocab_size=1024,           # >= tokenizer pieces; padded up so "vocab" shards evenly
      max_len=128,               # context length
      d_model=128,               # residual width
      n_layers=2,                # transformer blocks
      n_heads=4,                 # query heads
      n_kv_heads=4,              # key/value heads (< n_heads: grouped-query attention)
      head_dim=32,               # per-head width
      d_ff=512,                  # MLP hidden width
      norm_eps=1e-5,             # LayerNorm / RMSNorm epsilon
      rope_theta=10000.0,        # RoPE base ("llama" only)
      tie_embeddings=True,       # share the unembedding with the embedding
      embed_dropout=0.0,         # dropout after the embedding
      attn_dropout=0.0,          # dropout on attention probabilities
      resid_dropout=0.0,         # dropout on each residual branch (the SFT stage overrides it)
      dtype="float32",           # compute dtype (bfloat16 on accelerators)
      param_dtype="float32",     # master weights (paper C: fp32 master weights)
      remat=False,               # recompute blocks in the backward pass
      remat_policy="",           # "" (follow remat), "none", "block_inputs", "nothing_saveable", "dots_saveable"
      scan_layers=False,         # layers as one nn.scan over stacked weights (compile time flat in depth)
      attention="einsum",        # "einsum" (written out) or "dot_product" (jax.nn.dot_product_attention:
                                 # cuDNN fused attention on GPU where it applies; same math elsewhere)
      # "llama" style only, for imported families (docs/real_data.md); the defaults are plain LLaMA.
      qkv_bias=False,            # q/k/v projection biases (Qwen2)
      embed_scale=False,         # embeddings times sqrt(d_model) (Gemma)
      glu_activation="silu",     # gated MLP: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
      sliding_window=0,          # > 0: attend to the last sliding_window slots only (Mistral); any style
      rope_scaling="",           # "llama3": LLaMA 3.1's RoPE frequency scaling, with the four below
      rope_factor=1.0,
      rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0,
      rope_original_max_len=0,
      attn_softcap=0.0,          # Gemma 2: c * tanh(x / c) on attention scores (0: off)
      final_softcap=0.0,         # Gemma 2: the same on the LM logits (0: off)
      query_pre_attn_scalar=0.0,  # Gemma 2: attention scale query_pre_attn_scalar ** -0.5 (0: head_dim)
      post_norms=False,          # Gemma 2: RMSNorm on the attention and MLP outputs
  ))
  c.update(kw)
  return c


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset, *options = [part.strip() for part in (arg or "tiny").split(",")]
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
  unknown = [o for o in options if o not in OPTIONS or (o in PAPER_ONLY and preset not in PAPER_PRESETS)]
  if unknown:
    raise ValueError(f"preset {arg!r}: options {unknown} not understood; every preset takes "
                     f"{sorted(set(OPTIONS) - set(PAPER_ONLY))} (e.g. 'tiny,round2'), a paper preset "
                     f"{PAPER_PRESETS} also {list(PAPER_ONLY)} (e.g. '1.3b,rm6b')")
  c = ml_collections.ConfigDict()
  c.preset = ",".join([preset, *options])  # which preset (and options) this config came from
  c.seed = 0                     # one seed for world, init, dropout and data order
  c.stages = "world,pretrain,sft,rm,ppo,ppo_noptx,eval"  # stages run by default, in order: the whole pipeline

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)      # (data, fsdp, tensor); -1 takes the remaining devices
  c.mesh.rules = parallel.DEFAULT_RULES  # logical axis -> mesh axes

  c.world = world_lib.get_config("small" if preset not in ("smoke", "tiny") else preset)
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.vocab_size = 1024     # sentencepiece BPE pieces
  c.tokenizer.byte_fallback = False  # 256 byte pieces for unseen characters (real text; too costly at vocab 1k)

  c.eval = ml_collections.ConfigDict()
  c.eval.n_prompts = 256         # held-out prompts judged at the end of pretrain/sft (0: skip)
  c.eval.batch_size = 64         # prompts per sampling batch
  c.eval.prompt_len = 48         # prompt tokens (left-padded); longer prompts are skipped and counted
  c.eval.prefix_len = 96         # extra room for a few-shot prefix (prompt_len + prefix_len + max_new_tokens <= max_len)
  c.eval.max_new_tokens = 32     # response cap
  c.eval.temperature = 1.0       # InstructGPT samples at 1 (paper, section 4 / appendix)
  c.eval.baseline_temperature = 0.7  # GPT-3 baselines at 0.7 (paper)
  c.eval.prompted_at_policy_temperature = True  # also judge prompted GPT at eval.temperature: one temperature
                                 # for all (tiny's SFT is much worse at 1 than at 0.7)
  c.eval.sft_at_baseline_temperature = True  # and SFT at eval.baseline_temperature: both single-temperature
                                 # orderings in the report, beside the paper's mixed one
  c.eval.few_shot = 2            # solved examples in the prompted-GPT prefix
  c.eval.report_prompts = 500    # eval stage: held-out prompts per set (eval/truthful/toxicity), <= world sizes
  c.eval.cloze_seq_len = 32      # eval stage: tokens per cloze context + choice
  c.eval.split = "test"          # eval stage: "test" (held-out prompts and group, W/eval: report once per final
                                 # config) or "dev" (dev prompts and group, W/eval_dev: every tuning decision)

  c.model = _model()
  c.pretrain = _lm_stage()
  c.sft = _lm_stage(
      final_lr_fraction=0.1,     # paper C.1: cosine decay to 10% of peak
      warmup_steps=0,            # paper C.1: no warm-up
  )
  c.sft.model_overrides = ml_collections.ConfigDict({"resid_dropout": 0.2})  # paper C.1: residual dropout 0.2
  c.sft.pretrain_mix = 0.0       # fraction of SFT examples that are pretraining windows (paper C.3 PPO init: 0.1)
  c.sft.demos_dir = ""           # read demos from here instead of workdir/world ("" = the task world)

  c.rm = _rm_stage()
  c.ppo = _ppo_stage()

  if preset == "smoke":
    c.tokenizer.vocab_size = 512
    c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, d_ff=256,
                   max_len=192)
    c.pretrain.update(steps=60, batch_size=16, seq_len=64, learning_rate=3e-3, warmup_steps=5, log_every=10,
                      eval_every=60, checkpoint_every=30)
    c.sft.update(steps=40, batch_size=16, seq_len=64, learning_rate=1e-3, log_every=10, eval_every=40,
                 checkpoint_every=20, eval_batch_size=16)
    c.sft.model_overrides.resid_dropout = 0.1
    c.eval.update(n_prompts=32, batch_size=32, max_new_tokens=16, report_prompts=32)
    c.rm.update(n_prompts=40, batch_size=8, eval_batch_size=8, learning_rate=1e-4, collect_batch_prompts=8,
                max_new_tokens=16, seq_len=48, log_every=2, eval_every=100, checkpoint_every=2, packing=True)
    c.ppo.update(n_prompts=50, total_episodes=64, batch_size=16, minibatch_size=8, ptx_batch_size=8,
                 learning_rate=1e-4, value_learning_rate=1e-4, warmup_iterations=1, ptx_coef=1.0,
                 max_new_tokens=16, checkpoint_every=2)
  elif preset == "tiny":
    c.model.update(d_model=128, n_layers=3, n_heads=4, n_kv_heads=4, head_dim=32, d_ff=512, max_len=192)
    c.pretrain.update(steps=1500, batch_size=32, seq_len=96, learning_rate=2e-3, warmup_steps=100,
                      log_every=50, eval_every=500, checkpoint_every=250)
    c.sft.update(steps=800, batch_size=32, seq_len=40, learning_rate=5e-4, log_every=25, eval_every=400,
                 checkpoint_every=200, keep_period=200,   # demos are <= 35 tokens here; 4 candidates
                 # paper C.3: PPO starts from SFT trained with 10% pretraining data. Without it the tiny SFT
                 # forgets pretraining (world v1: held-out LM loss 2.82 vs GPT's 0.72; 0.86 with it) and
                 # PPO-ptx's pretraining term drags the policy 2 nats from SFT.
                 pretrain_mix=0.1)
    # ppo.select_sft_by_rm stays off here: the tiny RM's scores of the 4 candidates differed by less than
    # their noise (world v1: 0.005-0.011 on 128 prompts) and picked step 400 of 800.
    c.eval.prompt_len = 32
    # lr 3e-4, not the paper's 9e-6 (a 6B model's; measured on world v1): at 1.5e-5 the tiny trunk barely
    # moves and the RM stays a linear probe of SFT features: 0.66 / 0.685 validation accuracy, 0.55 on pairs
    # of two SFT samples, and it agrees with the gold judge on 65.5% of (greedy, T=1) SFT answer pairs;
    # 3 epochs or 4 rankings per prompt did not change that. At 3e-4: 0.69 / 0.72, 0.59 and 72.8%, and PPO
    # on it no longer collapses gold. 1e-4 and 1e-3 land close (0.69-0.70 / 0.71-0.72).
    # eval_every 100: a validation pass (each valid prompt as ranked by every group, plus the policy-only pairs)
    # of round two's RM took ~35 s on a 2-core Zen 3, as long as ~40 training steps; at every 25 steps the passes
    # were ~280 s of its 459 s of training (tiny,round2 seed 0). At 100 the stage took 239 s instead of 561 (its
    # comparisons reused), with byte-identical parameters: validation trains nothing (a cadence field).
    # packing: round two's RM step, 16 prompts x 9 rows of 64 with 23% of the positions real, 0.402 s -> 0.123 s
    # packed into 44 rows (2-core Xeon, benchmarks/rm_packing.py); see rm.packing.
    c.rm.update(n_prompts=2000, batch_size=16, eval_batch_size=25, learning_rate=3e-4, collect_batch_prompts=32,
                log_every=5, eval_every=100, checkpoint_every=25, packing=True)
    # The ranked responses from SFT and from the pretrained model bare and prompted (paper 3.5: several
    # models' outputs; world v1 tiny: 0.655 validation accuracy vs 0.557 policy-only), plus SFT answers to
    # other prompts ("mismatched"): a hedge, an opening or a list form where the prompt asked for something
    # else is ranked low, so the RM does not score "I do not know." or "Answer:" well everywhere (without
    # them PPO hedged on 21% of plain dev questions, measured on tiny seed 0).
    c.rm.source_mix.update(policy=0.45, pretrain=0.2, pretrain_few_shot=0.2, mismatched=0.15)
    # beta 0.2 (world v2, chosen on the dev split): PPO-ptx's dev win rate vs SFT is 61.3% / 55.3% on seeds 0 / 1
    # at 0.2, 61.7% / 49.7% at 0.1 and 55.1% (seed 0) at the paper's 0.02. Below 0.2 the policy learns the RM's
    # blind spot, "I do not know." to answerable questions (seed 1 at 0.1: 41% of constrained prompts), which
    # the paper's larger RM does not have. World v1 chose 0.1 (lr 1e-4, 80 iterations). On tiny,round2 the 3-seed
  # sweep (dev, configs/sweeps/kl_coef.py) gives 60.0 / 61.8 / 64.0 / 64.8 / 65.3 / 61.9% at beta 0.01 / 0.02 /
  # 0.05 / 0.1 / 0.2 / 0.4 (docs/results.md).
    c.ppo.update(total_episodes=64 * 80, batch_size=64, minibatch_size=16, ptx_batch_size=32,
                 learning_rate=1e-4, value_learning_rate=1e-4, warmup_iterations=2, ptx_coef=1.0, kl_coef=0.2,
                 # The paper's 0.992 averages over its last ~125 of ~500 iterations; over tiny's 80 it would
                 # leave 0.992**80 = 53% of the SFT weights in the evaluated model. 0.9: the last ~10.
                 ema_decay=0.9)
    c.sft.model_overrides.resid_dropout = 0.1
  elif preset == "small":
    c.tokenizer.vocab_size = 2048
    c.model.update(vocab_size=2048, d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, head_dim=32, d_ff=1024,
                   max_len=256)
    c.pretrain.update(steps=4000, batch_size=64, seq_len=128, learning_rate=1e-3, warmup_steps=200,
                      log_every=50, eval_every=1000, checkpoint_every=500)
    c.sft.update(steps=1000, batch_size=64, seq_len=96, learning_rate=3e-4, log_every=50, eval_every=500,
                 checkpoint_every=500)
  else:
    _paper(c, preset, options)
  if "round2" in options:
    c.rm.rounds = 2
    c.stages = "world,pretrain,sft,rm_round1,ppo_round1,rm,ppo,ppo_noptx,eval"
    if preset == "tiny":
      # Fits 15 minutes on a 2-core CPU (with rm.packing). Chosen on the dev split, 3 seeds: PPO-ptx's dev win
      # rate vs SFT 65.8 / 65.8 / 63.4% against 63.6 / 64.6 / 63.8% with 1500 pretraining steps and 80
      # iterations of round one's PPO-ptx (which only supplies round two's samples). eval.n_prompts is the
      # quick judged check at the end of pretrain and SFT, not the eval stage's report.
      c.pretrain.steps = 1200
      c.rm.round1_ppo_episodes = 40 * c.ppo.batch_size
      c.eval.n_prompts = 128
  return c


def _gpt3_shape(preset: str) -> dict:
  layers, width, heads = GPT3_SHAPES[preset]
  return dict(d_model=width, n_layers=layers, n_heads=heads, n_kv_heads=heads, head_dim=128, d_ff=4 * width)


def _paper(c, preset, options=()):
  """GPT-3 shapes at the paper's lengths and settings (Ouyang et al. 2022, appendix C).

  Lengths (paper C: a 2k-token context; prompts longer than 1k tokens filtered out, responses limited
  to 1k tokens): the 2048 positions split into 1024 for the prompt, BOS included, and 1024 for the
  response, its EOS included. Our sequences carry a BOS the GPT-3 ones do not, so a prompt keeps 1023
  tokens (the paper: 1024); a sampled response keeps 1023 tokens plus an EOS, the one PPO forces after
  a truncated response so the RM can score it (ppo.prompt_len + ppo.max_new_tokens + 1 <= max_len).
  """
  c.tokenizer.vocab_size = 50257            # GPT-3 byte-level BPE
  c.model.update(
      vocab_size=50304,                     # 50257 padded to a multiple of 128 for even sharding
      max_len=2048,                         # paper C: 2k-token context
      **_gpt3_shape(preset),                # paper C: GPT-3 architecture (Brown et al. 2020 table 2.1)
      dtype="bfloat16",                     # paper C: fp16 activations; bf16 is the TPU equivalent
      param_dtype="float32",                # paper C: fp32 master weights
      remat=True,
      # One nn.scan over the blocks: under FSDP the sampler gathers one layer's weights at a time instead of
      # keeping every layer's gathered copy of all four PPO models live through its loop (docs/scaling.md).
      scan_layers=True)
  # Fully sharded data parallel. 175b: the SFT batch of 8 (C.1) splits at most 8 ways, so fsdp 8 and the
  # remaining chips tensor-parallel (docs/scaling.md: (1,8,8) and (1,8,16)).
  c.mesh.shape = (1, 8, -1) if preset == "175b" else (1, -1, 1)
  c.world = world_lib.get_config("small")   # the embedded world still works for dry runs
  prompt, response = 1024, 1024             # paper C: prompts over 1k tokens dropped, responses capped at 1k
  c.pretrain.update(steps=10000, batch_size=256, learning_rate=2e-4, warmup_steps=500,
                    seq_len=2048)           # paper C: 2k context (GPT-3's own pretraining windows)
  c.sft.update(
      batch_size=8 if preset == "175b" else 32,          # paper C.1: batch 32 (1.3B, 6B), 8 (175B)
      learning_rate=5.03e-6 if preset == "175b" else 9.65e-6,  # paper C.1
      final_lr_fraction=0.1, warmup_steps=0,             # paper C.1: cosine to 10%, no warm-up
      seq_len=2048,                         # paper C: 2k context; a demo is <= 1k prompt + 1k response
      # paper C.3: PPO's policy starts from an SFT model trained with 10% pretraining data mixed in. One
      # sft stage here is both the SFT baseline and that init (ppo.policy_init="sft"): C.1's schedule
      # with C.3's mix (the paper trains the init separately: 2 epochs, lr 5e-6 / 1.04e-5 / 2.45e-6).
      pretrain_mix=0.1)
  # paper C.1: 16 epochs over ~13k demos; the pretraining windows come on top (a tenth of each batch).
  c.sft.steps = math.ceil(16 * 13000 / (1 - c.sft.pretrain_mix) / c.sft.batch_size)
  c.sft.model_overrides.resid_dropout = 0.2  # paper C.1
  # Micro-batches (gradient accumulation; not a paper setting: the step is the paper's batch either way).
  # At these lengths one pass does not fit a chip: the RM step (64 prompts x K <= 9 x 2048) compiles to
  # 65.7 GiB a chip on 1.3b (1,16,1), 26.3 in 4 micro-batches (a v4 has 28.8 usable); the PPO update's
  # activations are mostly its ptx minibatch of 512 x 2048 (docs/scaling.md, "Micro-batches"). One prompt
  # and one episode a device per micro-batch on the presets' meshes: 4 on 8 or 16 chips (1.3b, 6b; 32 chips
  # need 2: each micro-batch's rows split over data x fsdp), 8 on 175b's fsdp 8.
  micro = 8 if preset == "175b" else 4
  c.rm.update(
      prompt_len=prompt,                    # paper C: prompts over 1k tokens dropped (BOS included here)
      max_new_tokens=response - 1,          # paper C: responses capped at 1k tokens, the EOS included
      seq_len=2048,                         # paper C: 2k context: BOS + prompt + response + EOS
      microbatches=micro)
  c.ppo.update(
      policy_init="sft",                    # paper C.3: the SFT model trained with 10% pretraining data
      prompt_len=prompt,                    # paper C: prompts over 1k tokens dropped (BOS included here)
      max_new_tokens=response - 1,          # paper C: 1k-token responses; + 1 for the EOS the RM reads
      ptx_seq_len=2048,                     # paper C: 2k context for the pretraining (ptx) sequences
      value_learning_rate=5e-6 if preset == "175b" else 9e-6,  # paper C.4: value lr 9e-6 (5e-6, 175B policy)
      microbatches=micro)
  c.eval.update(
      prompt_len=prompt,                    # paper C: prompts over 1k tokens dropped
      # The few-shot prefix of the prompted GPT-3 baseline shares the 1k prompt budget: 1k + 1k fill the
      # 2k context (the paper gives it no separate room); a prefixed prompt that does not fit is skipped.
      prefix_len=0,
      max_new_tokens=response)              # paper C: responses capped at 1k tokens
  if "rm6b" in options:
    # paper C.2: one 6B reward model for every policy size; C.4: the value function is initialised
    # from it, so it is 6B too (ppo.build gives the value the RM's model). Its trunk comes from
    # rm.base_workdir, a run of the 6b preset on this run's world (docs/pipeline.md).
    c.rm.model_shape.update(_gpt3_shape("6b"))
