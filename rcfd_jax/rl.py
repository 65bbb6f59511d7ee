"""The RL maths: log-probs, KL estimators, objectives, advantages and losses.

Every function here is pure jax.numpy, jittable, and knows nothing of models,
configs or sharding; the train step (rcfd_jax.step) composes them. Shapes are
in the names, here and in step.py: b batch (one completion per row), t time
(completion tokens), v vocabulary, k reward components, p prompts and g
completions sampled per prompt (b = p * g); step.py adds l, prompt tokens.

Masks are [B, T], float or bool, 1 on completion tokens and 0 on prompt and
padding tokens. Values at masked-out positions are never trusted: helpers
select with `where` instead of multiplying, so a -inf or NaN log-prob on a
padding token cannot leak into a sum. An empty completion (all-zero mask row)
gives 0 wherever a mean over its tokens is asked for, never NaN.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

Array = jax.Array
KLEstimator = Literal["k1", "k2", "k3"]
LossAgg = Literal["token_mean", "seq_mean"]

# Upper bound on the log-ratio fed to exp() in the k3 estimator. exp(20) is
# about 4.9e8: far past any ratio a sane update produces, far below float32's
# overflow at exp(88.7). See kl_k3.
K3_MAX_LOG_RATIO = 20.0


# ----------------------------------------------------------------------------
# Log-probabilities and masked reductions


def token_logprobs(logits_btv: Array, tokens_bt: Array) -> Array:
  """log softmax(logits)[token] per position, in float32.

  Computed as picked logit minus logsumexp, so the [B, T, V] log-softmax is
  never materialised (under jit XLA fuses the float32 cast into the two
  reductions): with a 150k vocabulary that tensor is the largest activation
  of the step. bf16 logits are upcast first; bf16 logsumexp loses whole nats.
  The logit is picked by a masked sum over the vocabulary rather than a
  gather: when the vocabulary axis is sharded over "tensor" each shard sums
  its part and one small all-reduce follows, where a gather would first
  all-gather the logits. The sum holds one nonzero term, so it is exact.

  Args:
    logits_btv: [B, T, V] logits that predict tokens_bt (already shifted).
    tokens_bt: [B, T] integer token ids.

  Returns:
    logp_bt: [B, T] float32 log-probabilities.
  """
  logits_btv = logits_btv.astype(jnp.float32)
  lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  vocab_v = jnp.arange(logits_btv.shape[-1], dtype=jnp.int32)
  hit_btv = vocab_v == tokens_bt[..., None].astype(jnp.int32)
  picked_bt = jnp.sum(jnp.where(hit_btv, logits_btv, 0.0), axis=-1)
  return picked_bt - lse_bt


def masked_sum(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
  """Sum of x * mask; masked-out entries contribute exactly 0, even if inf or NaN."""
  m = jnp.asarray(mask).astype(jnp.result_type(x, jnp.float32))
  return jnp.sum(jnp.where(m != 0, x * m, 0.0), axis=axis)


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
  """Weighted mean of x under mask; 0 (not NaN) where the mask is empty."""
  m = jnp.asarray(mask).astype(jnp.result_type(x, jnp.float32))
  count = jnp.sum(m, axis=axis)
  total = masked_sum(x, m, axis=axis)
  return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def sequence_logprob(logp_bt: Array, mask_bt: Array) -> Array:
  """log pi(y|x) of each completion: [B] sum of token log-probs over the mask."""
  return masked_sum(logp_bt, mask_bt, axis=-1)


def mean_token_logprob(logp_bt: Array, mask_bt: Array) -> Array:
  """[B] mean log-prob per completion token: the length-normalised likelihood reward.

  The paper's use case 1 scores a completion by this mean under the frozen
  initial model: the "loglik" reward source (rcfd_jax.rewards) is this
  function of the reference log-probs pi_0 gives the completion, which the
  rollout computes once for the reward and the KL alike. An empty completion
  scores 0 rather than NaN.
  """
  return masked_mean(logp_bt, mask_bt, axis=-1)


# ----------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence"), per token, with
# samples drawn from the policy: d = ref_logp - logp = log(pi_ref / pi).


def kl_k1(logp_bt: Array, ref_logp_bt: Array) -> Array:
  """k1 = log(pi / pi_ref): unbiased, high variance, can be negative per token."""
  return logp_bt - ref_logp_bt


def kl_k2(logp_bt: Array, ref_logp_bt: Array) -> Array:
  """k2 = 0.5 * (log(pi / pi_ref))^2: biased, low variance, nonnegative."""
  return 0.5 * jnp.square(logp_bt - ref_logp_bt)


def kl_k3(logp_bt: Array, ref_logp_bt: Array) -> Array:
  """k3 = exp(d) - 1 - d with d = ref_logp - logp: unbiased and nonnegative.

  expm1 keeps precision near d = 0, where the two terms cancel. The exponent
  is clipped from above at K3_MAX_LOG_RATIO (d is replaced by min(d, C) in
  both terms) so a token the policy has nearly ruled out but the reference
  likes (d >> 0) saturates at exp(C) - 1 - C instead of overflowing to inf;
  there the value is constant and its gradient 0. Because the same clipped d
  appears in both terms, the result is still e^x - 1 - x >= 0. For d << 0
  nothing overflows (expm1 -> -1) and the value -1 - d is exact.
  """
  d = jnp.minimum(ref_logp_bt - logp_bt, K3_MAX_LOG_RATIO)
  return jnp.expm1(d) - d


_KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def token_kl(logp_bt: Array, ref_logp_bt: Array, estimator: KLEstimator = "k1") -> Array:
  """[B, T] per-token KL estimate by name ("k1", "k2" or "k3")."""
  if estimator not in _KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k2 or k3")
  return _KL_ESTIMATORS[estimator](logp_bt, ref_logp_bt)


def sequence_kl(logp_bt: Array, ref_logp_bt: Array, mask_bt: Array,
                estimator: KLEstimator = "k1") -> Array:
  """[B] sequence-level KL estimate: per-token estimates summed over completion tokens.

  The paper's KL baseline penalises log(pi(y|x) / pi_0(y|x)), a sum over the
  sequence; with k1 this is exactly that.
  """
  return masked_sum(token_kl(logp_bt, ref_logp_bt, estimator), mask_bt, axis=-1)


# ----------------------------------------------------------------------------
# Objectives: reward vector(s) -> one scalar reward per completion. The calibrated ones
# (rcfd, rcfd_group, rcfd_tilt) are in rcfd_jax.calibration.


def as_bk(reward: Array) -> Array:
  """Accepts [B] (one reward) or [B, K]; returns [B, K]."""
  reward = jnp.asarray(reward)
  return reward[:, None] if reward.ndim == 1 else reward


def max_reward(reward_bk: Array) -> Array:
  """[B] plain reward maximisation: the sum of the K components (R itself for K = 1)."""
  return jnp.sum(as_bk(reward_bk), axis=-1)


def kl_penalized(reward_b: Array, seq_kl_b: Array, beta: Array | float) -> Array:
  """[B] R - beta * KL: the paper's KL baseline, the penalty in the sequence reward."""
  return reward_b - beta * seq_kl_b


def weighted(reward_bk: Array, alpha_k: Array) -> Array:
  """[B] sum_i alpha_i R_i: the paper's R_alpha = R_RM + alpha * R_length baseline."""
  return jnp.sum(as_bk(reward_bk) * jnp.asarray(alpha_k), axis=-1)


def token_entropy(logits_btv: Array) -> Array:
  """[B, T] entropy of softmax(logits) per position, in float32 nats.

  H = logsumexp(l) - sum_v p_v l_v, written as two reductions over the
  vocabulary so that XLA fuses them and no [B, T, V] log-softmax is stored.
  """
  logits_btv = logits_btv.astype(jnp.float32)
  lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  p_btv = jnp.exp(logits_btv - lse_bt[..., None])
  return lse_bt - jnp.sum(p_btv * logits_btv, axis=-1)


# ----------------------------------------------------------------------------
# Adaptive KL coefficient (Ziegler et al. 2019): beta is the controller's whole state.


def adaptive_kl(beta: Array | float, observed_kl: Array | float, target: float,
                horizon: float, n_steps: int | Array) -> Array:
  """The next beta, moved to pull the observed KL toward `target`.

  beta <- beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon).
  The clip bounds how fast beta reacts to one noisy KL measurement; n_steps /
  horizon (n_steps = samples or steps since the last update) sets the time
  scale. KL above target grows beta, below target shrinks it.
  """
  error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
  return beta * (1.0 + error * n_steps / horizon)


def demo_calibrated_kl(beta: Array | float, reward_b: Array, demo_reward_b: Array, horizon: float,
                       n_steps: int | Array, eps: float = 1e-8) -> Array:
  """The next beta, moved to pull the batch's mean reward to its demonstrations' mean.

  gap = (mean R - mean R_d) / (std R_d + eps) over the batch, and
  beta <- beta * (1 + clip(gap, -0.2, 0.2) * n_steps / horizon), as adaptive_kl
  does with the KL. Above the demonstrations beta grows (more anchor), below
  it shrinks (more reward). Its fixed point is the beta* at which the
  maximizer of R - beta * KL(pi || pi_0), pi ~ pi_0 exp(R / beta*), scores
  the demonstrations' mean: of all policies with that mean reward, the one
  of least KL to pi_0. The demonstrations set the target; no KL value is
  chosen by hand.

  Args:
    reward_b: [B] the policy's rewards (summed over sources, as the kl objective sums them).
    demo_reward_b: [B] the demonstration reward of each rollout's prompt.
  """
  reward_b = jnp.asarray(reward_b, jnp.float32)
  demo_reward_b = jnp.asarray(demo_reward_b, jnp.float32)
  gap = (reward_b.mean() - demo_reward_b.mean()) / (demo_reward_b.std() + eps)
  return beta * (1.0 + jnp.clip(gap, -0.2, 0.2) * n_steps / horizon)


# ----------------------------------------------------------------------------
# Advantages


def whiten(x: Array, eps: float = 1e-8, axis: int | tuple[int, ...] | None = None) -> Array:
  """(x - mean) / (std + eps) over `axis` (all elements by default; population std).

  The paper's REINFORCE baseline: rewards whitened per batch. A constant batch
  gives finite output (0 when the mean is exact) rather than NaN.
  """
  mean = jnp.mean(x, axis=axis, keepdims=True)
  centered = x - mean
  std = jnp.sqrt(jnp.mean(jnp.square(centered), axis=axis, keepdims=True))
  return centered / (std + eps)


def masked_whiten(x_bt: Array, mask_bt: Array, eps: float = 1e-8) -> Array:
  """Whitens the masked entries of x (PPO's per-token advantages); 0 off the mask."""
  mean = masked_mean(x_bt, mask_bt)
  centered_bt = jnp.where(jnp.asarray(mask_bt) != 0, x_bt - mean, 0.0)
  std = jnp.sqrt(masked_mean(jnp.square(centered_bt), mask_bt))
  return centered_bt / (std + eps)


def leave_one_out(reward_pg: Array) -> Array:
  """[P, G] advantage: each reward minus the mean of the other G - 1 of its prompt.

  An unbiased baseline for G >= 2 samples per prompt (RLOO). The advantages of
  a prompt sum to zero.
  """
  g = reward_pg.shape[-1]
  if g < 2:
    raise ValueError(f"leave_one_out needs at least 2 samples per prompt, got {g}")
  others_mean_pg = (jnp.sum(reward_pg, axis=-1, keepdims=True) - reward_pg) / (g - 1)
  return reward_pg - others_mean_pg


def place_at_last(reward_b: Array, mask_bt: Array) -> Array:
  """[B, T] rewards: reward_b at each row's last completion token, 0 elsewhere.

  Finds the last position whose mask is nonzero, so right padding, left
  prompt padding and prompt tokens in the row all work. A row with an empty
  completion gets no reward (all zeros): there is no token to credit.
  """
  valid_bt = jnp.asarray(mask_bt) != 0
  t = valid_bt.shape[-1]
  last_b = t - 1 - jnp.argmax(valid_bt[:, ::-1], axis=-1)
  hit_bt = (jnp.arange(t)[None, :] == last_b[:, None]) & jnp.any(valid_bt, axis=-1, keepdims=True)
  return jnp.where(hit_bt, reward_b[:, None], 0.0).astype(jnp.result_type(reward_b, jnp.float32))


def gae(rewards_bt: Array, values_bt: Array, mask_bt: Array, gamma: float,
        lam: float) -> tuple[Array, Array]:
  """Generalised advantage estimation over completion tokens.

  A backward lax.scan over time. Masked-out positions are skipped, not
  treated as steps: the carry (next value, next advantage) passes through
  them unchanged, so right padding, prompt tokens and holes inside the row
  all leave the recursion over the completion tokens intact. The step after
  the last completion token is terminal (next value 0).

    delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next

  Args:
    rewards_bt: [B, T] per-token rewards (see place_at_last).
    values_bt: [B, T] value estimates V(s_t).
    mask_bt: [B, T] completion mask.
    gamma, lam: discount and GAE lambda.

  Returns:
    (advantages_bt, returns_bt), with returns = advantages + values; both are
    0 at masked-out positions.
  """
  valid_tb = (jnp.asarray(mask_bt) != 0).T
  dtype = jnp.result_type(rewards_bt, values_bt, jnp.float32)
  rewards_tb = rewards_bt.astype(dtype).T
  values_tb = values_bt.astype(dtype).T

  def step(carry, xs):
    next_value_b, next_adv_b = carry
    reward_b, value_b, valid_b = xs
    delta_b = reward_b + gamma * next_value_b - value_b
    adv_b = delta_b + gamma * lam * next_adv_b
    carry = (jnp.where(valid_b, value_b, next_value_b), jnp.where(valid_b, adv_b, next_adv_b))
    return carry, jnp.where(valid_b, adv_b, 0.0)

  zeros_b = jnp.zeros(rewards_tb.shape[1], dtype)
  _, adv_tb = jax.lax.scan(step, (zeros_b, zeros_b), (rewards_tb, values_tb, valid_tb),
                           reverse=True)
  adv_bt = adv_tb.T
  returns_bt = jnp.where(valid_tb.T, adv_bt + values_bt.astype(dtype), 0.0)
  return adv_bt, returns_bt


# ----------------------------------------------------------------------------
# Losses
#
# loss_agg chooses how per-token losses become a scalar:
#   "token_mean": mean over every completion token in the batch. Each token
#     weighs the same, so long completions weigh more; the default, and the
#     unbiased per-token policy-gradient estimate.
#   "seq_mean": mean over each completion's tokens, then over the completions
#     that have at least one token. Each sequence weighs the same whatever its
#     length (the per-sequence view the paper's sequence-level rewards take).


def aggregate(loss_bt: Array, mask_bt: Array, loss_agg: LossAgg = "token_mean") -> Array:
  """Scalar loss from [B, T] per-token losses, by `loss_agg` (see above)."""
  if loss_agg == "token_mean":
    return masked_mean(loss_bt, mask_bt)
  if loss_agg == "seq_mean":
    per_seq_b = masked_mean(loss_bt, mask_bt, axis=-1)
    nonempty_b = jnp.sum(jnp.asarray(mask_bt, jnp.float32), axis=-1) > 0
    return masked_mean(per_seq_b, nonempty_b)
  raise ValueError(f"unknown loss_agg {loss_agg!r}; expected 'token_mean' or 'seq_mean'")


def _per_token(adv: Array, like_bt: Array) -> Array:
  """Broadcasts a per-sequence [B] advantage over time; [B, T] passes through."""
  adv = jnp.asarray(adv)
  return jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, like_bt.shape)


def ppo_policy_loss(logp_bt: Array, old_logp_bt: Array, adv: Array, mask_bt: Array,
                    clip_eps: float, loss_agg: LossAgg = "token_mean"
                    ) -> tuple[Array, dict[str, Array]]:
  """PPO clipped surrogate: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

  Args:
    logp_bt: [B, T] log-probs under the current parameters.
    old_logp_bt: [B, T] log-probs under the parameters that sampled.
    adv: [B, T] per-token (GAE) or [B] per-sequence advantages (broadcast).
    mask_bt: [B, T] completion mask.
    clip_eps: ratio clip (0.3 in the paper).
    loss_agg: "token_mean" or "seq_mean".

  Returns:
    (loss, metrics): metrics["clipfrac"] is the fraction of completion tokens
    where the clipped term is the active one; metrics["approx_kl"] is the
    token mean of the k3 estimate of KL(old || new), (ratio - 1) - log ratio.
    Both are token means whatever loss_agg is.
  """
  adv_bt = _per_token(adv, logp_bt)
  # Zero on padding before exp(): a garbage log-prob there must not overflow,
  # since 0 * inf in the backward pass of the masking would still give NaN.
  log_ratio_bt = jnp.where(jnp.asarray(mask_bt) != 0, logp_bt - old_logp_bt, 0.0)
  ratio_bt = jnp.exp(log_ratio_bt)
  unclipped_bt = -adv_bt * ratio_bt
  clipped_bt = -adv_bt * jnp.clip(ratio_bt, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = aggregate(jnp.maximum(unclipped_bt, clipped_bt), mask_bt, loss_agg)
  metrics = {
      "clipfrac": masked_mean((clipped_bt > unclipped_bt).astype(jnp.float32), mask_bt),
      "approx_kl": masked_mean(jnp.expm1(log_ratio_bt) - log_ratio_bt, mask_bt),
  }
  return loss, metrics


def reinforce_policy_loss(logp_bt: Array, adv: Array, mask_bt: Array,
                          loss_agg: LossAgg = "token_mean") -> Array:
  """REINFORCE with a baseline: aggregate of -A * log pi(token) over completion tokens.

  adv is per sequence [B] (broadcast over its tokens) or per token [B, T]; it
  is data, so no gradient flows through it.
  """
  adv_bt = jax.lax.stop_gradient(_per_token(adv, logp_bt))
  return aggregate(-adv_bt * logp_bt, mask_bt, loss_agg)


def value_loss(values_bt: Array, old_values_bt: Array, returns_bt: Array, mask_bt: Array,
               clip: float, loss_agg: LossAgg = "token_mean") -> tuple[Array, dict[str, Array]]:
  """PPO clipped value loss: 0.5 * max((V - G)^2, (V_clipped - G)^2).

  V_clipped = old_V + clip(V - old_V, -clip, clip) keeps the value head from
  moving far from the values the advantages were computed with; taking the
  max makes the clip a pessimistic bound, as PPO's policy clip is.

  Returns:
    (loss, metrics) with metrics["vf_clipfrac"], the token fraction where the
    clipped error is the larger.
  """
  clipped_bt = old_values_bt + jnp.clip(values_bt - old_values_bt, -clip, clip)
  err_bt = jnp.square(values_bt - returns_bt)
  err_clipped_bt = jnp.square(clipped_bt - returns_bt)
  loss = 0.5 * aggregate(jnp.maximum(err_bt, err_clipped_bt), mask_bt, loss_agg)
  metrics = {"vf_clipfrac": masked_mean((err_clipped_bt > err_bt).astype(jnp.float32), mask_bt)}
  return loss, metrics


# ----------------------------------------------------------------------------
# Update guard


def all_finite(tree: Any) -> Array:
  """Scalar bool: True iff every element of every array leaf is finite.

  The train step skips an update whose loss or gradients hold inf or NaN.
  Integer and bool leaves are always finite; an empty tree is finite.
  """
  leaves = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
  flags = [jnp.all(jnp.isfinite(x)) for x in leaves
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)
