"""One RL iteration as pure functions: rollout, then update.

    rollout(state, frozen, batch)            -> Rollout   sample, score, in-step rewards
    update(state, frozen, rollout, host)     -> (state, metrics)
                                                objective, advantages, loss, optax update

When every reward runs inside the step (same tokenizer as the policy), the
trainer jits `fused(state, frozen, batch)` = update(rollout(...)): one
compiled program per iteration with no host round trip. When a reward model
has its own tokenizer, the host decodes the rollout between the two jitted
halves (rcfd_jax.bridge).

Shapes are in the names, with rl.py's letters: p prompts per step, g
samples each, b = p * g rollouts (one completion per row), l prompt tokens
(left-padded), t new tokens (right-padded), v vocabulary, k reward sources.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from rcfd_jax import calibration, rl, sampler
from rcfd_jax.policy import PolicyParts
from rcfd_jax.rewards import Rewards


@struct.dataclass
class TrainState:
  step: jax.Array          # int32, number of updates applied or skipped
  params: nnx.State        # trainable variables (adapters or all weights, value head)
  opt_state: Any
  rng: jax.Array           # uint32 key data; the step's key is fold_in(rng, step)
  beta: jax.Array          # current KL coefficient (fixed or adaptive)
  bad_steps: jax.Array     # consecutive skipped (non-finite) updates
  skipped_total: jax.Array


@struct.dataclass
class Frozen:
  """Weights that never change: LoRA base, pi_0 copy (full fine-tuning), reward model."""
  base: nnx.State
  ref: nnx.State | None
  rm: nnx.State | None


@struct.dataclass
class Batch:
  prompt_ids: jax.Array    # [p, l] int32, left-padded
  prompt_mask: jax.Array   # [p, l] bool
  demo_reward: jax.Array   # [p, k] R(x, y_d), cached per dataset


@struct.dataclass
class Rollout:
  prompt_ids: jax.Array    # [b, l]
  prompt_mask: jax.Array   # [b, l]
  tokens: jax.Array        # [b, t]
  mask: jax.Array          # [b, t] completion tokens up to and including EOS
  logp: jax.Array          # [b, t] behaviour policy log-probs
  ref_logp: jax.Array      # [b, t] pi_0 log-probs
  values: jax.Array        # [b, t] value estimates (zeros without a value head)
  rewards: dict            # name -> [b], the in-step reward sources
  demo_reward: jax.Array   # [b, k]


Objective = Literal["max", "kl", "weighted", "rcfd", "rcfd_group", "rcfd_tilt"]
Baseline = Literal["whiten", "loo", "none", "gae"]


def _from(path: str, **kw):
  """A StepConfig field read from config.<path> (StepConfig.from_config)."""
  return dataclasses.field(metadata={"config": path}, **kw)


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static numbers and choices the step is compiled for (read once from the config)."""
  eos_id: int
  pad_id: int
  samples_per_prompt: int = _from("rollout.samples_per_prompt")
  max_new_tokens: int = _from("rollout.max_new_tokens")
  temperature: float = _from("rollout.temperature")
  top_k: int = _from("rollout.top_k")
  top_p: float = _from("rollout.top_p")
  objective: Objective = _from("rl.objective")
  algorithm: str = _from("rl.algorithm")        # reinforce | ppo
  baseline: Baseline = _from("rl.baseline")     # gae: a value head
  kl_estimator: str = _from("rl.kl_estimator")  # k1 | k2 | k3
  adaptive_kl: bool = _from("rl.adaptive_kl")
  adaptive_kl_signal: str = _from("rl.adaptive_kl_signal")  # kl | demo_reward
  kl_target: float = _from("rl.kl_target")
  kl_horizon: float = _from("rl.kl_horizon")
  alpha: tuple[float, ...] = _from("rl.alpha")
  ppo_epochs: int = _from("rl.ppo.epochs")
  minibatches: int = _from("rl.ppo.minibatches")
  grad_accum: int = _from("optim.grad_accum")
  clip_eps: float = _from("rl.clip_eps")
  value_clip: float = _from("rl.ppo.value_clip")
  vf_coef: float = _from("rl.ppo.vf_coef")
  gamma: float = _from("rl.ppo.gamma")
  lam: float = _from("rl.ppo.lam")
  loss_agg: str = _from("rl.loss_agg")
  tilt_proposal: str = _from("rl.tilt_proposal", default="policy")  # rcfd_tilt samples pi (policy) or pi_0
  # Steps whose metrics reach the host (trainer: every log_every_steps-th and the last). When
  # nothing else reads the reference log-probs, the rollout computes them on those steps only,
  # for the kl metric; 1 (the default) computes them every step.
  metrics_every: int = _from("log_every_steps", default=1)
  total_steps: int = _from("total_steps", default=0)

  @classmethod
  def from_config(cls, c, eos_id: int, pad_id: int) -> "StepConfig":
    """Every field from the config entry its metadata names; lists become tuples (the step is hashed)."""
    values = {}
    for f in dataclasses.fields(cls):
      if "config" in f.metadata:
        v = functools.reduce(getattr, f.metadata["config"].split("."), c)
        values[f.name] = tuple(v) if isinstance(v, (list, tuple)) else v
    return cls(eos_id=eos_id, pad_id=pad_id, **values)


def _key(state: TrainState, salt: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), salt)


def fold_rng(rng: jax.Array, i) -> jax.Array:
  """TrainState.rng (uint32 key data) folded with `i`: a state whose rollouts draw other random numbers."""
  return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(rng), i))


def _sequences(prompt_ids_bl, prompt_mask_bl, tokens_bt, mask_bt):
  return (jnp.concatenate([prompt_ids_bl, tokens_bt], axis=1),
          jnp.concatenate([prompt_mask_bl, mask_bt], axis=1))


def make_scorer(parts: PolicyParts, rewards: Rewards) -> Callable:
  """score(params, frozen, prompt_ids, prompt_mask, tokens, mask) -> (ref_logp [b, t], rewards).

  The same function scores sampled completions and, once per dataset, the
  demonstrations, so R(x, y) and R(x, y_d) are computed identically.
  """

  def score(params, frozen: Frozen, prompt_ids_bl, prompt_mask_bl, tokens_bt, mask_bt):
    seq_ids, seq_mask = _sequences(prompt_ids_bl, prompt_mask_bl, tokens_bt, mask_bt)
    ref_logp_bt = _reference_logprobs(parts, params, frozen, seq_ids, seq_mask, tokens_bt)
    return ref_logp_bt, rewards.in_graph(frozen.rm, seq_ids, seq_mask, mask_bt, ref_logp_bt)

  return score


def _reference_logprobs(parts: PolicyParts, params, frozen: Frozen, seq_ids, seq_mask, tokens_bt):
  """[b, t] log-probs of the completion tokens under pi_0."""
  ref = parts.reference(params, frozen.base, frozen.ref)
  ref_logits_btv, _ = ref.completion_outputs(seq_ids, seq_mask, seq_ids.shape[1] - tokens_bt.shape[1])
  return rl.token_logprobs(ref_logits_btv, tokens_bt)


def reads_reference(sc: StepConfig, rewards: Rewards) -> bool:
  """Whether the update itself reads pi_0's log-probs (beyond the kl metric)."""
  return (sc.objective in ("kl", "rcfd_tilt") or sc.adaptive_kl
          or any(s.kind == "loglik" for s in rewards.sources))


def make_rollout(parts: PolicyParts, rewards: Rewards, sc: StepConfig) -> Callable:
  """rollout(state, frozen, batch) -> Rollout.

  The reference forward (one more forward pass of the policy's size over
  every rollout) runs on every step only when the update reads it
  (reads_reference); otherwise only on the steps whose metrics reach the
  host (sc.metrics_every), and ref_logp is NaN on the others, whose kl metric
  nobody sees. With tilt_proposal=reference pi_0 samples the rollout, so
  ref_logp is the sampler's own log-probs and no reference forward runs.
  """
  score = make_scorer(parts, rewards)
  every_step = reads_reference(sc, rewards) or sc.metrics_every <= 1

  def score_when_logged(state, frozen, ids_bl, pmask_bl, tokens_bt, mask_bt):
    seq_ids, seq_mask = _sequences(ids_bl, pmask_bl, tokens_bt, mask_bt)
    done = state.step + 1
    logged = (done % sc.metrics_every == 0) | (done == sc.total_steps)
    ref_logp_bt = jax.lax.cond(
        logged, lambda: _reference_logprobs(parts, state.params, frozen, seq_ids, seq_mask, tokens_bt),
        lambda: jnp.full(tokens_bt.shape, jnp.nan, jnp.float32))
    return ref_logp_bt, rewards.in_graph(frozen.rm, seq_ids, seq_mask, mask_bt, ref_logp_bt)

  def rollout(state: TrainState, frozen: Frozen, batch: Batch) -> Rollout:
    g = sc.samples_per_prompt
    ids_bl = jnp.repeat(batch.prompt_ids, g, axis=0)
    pmask_bl = jnp.repeat(batch.prompt_mask, g, axis=0)
    if sc.tilt_proposal == "reference":  # rcfd_tilt trained on pi_0's samples
      policy = parts.reference(state.params, frozen.base, frozen.ref)
    else:
      policy = parts.merge(state.params, frozen.base)
    # With a value head the sampler reads the values off the hidden states it decodes anyway.
    value_fn = (lambda h: policy.value(h)[..., 0]) if sc.baseline == "gae" else None
    out = sampler.sample(policy.lm, ids_bl, pmask_bl, _key(state, 0), max_new_tokens=sc.max_new_tokens,
                         temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p,
                         eos_id=sc.eos_id, pad_id=sc.pad_id, value_fn=value_fn)
    tokens_bt, mask_bt = out.tokens_bn, out.mask_bn
    if sc.tilt_proposal == "reference":  # pi_0 drew the tokens, untempered: its log-probs are the sampler's
      ref_logp_bt = jax.lax.stop_gradient(out.logprobs_bn)
      seq_ids, seq_mask = _sequences(ids_bl, pmask_bl, tokens_bt, mask_bt)
      graph_rewards = rewards.in_graph(frozen.rm, seq_ids, seq_mask, mask_bt, ref_logp_bt)
    elif every_step:
      ref_logp_bt, graph_rewards = score(state.params, frozen, ids_bl, pmask_bl, tokens_bt, mask_bt)
    else:
      ref_logp_bt, graph_rewards = score_when_logged(state, frozen, ids_bl, pmask_bl, tokens_bt, mask_bt)
    values_bt = out.values_bn if value_fn is not None else jnp.zeros(tokens_bt.shape, jnp.float32)
    return Rollout(ids_bl, pmask_bl, tokens_bt, mask_bt, jax.lax.stop_gradient(out.logprobs_bn), ref_logp_bt,
                   jax.lax.stop_gradient(values_bt), graph_rewards,
                   jnp.repeat(batch.demo_reward, g, axis=0))

  return rollout


# ----------------------------------------------------------------------------
# Objectives: (sc, reward_bk, demo_bk, seq_kl_b, beta, log_ratio_b) -> ([b] the scalar reward the policy
# maximises, {name: scalar} metrics of its own); log_ratio_b is log pi_0(y) - log pi(y) per completion
# (exact, whatever kl_estimator is).


def _max_objective(sc, reward_bk, demo_bk, seq_kl_b, beta, log_ratio_b):
  return reward_bk.sum(-1), {}


def _kl_objective(sc, reward_bk, demo_bk, seq_kl_b, beta, log_ratio_b):
  return rl.kl_penalized(reward_bk.sum(-1), seq_kl_b, beta), {}


def _weighted_objective(sc, reward_bk, demo_bk, seq_kl_b, beta, log_ratio_b):
  return rl.weighted(reward_bk, jnp.asarray(sc.alpha, jnp.float32)), {}


def _rcfd_objective(sc, reward_bk, demo_bk, seq_kl_b, beta, log_ratio_b):
  return calibration.rcfd(reward_bk, demo_bk), {}


def _rcfd_group_objective(sc, reward_bk, demo_bk, seq_kl_b, beta, log_ratio_b):
  """Already an advantage: centred within each prompt's group of samples."""
  g = sc.samples_per_prompt
  demo_pk = demo_bk.reshape(-1, g, demo_bk.shape[-1])[:, 0]
  return calibration.rcfd_group(reward_bk.reshape(-1, g, reward_bk.shape[-1]), demo_pk).reshape(-1), {}


def _rcfd_tilt_objective(sc, reward_bk, demo_bk, seq_kl_b, beta, log_ratio_b):
  """Already an advantage (centred within each prompt unless sampled from pi_0); logs lambda (1 / reward
  units) and what sets the weights."""
  g = sc.samples_per_prompt
  reward_pg, log_ratio_pg = reward_bk[:, 0].reshape(-1, g), log_ratio_b.reshape(-1, g)
  demo_p = demo_bk[:, 0].reshape(-1, g)[:, 0]
  if sc.tilt_proposal == "reference":  # sampled from pi_0: the log ratio is 0 but for rounding
    log_ratio_pg = jnp.zeros_like(log_ratio_pg)
    adv_pg, lam = calibration.rcfd_tilt_from_reference(reward_pg, demo_p)
  else:
    adv_pg, lam = calibration.rcfd_tilt(reward_pg, demo_p, log_ratio_pg)
  diagnostics = calibration.tilt_diagnostics(reward_pg, log_ratio_pg, lam)
  return adv_pg.reshape(-1), {"tilt_lambda": lam, **{f"tilt_{name}": v for name, v in diagnostics.items()}}


# config.OBJECTIVES (what config.check accepts) is this dict's keys.
OBJECTIVES: dict[Objective, Callable] = {
    "max": _max_objective, "kl": _kl_objective, "weighted": _weighted_objective, "rcfd": _rcfd_objective,
    "rcfd_group": _rcfd_group_objective, "rcfd_tilt": _rcfd_tilt_objective}


def objective(sc: StepConfig, reward_bk, demo_bk, seq_kl_b, beta, log_ratio_b):
  """([b] the scalar reward the policy maximises, one per rollout; {name: scalar} the objective's metrics)."""
  if sc.objective not in OBJECTIVES:
    raise ValueError(sc.objective)
  return OBJECTIVES[sc.objective](sc, reward_bk, demo_bk, seq_kl_b, beta, log_ratio_b)


# ----------------------------------------------------------------------------
# Baselines: (sc, score_b, ro) -> (advantages [b, t], returns [b, t]).


def _per_sequence(adv_b, ro: Rollout):
  """A per-completion advantage on each of its tokens; no returns (no value head)."""
  adv_bt = adv_b[:, None] * ro.mask.astype(jnp.float32)
  return adv_bt, jnp.zeros_like(adv_bt)


def _whiten_baseline(sc, score_b, ro):
  return _per_sequence(rl.whiten(score_b), ro)


def _loo_baseline(sc, score_b, ro):
  return _per_sequence(rl.leave_one_out(score_b.reshape(-1, sc.samples_per_prompt)).reshape(-1), ro)


def _no_baseline(sc, score_b, ro):
  return _per_sequence(score_b, ro)


def _gae_baseline(sc, score_b, ro):
  mask_bt = ro.mask.astype(jnp.float32)
  token_rewards_bt = rl.place_at_last(score_b, mask_bt)
  adv_bt, returns_bt = rl.gae(token_rewards_bt, ro.values, mask_bt, sc.gamma, sc.lam)
  return rl.masked_whiten(adv_bt, mask_bt), returns_bt


# config.check's baselines are this dict's keys.
BASELINES: dict[Baseline, Callable] = {
    "whiten": _whiten_baseline, "loo": _loo_baseline, "none": _no_baseline, "gae": _gae_baseline}


def advantages(sc: StepConfig, score_b, ro: Rollout):
  """(advantages [b, t], returns [b, t]) from the objective's per-rollout score."""
  if sc.baseline not in BASELINES:
    raise ValueError(sc.baseline)
  return BASELINES[sc.baseline](sc, score_b, ro)


# ----------------------------------------------------------------------------
# The update: objective, advantages, then ppo_epochs passes of minibatch optimizer steps.


def policy_loss(params, frozen: Frozen, mb: dict, parts: PolicyParts, sc: StepConfig):
  """(loss, aux) of one micro-batch `mb` of rollout rows under `params`."""
  policy = parts.merge(params, frozen.base)
  seq_ids, seq_mask = _sequences(mb["prompt_ids"], mb["prompt_mask"], mb["tokens"], mb["mask"])
  logits_btv, values_bt = policy.completion_outputs(seq_ids, seq_mask, mb["prompt_ids"].shape[1])
  logp_bt = rl.token_logprobs(logits_btv, mb["tokens"])
  mask_bt = mb["mask"].astype(jnp.float32)
  if sc.algorithm == "ppo":
    loss, aux = rl.ppo_policy_loss(logp_bt, mb["logp"], mb["adv"], mask_bt, sc.clip_eps, sc.loss_agg)
  else:
    loss, aux = rl.reinforce_policy_loss(logp_bt, mb["adv"], mask_bt, sc.loss_agg), {}
  # The policy's mean token entropy on the rollouts (its own, unless tilt_proposal=reference): falls as the
  # text collapses.
  aux = dict(aux, entropy=rl.masked_mean(rl.token_entropy(jax.lax.stop_gradient(logits_btv)), mask_bt))
  if sc.tilt_proposal == "reference":  # the rows are pi_0's samples: sum log pi_0 - log pi is KL(pi_0 || pi)
    aux["reference_kl"] = jnp.mean(jnp.sum((mb["logp"] - jax.lax.stop_gradient(logp_bt)) * mask_bt, axis=-1))
  if sc.baseline == "gae":
    vl, vaux = rl.value_loss(values_bt, mb["values"], mb["returns"], mask_bt, sc.value_clip, sc.loss_agg)
    loss, aux = loss + sc.vf_coef * vl, dict(aux, **vaux, value_loss=vl)
  return loss, aux


def minibatch_grads(params, frozen: Frozen, mb: dict, parts: PolicyParts, sc: StepConfig):
  """Loss and gradient of one minibatch, summed over grad_accum micro-batches.

  Each micro-batch counts by its share of the minibatch: its completion
  tokens under token_mean, its sequences under seq_mean. So the result is
  the whole minibatch's loss whatever grad_accum is (a plain mean of
  micro-batch token means would over-weight micro-batches of short
  completions).
  """
  grad_fn = jax.value_and_grad(functools.partial(policy_loss, parts=parts, sc=sc), has_aux=True)
  # Micro-batch a holds rows a, a + grad_accum, ...: with the rows split over the devices in
  # contiguous blocks, every micro-batch is spread evenly over all of them.
  micro = jax.tree.map(lambda x: x.reshape(-1, sc.grad_accum, *x.shape[1:]).swapaxes(0, 1), mb)
  if sc.loss_agg == "token_mean":
    tokens_a = micro["mask"].astype(jnp.float32).sum(axis=(1, 2))
    weights_a = tokens_a / jnp.maximum(tokens_a.sum(), 1.0)
  else:
    weights_a = jnp.full((sc.grad_accum,), 1.0 / sc.grad_accum)

  def body(acc, m_w):
    m, w = m_w
    (loss, aux), g = grad_fn(params, frozen, m)
    return jax.tree.map(lambda a, x: a + w * x.astype(jnp.float32), acc, (loss, g)), aux

  # Accumulate in float32 whatever the parameter dtype (bf16 sums lose the small terms).
  zeros = (jnp.zeros(()), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
  (loss, grads), aux = jax.lax.scan(body, zeros, (micro, weights_a))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return loss, grads, jax.tree.map(jnp.mean, aux)


def _keep_where(ok, new, old):
  """`new` where ok, else `old`, leaf by leaf: a skipped update leaves the state as it was."""
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def minibatch_step(carry, mb: dict, frozen: Frozen, tx: optax.GradientTransformation, parts: PolicyParts,
                   sc: StepConfig):
  """One optimizer step on minibatch `mb`; carry is (params, opt_state, every step so far finite)."""
  params, opt_state, ok_all = carry
  loss, grads, aux = minibatch_grads(params, frozen, mb, parts, sc)
  ok = rl.all_finite(grads) & jnp.isfinite(loss)
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  return (_keep_where(ok, new_params, params), _keep_where(ok, new_opt, opt_state), ok_all & ok), dict(
      aux, loss=loss, grad_norm=optax.global_norm(grads))


def epoch(carry, key, data: dict, frozen: Frozen, tx: optax.GradientTransformation, parts: PolicyParts,
          sc: StepConfig):
  """One pass over the rollout rows `data` in sc.minibatches minibatches (shuffled by `key` when several)."""
  n = data["tokens"].shape[0]
  shuffle = (lambda x: x[jax.random.permutation(key, n)]) if sc.minibatches > 1 else (lambda x: x)
  mbs = jax.tree.map(lambda x: shuffle(x).reshape(sc.minibatches, -1, *x.shape[1:]), data)
  step = functools.partial(minibatch_step, frozen=frozen, tx=tx, parts=parts, sc=sc)
  return jax.lax.scan(step, carry, mbs)


def update(state: TrainState, frozen: Frozen, ro: Rollout, host_rewards: dict | None, parts: PolicyParts,
           rewards: Rewards, tx: optax.GradientTransformation, sc: StepConfig):
  """(state, metrics) after the objective, advantages and ppo_epochs passes over rollout `ro`."""
  reward_bk = rewards.stack(dict(ro.rewards, **(host_rewards or {})))
  seq_kl_b = rl.sequence_kl(ro.logp, ro.ref_logp, ro.mask, sc.kl_estimator)
  log_ratio_b = -rl.sequence_kl(ro.logp, ro.ref_logp, ro.mask, "k1")
  score_b, objective_metrics = objective(sc, reward_bk, ro.demo_reward, seq_kl_b, state.beta, log_ratio_b)
  adv_bt, returns_bt = advantages(sc, score_b, ro)
  data = dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, tokens=ro.tokens, mask=ro.mask,
              logp=ro.logp, values=ro.values, adv=adv_bt, returns=returns_bt)
  n = ro.tokens.shape[0]

  keys = jax.random.split(_key(state, 1), sc.ppo_epochs)
  one_epoch = functools.partial(epoch, data=data, frozen=frozen, tx=tx, parts=parts, sc=sc)
  (params, opt_state, ok), logs = jax.lax.scan(one_epoch, (state.params, state.opt_state, jnp.array(True)), keys)
  # A non-finite reward poisons every minibatch; treat the whole iteration as skipped.
  ok = ok & rl.all_finite(score_b)
  params, opt_state = _keep_where(ok, params, state.params), _keep_where(ok, opt_state, state.opt_state)
  kl_mean = -log_ratio_b.mean()
  beta = state.beta
  if sc.adaptive_kl and sc.adaptive_kl_signal == "demo_reward":
    moved = rl.demo_calibrated_kl(beta, reward_bk.sum(-1), ro.demo_reward.sum(-1), sc.kl_horizon, n)
    beta = jnp.where(ok, moved, beta)
  elif sc.adaptive_kl:
    beta = jnp.where(ok, rl.adaptive_kl(beta, kl_mean, sc.kl_target, sc.kl_horizon, n), beta)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, beta=beta,
      bad_steps=jnp.where(ok, 0, state.bad_steps + 1),
      skipped_total=state.skipped_total + (~ok).astype(jnp.int32))
  lengths_b = ro.mask.sum(-1).astype(jnp.float32)
  metrics = {} if sc.tilt_proposal == "reference" else {"kl": kl_mean}  # pi_0's rollouts: reference_kl instead
  metrics |= {
      "loss": logs.pop("loss").mean(), "grad_norm": logs.pop("grad_norm").mean(),
      "reward_mean": reward_bk[:, 0].mean(), "reward_std": reward_bk[:, 0].std(),
      "demo_reward_mean": ro.demo_reward[:, 0].mean(), "objective_mean": score_b.mean(),
      "beta": state.beta, "length_mean": lengths_b.mean(),
      "generated_tokens": lengths_b.sum(), "skipped": (~ok).astype(jnp.int32),
      "skipped_total": new_state.skipped_total,
  }
  for i, name in enumerate(rewards.names):
    metrics[f"reward/{name}"] = reward_bk[:, i].mean()
    metrics[f"demo_reward/{name}"] = ro.demo_reward[:, i].mean()
  g = sc.samples_per_prompt
  if g >= 2:  # collapse monitors: each prompt's g samples scoring alike
    within_k, tied_k = calibration.group_spread(reward_bk.reshape(-1, g, reward_bk.shape[-1]))
    for i, name in enumerate(rewards.names):
      metrics[f"reward_within_prompt_std/{name}"] = within_k[i]
      metrics[f"reward_tied_frac/{name}"] = tied_k[i]
  metrics.update(objective_metrics)
  metrics.update({k: v.mean() for k, v in logs.items()})
  return new_state, metrics


def make_update(parts: PolicyParts, rewards: Rewards, tx: optax.GradientTransformation,
                sc: StepConfig) -> Callable:
  """update(state, frozen, rollout, host_rewards) -> (state, metrics), for jit."""

  def update_fn(state: TrainState, frozen: Frozen, ro: Rollout, host_rewards: dict | None):
    return update(state, frozen, ro, host_rewards, parts, rewards, tx, sc)

  return update_fn
