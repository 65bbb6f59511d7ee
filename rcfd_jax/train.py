"""The training loop: setup, rollout, reward, update, log, checkpoint, eval.

`run(config, workdir)` is everything main.py calls. It reads top to bottom;
the maths lives in rcfd_jax.step and rcfd_jax.rl, the I/O in checkpoint,
metrics and evaluation.
"""

from __future__ import annotations

import dataclasses
import errno
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from rcfd_jax import (batching, bridge, checkpoint, config as config_lib, demos, distributed, metrics, models,
                      optim, policy as policy_lib, programs, prompts, rewards as rewards_lib, sharding, validate)
from rcfd_jax.errors import UserError, need
from rcfd_jax.files import check_workdir, prepare_workdir
from rcfd_jax.models import hf
from rcfd_jax.policy import load_tokenizer
from rcfd_jax.reproduce import prepare
from rcfd_jax.step import Frozen, StepConfig, TrainState


@dataclasses.dataclass
class Setup:
  """Everything built once before the loop."""
  config: Any
  mesh: Any
  tokenizer: Any
  parts: policy_lib.PolicyParts
  frozen: Frozen
  rewards: rewards_lib.Rewards
  train: prompts.PromptDataset
  val: prompts.PromptDataset
  batcher: batching.Batcher
  demo_train: np.ndarray | None  # R(x, y_d) per example, [n, K]; None until score_demonstrations
  demo_val: np.ndarray | None
  sc: StepConfig
  tx: optax.GradientTransformation
  state_sh: TrainState
  steps: Steps | None = None    # the run's programs (compile_steps), built once


@dataclasses.dataclass
class Trainer:
  """What the programs are built from; the same for a run (weights) and for rcfd_jax.aot (abstract)."""
  parts: policy_lib.PolicyParts
  frozen: Frozen
  rewards: rewards_lib.Rewards
  sc: StepConfig
  tx: optax.GradientTransformation
  state: TrainState
  state_sh: TrainState


def make_trainer(config, mesh, tokenizer, eos_id: int, pad_id: int, load=models.load_pretrained,
                 load_rm_tokenizer=rewards_lib.load_rm_tokenizer) -> Trainer:
  """Policy (+ LoRA, value head), reward sources, step config, optimizer and initial state on `mesh`.

  `load` is models.load_pretrained for training; rcfd_jax.aot passes
  models.load_abstract (and a tokenizer loader that tolerates directories
  holding only config.json), so everything below is the same code with
  abstract values.
  """
  lm = load(config.policy.path, task="causal_lm", dtype=config_lib.DTYPES[config.model.dtype], mesh=mesh)
  positions = config.data.max_prompt_tokens + config.rollout.max_new_tokens
  need(positions <= lm.config.max_positions,
       f"config.data.max_prompt_tokens {config.data.max_prompt_tokens} + max_new_tokens "
       f"{config.rollout.max_new_tokens} = {positions} exceeds the policy's context "
       f"{lm.config.max_positions}; lower config.data.max_prompt_tokens or config.rollout.max_new_tokens")
  rewards = rewards_lib.build(config.reward, tokenizer, mesh, load, load_rm_tokenizer)
  parts, ref = policy_lib.build(lm, config, value_head=config.rl.baseline == "gae", mesh=mesh)
  rm_state = rewards.classifier.state if rewards.classifier is not None and rewards.classifier.in_graph else None
  c = config.optim
  tx = optim.adamw(c.learning_rate, c.max_grad_norm, c.weight_decay, b1=c.b1, b2=c.b2)  # paper: Adam, lr 5e-5
  state, state_sh = init_state(config, parts.trainable, tx, mesh)
  return Trainer(parts, Frozen(parts.frozen, ref, rm_state), rewards,
                 StepConfig.from_config(config, eos_id, pad_id), tx, state, state_sh)


def setup(config) -> tuple[Setup, TrainState]:
  """Loads tokenizer, data and models and builds the run's programs; demonstrations not yet scored."""
  mesh = sharding.mesh_from_config(config.mesh)
  # The model directories before the data: a directory without tokenizer files loads as an
  # empty tokenizer, which would surface as "no examples left" rather than as what it is.
  hf.check_dir(hf.resolve_dir(config.policy.path), tokenizer=True)
  if any(src.kind == "classifier" for src in rewards_lib.parse_sources(config.reward.sources)):
    hf.check_dir(hf.resolve_dir(config.reward.classifier.path), tokenizer=True)
  tokenizer = load_tokenizer(config.policy.path)
  splits = prompts.load(config.data, tokenizer)
  t = make_trainer(config, mesh, tokenizer, tokenizer.eos_token_id, tokenizer.pad_token_id)
  if t.rewards.classifier is not None:
    t.rewards.classifier.check_reads(splits.train.prompt_texts[:64] + splits.train.demo_texts[:64])
  batcher = batching.Batcher(splits.train, config.rollout.prompts_per_step, config.data, tokenizer.pad_token_id)
  s = Setup(config, mesh, tokenizer, t.parts, t.frozen, t.rewards, splits.train, splits.validation, batcher,
            None, None, t.sc, t.tx, t.state_sh)
  s.steps = compile_steps(s, t.state)
  return s, t.state


def check_memory(s: Setup, state: TrainState) -> dict:
  """Compiles every program of the run now and stops with one line if one cannot fit a device.

  The limit is config.mesh.device_memory_gib, else what the backend reports
  (TPU, GPU; a CPU reports none, and nothing is checked). The jitted
  functions the loop calls reuse these compilations.
  """
  device = s.mesh.devices.flat[0]
  limit = programs.device_memory(s.config.mesh.device_memory_gib, device)
  resident = programs.resident_bytes(state, s.frozen, s.rewards)
  return programs.compile_checked(s.steps.programs, resident, limit, f"a {device.platform.upper()} device",
                                  programs.advice(s.config))[1]


def score_demonstrations(s: Setup) -> Setup:
  """R(x, y_d) of the training and validation demonstrations, from the cache when present."""
  s.demo_train, s.demo_val = demos.rewards_for(
      (s.train, s.val), s.steps.programs, s.parts, s.frozen, s.rewards, s.tokenizer, s.config)
  return s


def build(config, workdir: Path) -> tuple[Setup, TrainState]:
  """setup + score_demonstrations: a Setup ready for the loop (run also checks memory in between)."""
  del workdir  # nothing is written under it before the loop
  s, state = setup(config)
  return score_demonstrations(s), state


def init_state(config, params: nnx.State, tx, mesh) -> tuple[TrainState, TrainState]:
  """The initial TrainState, born with explicit shardings (returned too, for jit)."""
  rep = sharding.replicated(mesh)
  param_sh, opt_sh = optim.shardings(tx, params, mesh)
  state_sh = TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep, beta=rep, bad_steps=rep,
                        skipped_total=rep)

  def make(params):
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(config.seed)),
        beta=jnp.asarray(config.rl.beta, jnp.float32), bad_steps=jnp.zeros((), jnp.int32),
        skipped_total=jnp.zeros((), jnp.int32))

  return sharding.run_placed(make, state_sh, params), state_sh


@dataclasses.dataclass
class Steps:
  """The jitted programs of one run (rcfd_jax.programs)."""
  fused: Any         # (state, frozen, batch) -> (state, metrics), when no reward needs the host
  rollout: Any       # (state, frozen, batch) -> Rollout, when a reward needs the host
  update: Any        # (state, frozen, rollout, host_rewards) -> (state, metrics)
  eval_rollout: Any  # one sample per prompt at the evaluation temperature
  programs: dict     # name -> programs.Program, all of the above and the reward-model and demo programs
  rm: Any            # rm(ids, mask) -> scores, the host bridge's reward model (None without one)


def compile_steps(s: Setup, state: TrainState | None = None) -> Steps:
  """The run's jitted programs, with explicit shardings and donated state (rcfd_jax.programs).

  `state` gives the train state's shapes; by default those s.state_sh describes.
  """
  if state is None:
    state = init_state(s.config, programs.abstract_of(s.parts.trainable), s.tx, s.mesh)[0]
  progs = programs.build(s.parts, s.frozen, s.rewards, s.sc, s.tx, state, s.config)
  fn = lambda name: progs[name].fn if name in progs else None
  rm = programs.host_rm(progs, s.rewards.classifier) if s.rewards.classifier is not None else None
  return Steps(fn("iteration"), fn("rollout"), fn("update"), fn("eval_rollout"), progs, rm)


def run(config, workdir: str) -> TrainState:
  """Trains per config, resuming from workdir's latest good checkpoint."""
  distributed.initialize(config.distributed)
  config_lib.check(config)
  check_workdir(workdir)
  if config.assets_dir:  # the tiny config's corpus and random models, built on first use
    prepare.build(config.assets_dir)
  s, state = setup(config)
  check_memory(s, state)
  s = score_demonstrations(s)
  target = demos.calibration_targets(s.demo_train, config.rl.rcfd_target)  # what the batches calibrate to
  wd = prepare_workdir(workdir)
  ckpt = checkpoint.Checkpointer(wd / "checkpoints", max_to_keep=config.checkpoint.keep)
  writer = metrics.MetricsWriter(wd, config.total_steps)
  start = 0
  restored = ckpt.restore_latest(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  if restored is not None:
    start, state, meta = restored
    s.batcher.check_state(start, meta["data"])
    logging.info("resumed from step %d", start)
  writer.truncate_after(start)
  if jax.process_index() == 0:
    (wd / "config.json").write_text(config.to_json_best_effort(indent=2))
  steps = s.steps
  t_last = time.perf_counter()
  write_error = None
  try:
    with checkpoint.preemption_guard() as guard:
      for step in range(start, config.total_steps):
        # Rollout, reward, update: one compiled call unless a reward needs the host.
        indices = s.batcher.indices(step)
        batch = bridge.device_batch(s, s.batcher, indices, target)
        if steps.fused is not None:
          state, m = steps.fused(state, s.frozen, batch)
        else:
          ro = steps.rollout(state, s.frozen, batch)
          with rewards_lib.Timer() as bridge_time:
            hr = bridge.host_rewards(s, ro, indices, steps.rm)
            hr = {k: sharding.put_global(v, sharding.rows_sharding(s.mesh, v.shape)) for k, v in hr.items()}
          state, m = steps.update(state, s.frozen, ro, hr)
        done = step + 1
        # Log: metrics leave the device only here.
        if done % config.log_every_steps == 0 or done == config.total_steps:
          m = {k: float(v) for k, v in jax.device_get(m).items()}
          now = time.perf_counter()
          m["tokens_per_second"] = m["generated_tokens"] * config.log_every_steps / max(now - t_last, 1e-9)
          t_last = now
          if steps.fused is None:
            m["bridge_seconds"] = bridge_time.seconds
          writer.write(done, m)
          if int(jax.device_get(state.bad_steps)) >= config.rl.max_bad_steps:
            raise UserError(f"{config.rl.max_bad_steps} updates in a row had non-finite rewards, losses or "
                            f"gradients; the last good parameters are in {wd / 'checkpoints'}")
        # Checkpoint, then evaluate.
        preempted = guard.should_stop(done)  # multi-process: a sync point agreed by all
        if done % config.checkpoint.every_steps == 0 or done == config.total_steps or preempted:
          ckpt.save(done, state, _meta(s, config, state, done))
        if done % config.eval.every_steps == 0 or done == config.total_steps:
          validate.run(s, steps, state, wd, done)
          t_last = time.perf_counter()  # tokens_per_second counts training time only
        if preempted:
          logging.warning("SIGTERM received: saved step %d and stopping", done)
          break
  except OSError as e:
    if e.errno not in _DISK_ERRORS:
      raise
    write_error = e
  finally:  # a stop on bad steps or an error still finishes the pending save
    closing_error = _finish(ckpt, writer)
  if write_error or closing_error:
    e = write_error or closing_error
    done = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    raise UserError(f"writing under {wd} failed ({e.strerror or e}{': ' + e.filename if e.filename else ''}); "
                    "free space or make it writable, then rerun the same command: it resumes from "
                    f"checkpoint step {done[-1] if done else 'none'}, the last complete one")
  distributed.shutdown()
  return state


# A full, read-only or failing disk: one clear error instead of a traceback.
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EIO)


def _finish(ckpt: checkpoint.Checkpointer, writer: metrics.MetricsWriter) -> OSError | None:
  """Waits for the pending save and closes everything; a disk error is returned, not raised.

  Raising here would replace the error that stopped the loop; a save that
  fails leaves only Orbax's tmp directory, never a step that looks complete.
  """
  error = None
  for close in (ckpt.wait_until_finished, ckpt.close, writer.close):
    try:
      close()
    except OSError as e:
      if e.errno not in _DISK_ERRORS:
        raise
      error = error or e
  return error


def _meta(s: Setup, config, state: TrainState, step: int) -> dict:
  return {"step": step, "data": s.batcher.state(step), "beta": float(jax.device_get(state.beta)),
          "config": config.to_json_best_effort()}
