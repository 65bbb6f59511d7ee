"""One RL iteration as pure functions: rollout, then update.

    rollout(state, frozen, batch)            -> Rollout   sample, score, in-step rewards
    update(state, frozen, rollout, host)     -> (state, metrics)
                                                objective, advantages, loss, optax update

When every reward runs inside the step (same tokenizer as the policy), the
trainer jits `fused(state, frozen, batch)` = update(rollout(...)): one
compiled program per iteration with no host round trip. When a reward model
has its own tokenizer, the host decodes the rollout between the two jitted
halves (rcfd_jax.rewards bridge).

Shapes: B prompts per step, k samples each, R = B*k rollouts, P prompt
tokens (left-padded), N new tokens (right-padded), K reward sources.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from rcfd_jax import rl, sampler
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
  prompt_ids: jax.Array    # [B, P] int32, left-padded
  prompt_mask: jax.Array   # [B, P] bool
  demo_reward: jax.Array   # [B, K] R(x, y_d), cached per dataset


@struct.dataclass
class Rollout:
  prompt_ids: jax.Array    # [R, P]
  prompt_mask: jax.Array   # [R, P]
  tokens: jax.Array        # [R, N]
  mask: jax.Array          # [R, N] completion tokens up to and including EOS
  logp: jax.Array          # [R, N] behaviour policy log-probs
  ref_logp: jax.Array      # [R, N] pi_0 log-probs
  values: jax.Array        # [R, N] value estimates (zeros without a value head)
  rewards: dict            # name -> [R], the in-step reward sources
  demo_reward: jax.Array   # [R, K]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static numbers and choices the step is compiled for (read once from the config)."""
  samples_per_prompt: int
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  eos_id: int
  pad_id: int
  objective: str           # max | kl | weighted | rcfd | rcfd_group
  algorithm: str           # reinforce | ppo
  baseline: str            # whiten | loo | none | gae (value head)
  kl_estimator: str        # k1 | k2 | k3
  adaptive_kl: bool
  kl_target: float
  kl_horizon: float
  alpha: tuple[float, ...]
  ppo_epochs: int
  minibatches: int
  grad_accum: int
  clip_eps: float
  value_clip: float
  vf_coef: float
  gamma: float
  lam: float
  loss_agg: str
  # Steps whose metrics reach the host (trainer: every log_every_steps-th and the last). When
  # nothing else reads the reference log-probs, the rollout computes them on those steps only,
  # for the kl metric; 1 (the default) computes them every step.
  metrics_every: int = 1
  total_steps: int = 0

  @classmethod
  def from_config(cls, c, eos_id: int, pad_id: int) -> "StepConfig":
    return cls(
        samples_per_prompt=c.rollout.samples_per_prompt, max_new_tokens=c.rollout.max_new_tokens,
        temperature=c.rollout.temperature, top_k=c.rollout.top_k, top_p=c.rollout.top_p,
        eos_id=eos_id, pad_id=pad_id, objective=c.rl.objective, algorithm=c.rl.algorithm,
        baseline=c.rl.baseline, kl_estimator=c.rl.kl_estimator, adaptive_kl=c.rl.adaptive_kl,
        kl_target=c.rl.kl_target, kl_horizon=c.rl.kl_horizon, alpha=tuple(c.rl.alpha),
        ppo_epochs=c.rl.ppo.epochs, minibatches=c.rl.ppo.minibatches, grad_accum=c.optim.grad_accum,
        clip_eps=c.rl.clip_eps, value_clip=c.rl.ppo.value_clip, vf_coef=c.rl.ppo.vf_coef,
        gamma=c.rl.ppo.gamma, lam=c.rl.ppo.lam, loss_agg=c.rl.loss_agg,
        metrics_every=c.log_every_steps, total_steps=c.total_steps)


def _key(state: TrainState, salt: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), salt)


def _sequences(r_prompt_ids, r_prompt_mask, tokens, mask):
  return (jnp.concatenate([r_prompt_ids, tokens], axis=1),
          jnp.concatenate([r_prompt_mask, mask], axis=1))


def make_scorer(parts: PolicyParts, rewards: Rewards) -> Callable:
  """score(params, frozen, prompt_ids, prompt_mask, tokens, mask) -> (ref_logp [R, N], rewards).

  The same function scores sampled completions and, once per dataset, the
  demonstrations, so R(x, y) and R(x, y_d) are computed identically.
  """

  def score(params, frozen: Frozen, prompt_ids, prompt_mask, tokens, mask):
    seq, seq_mask = _sequences(prompt_ids, prompt_mask, tokens, mask)
    ref_logp = _reference_logprobs(parts, params, frozen, seq, seq_mask, tokens)
    return ref_logp, rewards.in_graph(frozen.rm, seq, seq_mask, mask, ref_logp)

  return score


def _reference_logprobs(parts: PolicyParts, params, frozen: Frozen, seq, seq_mask, tokens):
  """[R, N] log-probs of the completion tokens under pi_0."""
  ref = parts.reference(params, frozen.base, frozen.ref)
  ref_logits, _ = ref.completion_outputs(seq, seq_mask, seq.shape[1] - tokens.shape[1])
  return rl.token_logprobs(ref_logits, tokens)


def reads_reference(sc: StepConfig, rewards: Rewards) -> bool:
  """Whether the update itself reads pi_0's log-probs (beyond the kl metric)."""
  return sc.objective == "kl" or sc.adaptive_kl or any(s.kind == "loglik" for s in rewards.sources)


def make_rollout(parts: PolicyParts, rewards: Rewards, sc: StepConfig) -> Callable:
  """rollout(state, frozen, batch) -> Rollout.

  The reference forward (about a fifth of a step's FLOPs) runs on every step
  only when the update reads it (reads_reference); otherwise only on the steps
  whose metrics reach the host (sc.metrics_every), and ref_logp is NaN on the
  others, whose kl metric nobody sees.
  """
  score = make_scorer(parts, rewards)
  every_step = reads_reference(sc, rewards) or sc.metrics_every <= 1

  def score_when_logged(state, frozen, ids, pmask, tokens, mask):
    seq, seq_mask = _sequences(ids, pmask, tokens, mask)
    done = state.step + 1
    logged = (done % sc.metrics_every == 0) | (done == sc.total_steps)
    ref_logp = jax.lax.cond(
        logged, lambda: _reference_logprobs(parts, state.params, frozen, seq, seq_mask, tokens),
        lambda: jnp.full(tokens.shape, jnp.nan, jnp.float32))
    return ref_logp, rewards.in_graph(frozen.rm, seq, seq_mask, mask, ref_logp)

  def rollout(state: TrainState, frozen: Frozen, batch: Batch) -> Rollout:
    k = sc.samples_per_prompt
    ids = jnp.repeat(batch.prompt_ids, k, axis=0)
    pmask = jnp.repeat(batch.prompt_mask, k, axis=0)
    policy = parts.merge(state.params, frozen.base)
    # With a value head the sampler reads the values off the hidden states it decodes anyway.
    value_fn = (lambda h: policy.value(h)[..., 0]) if sc.baseline == "gae" else None
    out = sampler.sample(policy.lm, ids, pmask, _key(state, 0), max_new_tokens=sc.max_new_tokens,
                         temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p,
                         eos_id=sc.eos_id, pad_id=sc.pad_id, value_fn=value_fn)
    tokens, mask = out.tokens_bn, out.mask_bn
    if every_step:
      ref_logp, graph_rewards = score(state.params, frozen, ids, pmask, tokens, mask)
    else:
      ref_logp, graph_rewards = score_when_logged(state, frozen, ids, pmask, tokens, mask)
    values = out.values_bn if value_fn is not None else jnp.zeros(tokens.shape, jnp.float32)
    return Rollout(ids, pmask, tokens, mask, jax.lax.stop_gradient(out.logprobs_bn), ref_logp,
                   jax.lax.stop_gradient(values), graph_rewards,
                   jnp.repeat(batch.demo_reward, k, axis=0))

  return rollout


def objective(sc: StepConfig, reward_rk, demo_rk, seq_kl_r, beta):
  """The scalar reward the policy maximises, one per rollout."""
  if sc.objective == "max":
    return reward_rk.sum(-1)
  if sc.objective == "kl":
    return rl.kl_penalized(reward_rk.sum(-1), seq_kl_r, beta)
  if sc.objective == "weighted":
    return rl.weighted(reward_rk, jnp.asarray(sc.alpha, jnp.float32))
  if sc.objective == "rcfd":
    return rl.rcfd(reward_rk, demo_rk)
  if sc.objective == "rcfd_group":  # already an advantage: centred within each prompt's group
    k = sc.samples_per_prompt
    demo_pk = demo_rk.reshape(-1, k, demo_rk.shape[-1])[:, 0]
    return rl.rcfd_group(reward_rk.reshape(-1, k, reward_rk.shape[-1]), demo_pk).reshape(-1)
  raise ValueError(sc.objective)


def advantages(sc: StepConfig, score_r, ro: Rollout):
  """(advantages [R, N], returns [R, N]) from the objective's per-rollout score."""
  mask = ro.mask.astype(jnp.float32)
  if sc.baseline == "gae":
    token_rewards = rl.place_at_last(score_r, mask)
    adv, ret = rl.gae(token_rewards, ro.values, mask, sc.gamma, sc.lam)
    adv = rl.masked_whiten(adv, mask)
    return adv, ret
  if sc.baseline == "whiten":
    adv_r = rl.whiten(score_r)
  elif sc.baseline == "loo":
    adv_r = rl.leave_one_out(score_r.reshape(-1, sc.samples_per_prompt)).reshape(-1)
  else:
    adv_r = score_r
  adv = adv_r[:, None] * mask
  return adv, jnp.zeros_like(adv)


def make_update(parts: PolicyParts, rewards: Rewards, tx: optax.GradientTransformation,
                sc: StepConfig) -> Callable:
  """update(state, frozen, rollout, host_rewards) -> (state, metrics)."""

  def loss_fn(params, frozen, mb):
    policy = parts.merge(params, frozen.base)
    seq, seq_mask = _sequences(mb["prompt_ids"], mb["prompt_mask"], mb["tokens"], mb["mask"])
    logits, values = policy.completion_outputs(seq, seq_mask, mb["prompt_ids"].shape[1])
    logp = rl.token_logprobs(logits, mb["tokens"])
    mask = mb["mask"].astype(jnp.float32)
    if sc.algorithm == "ppo":
      loss, aux = rl.ppo_policy_loss(logp, mb["logp"], mb["adv"], mask, sc.clip_eps, sc.loss_agg)
    else:
      loss, aux = rl.reinforce_policy_loss(logp, mb["adv"], mask, sc.loss_agg), {}
    # The policy's mean token entropy on its own completions: falls as the text collapses.
    aux = dict(aux, entropy=rl.masked_mean(rl.token_entropy(jax.lax.stop_gradient(logits)), mask))
    if sc.baseline == "gae":
      vl, vaux = rl.value_loss(values, mb["values"], mb["returns"], mask, sc.value_clip, sc.loss_agg)
      loss, aux = loss + sc.vf_coef * vl, dict(aux, **vaux, value_loss=vl)
    return loss, aux

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def minibatch_grads(params, frozen, mb):
    """Loss and gradient of one minibatch, summed over grad_accum micro-batches.

    Each micro-batch counts by its share of the minibatch: its completion
    tokens under token_mean, its sequences under seq_mean. So the result is
    the whole minibatch's loss whatever grad_accum is (a plain mean of
    micro-batch token means would over-weight micro-batches of short
    completions).
    """
    # Micro-batch g holds rows g, g + grad_accum, ...: with the rows split over the devices in
    # contiguous blocks, every micro-batch is spread evenly over all of them.
    micro = jax.tree.map(lambda x: x.reshape(-1, sc.grad_accum, *x.shape[1:]).swapaxes(0, 1), mb)
    if sc.loss_agg == "token_mean":
      tokens = micro["mask"].astype(jnp.float32).sum(axis=(1, 2))
      weights = tokens / jnp.maximum(tokens.sum(), 1.0)
    else:
      weights = jnp.full((sc.grad_accum,), 1.0 / sc.grad_accum)

    def body(acc, m_w):
      m, w = m_w
      (loss, aux), g = grad_fn(params, frozen, m)
      return jax.tree.map(lambda a, x: a + w * x.astype(jnp.float32), acc, (loss, g)), aux

    # Accumulate in float32 whatever the parameter dtype (bf16 sums lose the small terms).
    zeros = (jnp.zeros(()), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    (loss, grads), aux = jax.lax.scan(body, zeros, (micro, weights))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, grads, jax.tree.map(jnp.mean, aux)

  def update(state: TrainState, frozen: Frozen, ro: Rollout, host_rewards: dict | None):
    parts_r = dict(ro.rewards, **(host_rewards or {}))
    reward_rk = rewards.stack(parts_r)
    seq_kl = rl.sequence_kl(ro.logp, ro.ref_logp, ro.mask, sc.kl_estimator)
    score = objective(sc, reward_rk, ro.demo_reward, seq_kl, state.beta)
    adv, ret = advantages(sc, score, ro)
    data = dict(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, tokens=ro.tokens, mask=ro.mask,
                logp=ro.logp, values=ro.values, adv=adv, returns=ret)
    n = ro.tokens.shape[0]

    def epoch(carry, key):
      params, opt_state, ok_all = carry
      shuffle = (lambda x: x[jax.random.permutation(key, n)]) if sc.minibatches > 1 else (lambda x: x)
      mbs = jax.tree.map(lambda x: shuffle(x).reshape(sc.minibatches, -1, *x.shape[1:]), data)

      def one(c, mb):
        params, opt_state, ok_all = c
        loss, grads, aux = minibatch_grads(params, frozen, mb)
        ok = rl.all_finite(grads) & jnp.isfinite(loss)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        return (keep(new_params, params), keep(new_opt, opt_state), ok_all & ok), dict(
            aux, loss=loss, grad_norm=optax.global_norm(grads))

      return jax.lax.scan(one, (params, opt_state, ok_all), mbs)

    keys = jax.random.split(_key(state, 1), sc.ppo_epochs)
    (params, opt_state, ok), logs = jax.lax.scan(epoch, (state.params, state.opt_state, jnp.array(True)), keys)
    # A non-finite reward poisons every minibatch; treat the whole iteration as skipped.
    ok = ok & rl.all_finite(score)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    kl_mean = rl.sequence_kl(ro.logp, ro.ref_logp, ro.mask, "k1").mean()
    beta = state.beta
    if sc.adaptive_kl:
      adapted = rl.adaptive_kl_update(rl.AdaptiveKLState(beta), kl_mean, sc.kl_target, sc.kl_horizon, n)
      beta = jnp.where(ok, adapted.beta, beta)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, beta=beta,
        bad_steps=jnp.where(ok, 0, state.bad_steps + 1),
        skipped_total=state.skipped_total + (~ok).astype(jnp.int32))
    lengths = ro.mask.sum(-1).astype(jnp.float32)
    metrics = {
        "loss": logs.pop("loss").mean(), "grad_norm": logs.pop("grad_norm").mean(),
        "reward_mean": reward_rk[:, 0].mean(), "reward_std": reward_rk[:, 0].std(),
        "demo_reward_mean": ro.demo_reward[:, 0].mean(), "objective_mean": score.mean(),
        "kl": kl_mean, "beta": state.beta, "length_mean": lengths.mean(),
        "generated_tokens": lengths.sum(), "skipped": (~ok).astype(jnp.int32),
        "skipped_total": new_state.skipped_total,
    }
    for i, name in enumerate(rewards.names):
      metrics[f"reward/{name}"] = reward_rk[:, i].mean()
      metrics[f"demo_reward/{name}"] = ro.demo_reward[:, i].mean()
    if sc.samples_per_prompt >= 2:  # collapse monitors: each prompt's k samples scoring alike
      within_k, tied_k = rl.group_spread(reward_rk.reshape(-1, sc.samples_per_prompt, reward_rk.shape[-1]))
      for i, name in enumerate(rewards.names):
        metrics[f"reward_within_prompt_std/{name}"] = within_k[i]
        metrics[f"reward_tied_frac/{name}"] = tied_k[i]
    metrics.update({k: v.mean() for k, v in logs.items()})
    return new_state, metrics

  return update
