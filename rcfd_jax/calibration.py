"""Reward calibration from demonstrations: the calibrated objectives and their monitors.

The paper's per-sample reward (rcfd), the leave-one-out estimator that
calibrates each prompt's mean without paying for its spread (rcfd_group),
the step toward the least-KL policy with the demonstrations' mean
(rcfd_tilt, from the policy's samples or pi_0's), and what a user watches
to see collapse coming. Pure jax.numpy, with the shape names and masking
rules of rcfd_jax.rl.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rcfd_jax import rl

Array = jax.Array


def rcfd(reward_bk: Array, demo_reward_bk: Array, whiten_each: bool | None = None,
         eps: float = 1e-8) -> Array:
  """[B] reward calibrated from demonstrations: score like the demo, not higher.

  Per component i: r_i = -(R_i(x, y) - R_i(x, y_d))^2, maximal (0) exactly
  when the completion scores what the demonstration of its prompt scored.

  Several components (K > 1), the paper's R_CfD = sum_i sigma(r_i): each r_i
  is whitened over the batch, (r_i - mean) / (std + eps), before the sum.
  Whitening puts components of very different scales (an RM logit and a
  length in tokens) on an equal footing, and makes the result invariant to
  rescaling any one reward (and its demo) by a positive constant.

  One component (K = 1): -(R - R_d)^2 is returned as is; the REINFORCE/PPO
  advantage whitening that follows does the normalisation, and leaving the
  reward unwhitened keeps logged reward values meaningful (0 = calibrated).

  Args:
    reward_bk: [B, K] (or [B]) rewards of the completions.
    demo_reward_bk: same shape, rewards of each row's prompt's demonstration.
    whiten_each: None (default) follows the paper: whiten iff K > 1. True or
      False forces per-component whitening on or off whatever K is.
    eps: added to the batch std before dividing.
  """
  calibrated_bk = -jnp.square(rl.as_bk(reward_bk) - rl.as_bk(demo_reward_bk))
  if whiten_each is None:
    whiten_each = calibrated_bk.shape[-1] > 1
  if whiten_each:
    calibrated_bk = rl.whiten(calibrated_bk, eps=eps, axis=0)
  return jnp.sum(calibrated_bk, axis=-1)


def rcfd_group(reward_pgk: Array, demo_reward_pk: Array, eps: float = 1e-8) -> Array:
  """[P, G] advantages that calibrate each prompt's mean reward, not its spread.

  Over the G samples of one prompt, E[-(R - R_d)^2] = -(E[R|x] - R_d)^2 - Var(R|x):
  rcfd's per-sample reward also pays the policy for scoring every sample
  alike, which collapses the text wherever the prompt does not predict R_d.
  This is the unbiased leave-one-out policy gradient of the first term
  alone. With m_-i the mean reward of the prompt's other G - 1 samples,

    A_i = -(m_-i - R_d) * (R_i - m_-i).

  m_-i does not depend on sample i, so E[A_i grad log pi(y_i)] is
  -(E[R|x] - R_d) * grad E[R|x], half the gradient of -(E[R|x] - R_d)^2:
  samples above the prompt's mean are pushed up when the mean is below the
  demonstration's reward and down when above, and the push fades as the mean
  reaches R_d. The prompt's spread is left free.

  Several components (K > 1): each is divided by the batch std of the
  policy's rewards of that component (demonstration rewards too) before
  calibrating, then the advantages are summed; the result is invariant to
  rescaling any one reward, as the paper's whitened sum is.

  Args:
    reward_pgk: [P, G, K] (or [P, G]) rewards of G >= 2 completions per prompt.
    demo_reward_pk: [P, K] (or [P]) rewards of each prompt's demonstration.
    eps: added to the batch std before dividing (K > 1).
  """
  reward_pgk = jnp.asarray(reward_pgk, jnp.float32)
  demo_reward_pk = jnp.asarray(demo_reward_pk, jnp.float32)
  if reward_pgk.ndim == 2:
    reward_pgk, demo_reward_pk = reward_pgk[..., None], demo_reward_pk[..., None]
  g = reward_pgk.shape[1]
  if g < 2:
    raise ValueError(f"rcfd_group needs at least 2 samples per prompt, got {g}")
  if reward_pgk.shape[-1] > 1:
    scale_k = jnp.std(reward_pgk, axis=(0, 1)) + eps
    reward_pgk, demo_reward_pk = reward_pgk / scale_k, demo_reward_pk / scale_k
  others_pgk = (jnp.sum(reward_pgk, axis=1, keepdims=True) - reward_pgk) / (g - 1)
  adv_pgk = -(others_pgk - demo_reward_pk[:, None, :]) * (reward_pgk - others_pgk)
  return jnp.sum(adv_pgk, axis=-1)


def tilt_lambda(reward_pg: Array, log_ratio_pg: Array, target: Array | float, bound: float = 30.0,
                iters: int = 40) -> Array:
  """The lambda at which the tilted policy's mean reward equals `target`.

  The tilt of pi_0 by lambda is p*(y|x) = pi_0(y|x) exp(lambda R(x, y)) / Z(x).
  Estimated from samples y ~ pi by self-normalized importance weights within
  each prompt, w_i ~ exp(lambda R_i + log pi_0(y_i) - log pi(y_i)), its mean
  reward, averaged over the prompts, rises monotonically with lambda (its
  derivative is a weighted variance), so bisection on [-bound, bound] finds
  the root. The bisection measures rewards from the target in units of the
  batch's reward std, so `bound` is in 1/std; the lambda returned is in the
  reward's own units. A target outside what the samples can reach
  returns the bound's lambda: all weight on each prompt's best (or worst)
  sample.

  Args:
    reward_pg: [P, G] rewards of G samples per prompt.
    log_ratio_pg: [P, G] log pi_0(y) - log pi(y) of each sample, summed over its tokens.
    target: the mean reward the tilt must have (a scalar).
  """
  reward_pg = jnp.asarray(reward_pg, jnp.float32)
  log_ratio_pg = jnp.asarray(log_ratio_pg, jnp.float32)
  scale = jnp.std(reward_pg) + 1e-8
  z_pg = (reward_pg - target) / scale

  def tilted_mean(lam):
    return jnp.mean(jnp.sum(jax.nn.softmax(lam * z_pg + log_ratio_pg, axis=1) * z_pg, axis=1))

  def halve(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)
    below = tilted_mean(mid) < 0.0
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(0, iters, halve, (jnp.float32(-bound), jnp.float32(bound)))
  return 0.5 * (lo + hi) / scale


def rcfd_tilt(reward_pg: Array, demo_reward_p: Array, log_ratio_pg: Array) -> tuple[Array, Array]:
  """([P, G] advantages, lambda) that move pi toward the least-KL policy with the demonstrations' mean.

  Of all policies whose mean reward equals the demonstrations' mean, the
  one of least KL to pi_0 is the tilt p* = pi_0 exp(lambda R) / Z for the
  lambda that puts its mean there (GDC's moment-matching solution, Khalifa
  et al. 2021; on a reward that is pi_0's own likelihood, pi_0 sharpened).
  lambda is solved afresh from every batch (tilt_lambda, target: the mean
  of the batch's demonstration rewards), so nothing lags and no coefficient
  is chosen. The policy then takes a distributional policy gradient step
  toward p*, the gradient of -KL(p* || pi): with the self-normalized weights
  w_i of tilt_lambda within each prompt,

    A_i = G w_i - 1,

  which is 0 for every sample once pi = p* (then log pi_0 - log pi + lambda R
  is the same for all samples of a prompt), positive where p* puts more
  mass than pi, negative where less. Each prompt's advantages sum to 0.

  Args:
    reward_pg: [P, G] rewards of G >= 2 completions per prompt.
    demo_reward_p: [P] rewards of each prompt's demonstration (or the calibration target).
    log_ratio_pg: [P, G] log pi_0(y) - log pi(y) per completion, summed over its tokens.
  """
  reward_pg = jnp.asarray(reward_pg, jnp.float32)
  g = reward_pg.shape[1]
  if g < 2:
    raise ValueError(f"rcfd_tilt needs at least 2 samples per prompt, got {g}")
  lam = tilt_lambda(reward_pg, log_ratio_pg, jnp.mean(jnp.asarray(demo_reward_p, jnp.float32)))
  w_pg = jax.nn.softmax(lam * reward_pg + jnp.asarray(log_ratio_pg, jnp.float32), axis=1)
  return g * w_pg - 1.0, lam


def rcfd_tilt_from_reference(reward_pg: Array, demo_reward_p: Array) -> tuple[Array, Array]:
  """([P, G] weights k w_i, lambda): rcfd_tilt's step from samples of pi_0 instead of pi.

  Sampled from pi_0, p*(y|x) / pi_0(y|x) = exp(lambda R) / Z(x), so within
  each prompt w_i ~ exp(lambda R_i): the weights read the reward only, and do
  not change as the policy moves. lambda is tilt_lambda's, with no log ratio.
  The step maximises sum_i G w_i log pi(y_i), the weighted likelihood of
  pi_0's samples, whose expected gradient is G E_p*[grad log pi], the
  gradient of -KL(p* || pi). The weights are not centred: with samples from
  pi_0 a baseline would subtract E_pi0[grad log pi], which is not zero once
  pi differs from pi_0, and push pi away from pi_0.

  Args:
    reward_pg: [P, G] rewards of G >= 2 completions per prompt, sampled from pi_0.
    demo_reward_p: [P] rewards of each prompt's demonstration (or the calibration target).
  """
  adv_pg, lam = rcfd_tilt(reward_pg, demo_reward_p, jnp.zeros(jnp.shape(reward_pg), jnp.float32))
  return adv_pg + 1.0, lam


def tilt_diagnostics(reward_pg: Array, log_ratio_pg: Array, lam: Array) -> dict[str, Array]:
  """What drives rcfd_tilt's weights, averaged over prompts.

  Returns:
    ess: the weights' effective sample size per prompt, 1 / sum_i w_i^2,
      from 1 (all weight on one sample) to G (flat: the policy is the tilt).
    reward_spread: the within-prompt std of lambda R_i, the part of the log
      weights the reward sets.
    ratio_spread: the within-prompt std of log pi_0(y_i) - log pi(y_i), the
      part the policy's distance from pi_0 sets.
  """
  reward_pg = jnp.asarray(reward_pg, jnp.float32)
  log_ratio_pg = jnp.asarray(log_ratio_pg, jnp.float32)
  w_pg = jax.nn.softmax(lam * reward_pg + log_ratio_pg, axis=1)
  return {"ess": jnp.mean(1.0 / jnp.sum(jnp.square(w_pg), axis=1)),
          "reward_spread": jnp.mean(jnp.std(lam * reward_pg, axis=1)),
          "ratio_spread": jnp.mean(jnp.std(log_ratio_pg, axis=1))}


def group_spread(reward_pgk: Array, tol: float = 1e-6) -> tuple[Array, Array]:
  """Collapse monitors per reward component, over prompts with G >= 2 samples.

  Returns:
    (within_std_k, tied_frac_k): the root mean within-prompt variance
    (unbiased, ddof 1) of the rewards, and the fraction of prompts whose G
    samples all score the same (range <= tol * (1 + |mean|)). A policy
    collapsing onto one text per prompt drives the first to 0 and the second
    to 1.
  """
  reward_pgk = jnp.asarray(reward_pgk, jnp.float32)
  if reward_pgk.ndim == 2:
    reward_pgk = reward_pgk[..., None]
  within_std_k = jnp.sqrt(jnp.mean(jnp.var(reward_pgk, axis=1, ddof=1), axis=0))
  range_pk = jnp.max(reward_pgk, axis=1) - jnp.min(reward_pgk, axis=1)
  tied_pk = range_pk <= tol * (1.0 + jnp.abs(jnp.mean(reward_pgk, axis=1)))
  return within_std_k, jnp.mean(tied_pk.astype(jnp.float32), axis=0)
