"""Every config field, its default and a one-line meaning; plus checks run before training.

Experiment files in configs/ start from `base()` and override what differs.
Fields are read directly (config.rl.beta); a misspelt override fails at the
command line because configs are locked.
"""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import jax.numpy as jnp
import ml_collections
from absl import logging

from rcfd_jax import prompts, step
from rcfd_jax.errors import UserError, need

OBJECTIVES = tuple(step.OBJECTIVES)  # rl.objective: the objectives the step knows by name
BASELINES = tuple(step.BASELINES)    # rl.baseline: the advantage baselines the step knows by name
GROUP_OBJECTIVES = ("rcfd_group", "rcfd_tilt")  # advantages centred within each prompt's samples
TILT_PROPOSALS = ("policy", "reference")         # where rcfd_tilt's samples come from
CALIBRATION_TARGETS = ("demo", "mean")  # rl.rcfd_target: rcfd_jax.demos.calibration_targets
ALGORITHMS = ("reinforce", "ppo")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.model.dtype -> the policy's dtype


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "rl"                    # rl (this trainer) | sft | classifier (rcfd_jax.supervised)
  c.seed = 0                        # seeds parameters of new heads, sampling and data order
  c.total_steps = 100               # RL iterations (one rollout batch each)
  c.log_every_steps = 1             # metrics come off the device only on these steps
  c.assets_dir = ""                 # rcfd_jax.reproduce.prepare builds the tiny assets here first if missing; "" = none

  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"         # parameters and activations: float32 | bfloat16 (logits stay fp32)
  c.model.remat = False             # recompute decoder-layer activations in the backward pass: the update
                                    # keeps one layer's activations instead of all, for one more forward
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0             # 0 = full fine-tuning; >0 = LoRA adapters, pi_0 = adapters off
  c.model.lora.alpha = 64.0         # LoRA scale is alpha / rank
  c.model.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # Dense attribute names to adapt

  c.policy = ml_collections.ConfigDict()
  c.policy.path = ""                # HF model directory or hub id of the initial (SFT) policy

  c.data = prompts.default_data_config()

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_step = 8    # B: prompts per iteration (global, over all processes)
  c.rollout.samples_per_prompt = 1  # k: completions per prompt (leave-one-out needs k >= 2)
  c.rollout.max_new_tokens = 32     # N: generation budget
  c.rollout.temperature = 1.0       # sampling temperature
  c.rollout.top_k = 0               # 0 disables top-k
  c.rollout.top_p = 1.0             # 1.0 disables nucleus sampling
  c.rollout.micro_batches = 1       # sample and score the B prompts in this many sequential chunks: one
                                    # chunk's KV cache and scoring activations are alive at a time

  c.reward = ml_collections.ConfigDict()
  c.reward.sources = ("loglik",)    # reward vector: loglik | length | classifier | function | words:LEXICON
                                    # (rcfd_jax.rewards; the first is the primary, logged as reward_mean)
  c.reward.cache_dir = "~/.cache/rcfd_jax/demo_rewards"  # demonstration rewards, keyed by the content of models, code, data
  c.reward.demo_batch_size = 32     # batch for scoring demonstrations once per dataset
  c.reward.classifier = ml_collections.ConfigDict()
  c.reward.classifier.path = ""     # HF *ForSequenceClassification directory or hub id
  c.reward.classifier.label_index = 0  # which logit is the reward (1 = positive for a sentiment model)
  c.reward.classifier.max_tokens = 512  # RM input length when it re-tokenizes text
  c.reward.classifier.input = "concat"  # concat: RM reads prompt+completion | pair: (prompt, completion)
  c.reward.function = ml_collections.ConfigDict()
  c.reward.function.name = ""       # registered reward function (rcfd_jax.rewards.register)
  c.reward.function.module = ""     # module imported first so it can register its functions

  c.rl = ml_collections.ConfigDict()
  c.rl.objective = "rcfd"           # max | kl | weighted | rcfd (paper) | rcfd_group (calibrates each prompt's mean)
                                    # | rcfd_tilt (toward the least-KL policy with the demonstrations' mean)
  c.rl.algorithm = "reinforce"      # reinforce | ppo
  c.rl.baseline = "whiten"          # advantage: whiten (paper) | loo | none | gae (value head, GAE)
  c.rl.rcfd_target = "demo"         # what rcfd/rcfd_group/rcfd_tilt calibrate to: demo (each prompt's R(x, y_d), paper)
                                    # | mean (the training demonstrations' mean R_d; demos.calibration_targets)
  c.rl.tilt_proposal = "policy"     # rcfd_tilt's samples: policy (on-policy, weights read pi_0 / pi) | reference
                                    # (sampled from pi_0, weights read the reward only; baseline none, reinforce)
  c.rl.beta = 0.0                   # KL coefficient for objective=kl (initial value when adaptive)
  c.rl.kl_estimator = "k1"          # k1 | k2 | k3, per token, summed over the sequence
  c.rl.adaptive_kl = False          # adapt beta after every step (objective kl), on adaptive_kl_signal
  c.rl.adaptive_kl_signal = "kl"    # kl: toward kl_target | demo_reward: toward the demonstrations' mean reward
  c.rl.kl_target = 6.0              # target sequence KL for the adaptive controller (signal kl)
  c.rl.kl_horizon = 10000.0         # controller horizon in samples
  c.rl.alpha = (1.0,)               # objective=weighted: one weight per reward source
  c.rl.clip_eps = 0.3               # PPO ratio clip (paper: 0.3)
  c.rl.loss_agg = "token_mean"      # token_mean | seq_mean
  c.rl.ppo = ml_collections.ConfigDict()
  c.rl.ppo.epochs = 1               # passes over each rollout batch
  c.rl.ppo.minibatches = 1          # optimizer steps per pass
  c.rl.ppo.vf_coef = 0.1            # value loss weight
  c.rl.ppo.value_clip = 0.2         # value clipping range
  c.rl.ppo.gamma = 1.0              # GAE discount
  c.rl.ppo.lam = 0.95               # GAE lambda
  c.rl.max_bad_steps = 5            # stop after this many skipped (non-finite) updates in a row

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 5e-5      # Adam (paper: 5e-5)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.max_grad_norm = 1.0       # global-norm clipping; 0 disables
  c.optim.grad_accum = 1            # micro-batches per minibatch (memory, not semantics)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, -1, 1)         # (data, fsdp, tensor); -1 takes the remaining devices
  c.mesh.devices = 0                # use the first N devices; 0 = all (global over processes)
  c.mesh.device_memory_gib = 0.0    # memory each program must fit per device at start-up; 0 = what the
                                    # backend reports (TPU, GPU; a CPU reports none: no check)

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # host:port of process 0; empty = autodetect or single process
  c.distributed.num_processes = 0   # 0 = autodetect
  c.distributed.process_id = -1     # -1 = autodetect
  c.distributed.autodetect = True   # join a detected SLURM (srun), Open MPI or TPU-slice job
  c.distributed.num_cpu_devices = 0  # >0 forces this many CPU devices per process (tests, local runs)
  c.distributed.initialization_timeout_s = 300  # seconds to wait for every process to connect
  c.distributed.heartbeat_timeout_s = 100  # a process silent this long is dead; the others stop
  c.distributed.shutdown_timeout_s = 300  # seconds to wait at exit for the other processes

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 50     # save period; also saved at the end and on SIGTERM
  c.checkpoint.keep = 3             # checkpoints kept

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 50           # evaluation period; also run at the end
  c.eval.num_prompts = 64           # validation prompts per evaluation
  c.eval.samples_per_prompt = 1     # completions per prompt; >= 2 adds the within-prompt spread monitors
                                    # and rcfd_group's value (per-sample metrics read the first one)
  c.eval.temperature = 1.0          # sampling temperature for evaluation
  c.eval.bins = 20                  # histogram bins for the alignment metric
  return c


def paper_setup(c: ml_collections.ConfigDict, policy_path: str) -> ml_collections.ConfigDict:
  """The paper's training setup for a 7B policy: LoRA r32/a64 in bf16, Adam 5e-5, PPO clip 0.3 with
  batch-whitened rewards (no critic), evaluation and checkpoints every 50 steps; decoder layers
  rematerialised in the backward pass (benchmarks/memory.py: the update step's peak on 8
  devices falls from 60.2 to 6.9 GiB per device). Tensor-parallel pairs: the paper's batches of
  500 and 400 prompts split evenly over the other devices of a 4- or 8-chip slice (docs/tpu.md)."""
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.mesh.shape = (1, -1, 2)
  c.model.lora.rank = 32
  c.model.lora.alpha = 64.0
  c.model.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")
  c.policy.path = policy_path
  c.rl.objective = "rcfd"
  c.rl.algorithm = "ppo"
  c.rl.baseline = "whiten"
  c.rl.clip_eps = 0.3
  c.optim.learning_rate = 5e-5
  c.checkpoint.every_steps = 50
  c.eval.every_steps = 50
  c.eval.num_prompts = 500
  return c


def check(c: ml_collections.ConfigDict) -> None:
  """Rejects inconsistent configs before anything is loaded or written."""
  need(c.rl.objective in OBJECTIVES, f"config.rl.objective={c.rl.objective!r}; use one of {OBJECTIVES}")
  need(c.rl.algorithm in ALGORITHMS, f"config.rl.algorithm={c.rl.algorithm!r}; use one of {ALGORITHMS}")
  need(c.rl.baseline in BASELINES, f"config.rl.baseline={c.rl.baseline!r}; use {'|'.join(BASELINES)}")
  need(c.rl.kl_estimator in ("k1", "k2", "k3"), f"config.rl.kl_estimator={c.rl.kl_estimator!r}; use k1|k2|k3")
  need(c.rl.adaptive_kl_signal in ("kl", "demo_reward"),
       f"config.rl.adaptive_kl_signal={c.rl.adaptive_kl_signal!r}; use kl|demo_reward")
  need(c.rl.beta >= 0, f"config.rl.beta={c.rl.beta} is negative; the KL coefficient must be >= 0")
  # Only the kl objective reads beta: elsewhere a coefficient would be ignored, and the run would train
  # without the anchor its config shows.
  penalty = []
  if c.rl.beta != 0:
    penalty.append(f"config.rl.beta={c.rl.beta}")
  if c.rl.adaptive_kl:
    penalty.append("config.rl.adaptive_kl=True")
  need(c.rl.objective == "kl" or not penalty,
       f"{' and '.join(penalty)} {'sets' if len(penalty) == 1 else 'set'} the KL penalty of objective kl, and "
       f"objective {c.rl.objective!r} has none: set config.rl.objective=kl, or leave config.rl.beta at 0 and "
       "config.rl.adaptive_kl False")
  need(c.rl.adaptive_kl_signal == "kl" or (c.rl.adaptive_kl and c.rl.objective == "kl" and c.rl.beta > 0),
       "config.rl.adaptive_kl_signal=demo_reward moves the kl objective's beta: set config.rl.objective=kl, "
       "config.rl.adaptive_kl=True and a starting config.rl.beta > 0")
  need(c.rl.loss_agg in ("token_mean", "seq_mean"), f"config.rl.loss_agg={c.rl.loss_agg!r}")
  need(c.model.dtype in DTYPES, f"config.model.dtype={c.model.dtype!r}; use {'|'.join(DTYPES)}")
  need(c.policy.path != "", "config.policy.path is empty; set it to a HF model directory or hub id")
  need(c.total_steps > 0, "config.total_steps must be positive")
  need(c.rollout.max_new_tokens > 0, "config.rollout.max_new_tokens must be positive")
  k = c.rollout.samples_per_prompt
  need(k >= 1, "config.rollout.samples_per_prompt must be >= 1")
  need(not (c.rl.baseline == "loo" and k < 2),
       "config.rl.baseline=loo needs config.rollout.samples_per_prompt >= 2")
  if c.rl.objective in GROUP_OBJECTIVES:
    need(k >= 2, f"config.rl.objective={c.rl.objective} weighs each sample against the prompt's other samples: "
         f"set config.rollout.samples_per_prompt >= 2 (it is {k})")
    need(c.rl.baseline in ("whiten", "none"),
         f"config.rl.objective={c.rl.objective} is its own within-prompt advantage: set config.rl.baseline "
         f"to whiten or none (it is {c.rl.baseline})")
  if c.rl.objective == "rcfd_tilt":
    need(c.rollout.temperature == 1.0 and c.rollout.top_k == 0 and c.rollout.top_p == 1.0,
         "config.rl.objective=rcfd_tilt weighs samples by the policy's own probabilities, so it samples the "
         "policy as it is: set config.rollout.temperature=1.0, top_k=0 and top_p=1.0")
    need(len(c.reward.sources) == 1,
         f"config.rl.objective=rcfd_tilt calibrates one reward and config.reward.sources has "
         f"{len(c.reward.sources)}: keep one source, or use rcfd_group for several")
  need(c.rl.tilt_proposal in TILT_PROPOSALS,
       f"config.rl.tilt_proposal={c.rl.tilt_proposal!r}; use one of {TILT_PROPOSALS}")
  if c.rl.tilt_proposal == "reference":
    need(c.rl.objective == "rcfd_tilt" and c.rl.baseline == "none" and c.rl.algorithm == "reinforce",
         "config.rl.tilt_proposal=reference trains rcfd_tilt on pi_0's samples by their weighted likelihood, "
         "which a baseline or PPO's ratio would bias: set config.rl.objective=rcfd_tilt, "
         f"config.rl.baseline=none and config.rl.algorithm=reinforce (they are {c.rl.objective}, "
         f"{c.rl.baseline}, {c.rl.algorithm})")
  need(c.rl.rcfd_target in CALIBRATION_TARGETS,
       f"config.rl.rcfd_target={c.rl.rcfd_target!r}; use one of {CALIBRATION_TARGETS}")
  need(c.rl.rcfd_target == "demo" or c.rl.objective in ("rcfd", "rcfd_group", "rcfd_tilt"),
       f"config.rl.rcfd_target={c.rl.rcfd_target!r} sets what rcfd, rcfd_group and rcfd_tilt calibrate to; "
       f"objective {c.rl.objective!r} reads no target: leave it at 'demo'")
  if c.rl.objective == "weighted":
    need(len(c.rl.alpha) == len(c.reward.sources),
         f"config.rl.alpha has {len(c.rl.alpha)} weights for {len(c.reward.sources)} reward sources")
  need(c.rollout.micro_batches >= 1 and c.rollout.prompts_per_step % c.rollout.micro_batches == 0,
       f"config.rollout.prompts_per_step={c.rollout.prompts_per_step} is not divisible by "
       f"config.rollout.micro_batches={c.rollout.micro_batches}")
  rollouts = c.rollout.prompts_per_step * k
  per_update = c.rl.ppo.minibatches * c.optim.grad_accum
  need(rollouts % per_update == 0,
       f"prompts_per_step*samples_per_prompt={rollouts} is not divisible by "
       f"rl.ppo.minibatches*optim.grad_accum={per_update}")
  if c.rl.algorithm == "reinforce":
    need(c.rl.ppo.epochs == 1, "config.rl.ppo.epochs > 1 needs config.rl.algorithm=ppo")
  need(c.checkpoint.every_steps > 0 and c.eval.every_steps > 0, "checkpoint/eval every_steps must be positive")
  need(c.eval.samples_per_prompt >= 1, "config.eval.samples_per_prompt must be >= 1")
  if c.data.demo_max_tokens > c.rollout.max_new_tokens:
    # Both budgets count the EOS: a completion is at most max_new_tokens tokens, its last the EOS,
    # and a demonstration is truncated to demo_max_tokens - 1 tokens plus the EOS, as the paper
    # truncates them to the generation budget. A longer cap lets y_d outgrow every completion.
    logging.warning("data.demo_max_tokens=%d keeps demonstrations longer than the generation budget "
                    "rollout.max_new_tokens=%d; length-sensitive rewards of R(x, y_d) then exceed what the "
                    "policy can reach: set data.demo_max_tokens <= rollout.max_new_tokens (both count the EOS)",
                    c.data.demo_max_tokens, c.rollout.max_new_tokens)


# ---------------------------------------------------------------- experiment files


def experiment_dir() -> Path:
  """configs/: beside the package in a checkout, inside it (rcfd_jax/configs) once pip-installed."""
  package = Path(__file__).resolve().parent
  for d in (package / "configs", package.parent / "configs"):
    if d.is_dir():
      return d
  raise UserError(f"no configs/ directory in {package} or beside it; reinstall rcfd_jax")


def experiment_file(name: str) -> Path:
  """configs/NAME.py, wherever experiment_dir() finds configs/."""
  path = experiment_dir() / f"{name}.py"
  if not path.is_file():
    names = sorted(p.stem for p in path.parent.glob("*.py"))
    raise UserError(f"no config {name!r} in {path.parent}; there are {', '.join(names)}")
  return path


def load_file(path: str | Path) -> types.ModuleType:
  """A config file as a module, loaded by path as --config=PATH loads it: no package `configs` needed."""
  path = Path(path)
  spec = importlib.util.spec_from_file_location(f"configs_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
