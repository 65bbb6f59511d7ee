"""rcfd_jax.rl against NumPy references written here, plus the properties the trainer relies on.

The references are deliberately naive (Python loops over rows and tokens,
float64) so they share no code path with the vectorised jax versions.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rcfd_jax import rl

B, T, V = 5, 7, 11
TOL = dict(rtol=1e-5, atol=1e-5)


def _rng(seed=0):
  return np.random.default_rng(seed)


def _right_padded_mask(rng, b=B, t=T, lengths=None):
  """Right-padded completion masks with one empty row and one full row."""
  if lengths is None:
    lengths = rng.integers(1, t, size=b)
    lengths[0], lengths[-1] = 0, t
  return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _ref_masked_rows(x, mask):
  """Per row: the list of values at completion positions."""
  return [[float(x[i, j]) for j in range(x.shape[1]) if mask[i, j]] for i in range(x.shape[0])]


# ---------------------------------------------------------------------------
# Log-probabilities and masked reductions


def test_token_logprobs_matches_loop_reference_and_is_float32():
  rng = _rng(1)
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  logits[0, 0, 0] = 1e4  # a huge logit must not overflow
  tokens = rng.integers(0, V, size=(B, T))
  want = np.zeros((B, T))
  for i in range(B):
    for j in range(T):
      row = logits[i, j].astype(np.float64)
      m = row.max()
      want[i, j] = row[tokens[i, j]] - (m + math.log(np.exp(row - m).sum()))
  got = rl.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, **TOL)
  got_bf16 = rl.token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(tokens))
  assert got_bf16.dtype == jnp.float32


def test_masked_sum_mean_ignore_garbage_and_empty_rows():
  rng = _rng(2)
  x = rng.normal(size=(B, T)).astype(np.float32)
  mask = _right_padded_mask(rng)
  x_bad = np.where(mask > 0, x, -np.inf).astype(np.float32)
  x_bad[1, -1] = np.nan if mask[1, -1] == 0 else x_bad[1, -1]
  rows = _ref_masked_rows(x, mask)
  want_sum = np.array([sum(r) for r in rows])
  want_mean = np.array([sum(r) / len(r) if r else 0.0 for r in rows])
  for fn_mask in (mask, mask.astype(bool)):
    np.testing.assert_allclose(rl.masked_sum(x_bad, fn_mask, axis=-1), want_sum, **TOL)
    np.testing.assert_allclose(rl.masked_mean(x_bad, fn_mask, axis=-1), want_mean, **TOL)
    np.testing.assert_allclose(rl.sequence_logprob(x_bad, fn_mask), want_sum, **TOL)
    np.testing.assert_allclose(rl.mean_token_logprob(x_bad, fn_mask), want_mean, **TOL)
  all_tokens = [v for r in rows for v in r]
  np.testing.assert_allclose(rl.masked_mean(x_bad, mask), np.mean(all_tokens), **TOL)
  assert float(rl.masked_mean(x, np.zeros_like(mask))) == 0.0
  assert float(rl.mean_token_logprob(x_bad, mask)[0]) == 0.0  # empty completion


# ---------------------------------------------------------------------------
# KL estimators


def _ref_kl(logp, ref, estimator):
  out = np.zeros(logp.shape)
  for idx in np.ndindex(logp.shape):
    lr = float(logp[idx]) - float(ref[idx])  # log(pi / pi_ref)
    if estimator == "k1":
      out[idx] = lr
    elif estimator == "k2":
      out[idx] = lr * lr / 2
    else:
      r = math.exp(-lr)  # pi_ref / pi
      out[idx] = r - 1 - math.log(r)
  return out


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_and_sequence_kl(estimator):
  rng = _rng(3)
  logp = rng.normal(-2, 1, size=(B, T)).astype(np.float32)
  ref = (logp + rng.normal(0, 0.5, size=(B, T))).astype(np.float32)
  mask = _right_padded_mask(rng)
  want_bt = _ref_kl(logp, ref, estimator)
  np.testing.assert_allclose(rl.token_kl(logp, ref, estimator), want_bt, **TOL)
  want_b = np.array([sum(want_bt[i, j] for j in range(T) if mask[i, j]) for i in range(B)])
  np.testing.assert_allclose(rl.sequence_kl(logp, ref, mask, estimator), want_b, **TOL)


def test_k3_finite_and_nonnegative_for_extreme_log_ratios():
  logp = jnp.zeros((4,))
  ref = jnp.asarray([100.0, -100.0, 1e-4, 0.0])  # ref - logp = +-100, tiny, 0
  k3 = rl.kl_k3(logp, ref)
  assert bool(jnp.all(jnp.isfinite(k3))) and bool(jnp.all(k3 >= 0))
  np.testing.assert_allclose(k3[1], 99.0, rtol=1e-6)  # d << 0 is exact: -1 - d
  np.testing.assert_allclose(k3[2], 0.5e-8, rtol=1e-2)  # naive exp(d) - 1 in float32: 3x off
  assert float(k3[3]) == 0.0
  grad = jax.grad(lambda lp: jnp.sum(rl.kl_k3(lp, ref)))(logp)
  assert bool(jnp.all(jnp.isfinite(grad)))
  with pytest.raises(ValueError):
    rl.token_kl(logp, ref, "k4")


# ---------------------------------------------------------------------------
# Objectives


def test_simple_objectives():
  rng = _rng(4)
  reward_bk = rng.normal(size=(B, 3)).astype(np.float32)
  alpha_k = np.array([1.0, 0.01, -2.0], np.float32)
  want_max = [sum(reward_bk[i]) for i in range(B)]
  want_w = [sum(alpha_k[j] * reward_bk[i, j] for j in range(3)) for i in range(B)]
  np.testing.assert_allclose(rl.max_reward(reward_bk), want_max, **TOL)
  np.testing.assert_allclose(rl.max_reward(reward_bk[:, 0]), reward_bk[:, 0], **TOL)
  np.testing.assert_allclose(rl.max_reward(reward_bk[:, :1]), reward_bk[:, 0], **TOL)
  np.testing.assert_allclose(rl.weighted(reward_bk, alpha_k), want_w, **TOL)
  kl_b = rng.uniform(size=B).astype(np.float32)
  np.testing.assert_allclose(rl.kl_penalized(reward_bk[:, 0], kl_b, 0.3),
                             [reward_bk[i, 0] - 0.3 * kl_b[i] for i in range(B)], **TOL)


def _ref_rcfd(reward, demo, whiten_each):
  k = reward.shape[1]
  cal = [[-(float(reward[i, c]) - float(demo[i, c])) ** 2 for c in range(k)]
         for i in range(reward.shape[0])]
  cal = np.array(cal)
  if whiten_each:
    for c in range(k):
      col = cal[:, c]
      cal[:, c] = (col - col.mean()) / (math.sqrt(((col - col.mean()) ** 2).mean()) + 1e-8)
  return cal.sum(axis=1)


def test_rcfd_single_reward_is_negative_squared_gap_and_zero_at_demo():
  rng = _rng(5)
  demo = rng.normal(size=(B, 1)).astype(np.float32)
  reward = (demo + rng.normal(size=(B, 1))).astype(np.float32)
  reward[2] = demo[2]  # this sample hits its prompt's demonstration exactly
  got = np.asarray(rl.rcfd(reward, demo))
  np.testing.assert_allclose(got, _ref_rcfd(reward, demo, False), **TOL)
  np.testing.assert_allclose(rl.rcfd(reward[:, 0], demo[:, 0]), got, **TOL)  # [B] accepted
  assert got[2] == 0.0 and np.all(np.delete(got, 2) < 0)
  # Maximal exactly at R = R_d: any perturbation of the reward lowers it.
  for delta in (-1.0, -1e-2, 1e-2, 1.0):
    assert float(rl.rcfd(demo[2:3] + delta, demo[2:3])[0]) < 0.0
  np.testing.assert_allclose(rl.rcfd(reward, demo, whiten_each=True),
                             _ref_rcfd(reward, demo, True), **TOL)


def test_rcfd_several_rewards_whitens_each_component_and_is_scale_invariant():
  rng = _rng(6)
  demo = np.stack([rng.normal(size=B), rng.uniform(10, 50, size=B)], -1).astype(np.float32)
  reward = (demo + rng.normal(size=(B, 2)) * [1.0, 10.0]).astype(np.float32)
  got = rl.rcfd(reward, demo)
  np.testing.assert_allclose(got, _ref_rcfd(reward, demo, True), **TOL)
  np.testing.assert_allclose(rl.rcfd(reward, demo, whiten_each=False),
                             _ref_rcfd(reward, demo, False), rtol=1e-5, atol=1e-3)
  scale = np.array([1.0, 7.5], np.float32)  # e.g. length in other units
  np.testing.assert_allclose(rl.rcfd(reward * scale, demo * scale), got, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Adaptive KL controller


def test_adaptive_kl_matches_formula_and_direction():
  beta = jnp.asarray(0.1, jnp.float32)
  for kl, n, horizon in [(12.0, 256, 10000), (6.5, 100, 1000), (1.0, 50, 500), (5.9, 10, 100)]:
    err = min(max(kl / 6.0 - 1, -0.2), 0.2)
    want = 0.1 * (1 + err * n / horizon)
    got = rl.adaptive_kl(beta, kl, target=6.0, horizon=horizon, n_steps=n)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(rl.adaptive_kl(beta, 10.0, 6.0, 1000, 100)) > 0.1
  assert float(rl.adaptive_kl(beta, 2.0, 6.0, 1000, 100)) < 0.1
  assert float(rl.adaptive_kl(beta, 6.0, 6.0, 1000, 100)) == pytest.approx(0.1)


def test_demo_calibrated_kl_matches_formula_and_direction():
  rng = np.random.default_rng(0)
  reward = rng.normal(size=64)
  beta = jnp.asarray(0.1, jnp.float32)
  for offset, spread, n, horizon in [(0.05, 1.0, 64, 640), (-0.03, 2.0, 64, 640), (1.5, 1.0, 64, 640),
                                     (-3.0, 0.5, 32, 100)]:
    demo = reward.mean() - offset + spread * rng.normal(size=64)  # the policy `offset` above, roughly
    gap = (reward.mean() - demo.mean()) / demo.std()
    want = 0.1 * (1 + min(max(gap, -0.2), 0.2) * n / horizon)
    got = rl.demo_calibrated_kl(beta, reward, demo, horizon=horizon, n_steps=n)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  above, below = reward.mean() - 1.0 + 0 * reward, reward.mean() + 1.0 + 0.1 * reward
  assert float(rl.demo_calibrated_kl(beta, reward, above, 640, 64)) == pytest.approx(0.1 * 1.02)  # clipped
  assert float(rl.demo_calibrated_kl(beta, reward, below, 640, 64)) == pytest.approx(0.1 * 0.98)


# ---------------------------------------------------------------------------
# Advantages


def test_whiten_matches_reference():
  x = _rng(7).normal(3, 2, size=(13,)).astype(np.float32)
  want = [(v - x.mean()) / (x.std() + 1e-8) for v in x.astype(np.float64)]
  np.testing.assert_allclose(rl.whiten(x), want, **TOL)
  np.testing.assert_allclose(rl.whiten(np.full((4,), 2.0, np.float32)), np.zeros(4))


def test_leave_one_out_matches_reference_and_sums_to_zero():
  reward_pg = _rng(8).normal(size=(3, 4)).astype(np.float32)
  want = np.zeros_like(reward_pg, dtype=np.float64)
  for p in range(3):
    for g in range(4):
      others = [reward_pg[p, h] for h in range(4) if h != g]
      want[p, g] = reward_pg[p, g] - sum(others) / len(others)
  got = rl.leave_one_out(reward_pg)
  np.testing.assert_allclose(got, want, **TOL)
  np.testing.assert_allclose(jnp.sum(got, axis=-1), np.zeros(3), atol=1e-5)
  with pytest.raises(ValueError):
    rl.leave_one_out(reward_pg[:, :1])


def test_place_at_last_right_padding_left_prompt_and_empty_rows():
  reward_b = np.array([1.5, -2.0, 3.0, 4.0], np.float32)
  mask = np.array([[1, 1, 1, 0, 0],   # right padded
                   [0, 0, 1, 1, 1],   # prompt tokens first, completion to the end
                   [0, 0, 0, 0, 0],   # empty completion: nothing to credit
                   [0, 1, 0, 1, 0]])  # hole inside the completion
  want = np.zeros((4, 5), np.float32)
  for i in range(4):
    valid = [j for j in range(5) if mask[i, j]]
    if valid:
      want[i, valid[-1]] = reward_b[i]
  np.testing.assert_array_equal(rl.place_at_last(reward_b, mask), want)
  np.testing.assert_array_equal(rl.place_at_last(reward_b, mask.astype(bool)), want)


def _ref_gae(rewards, values, mask, gamma, lam):
  """Textbook GAE on each row's completion tokens, compacted, then scattered back."""
  adv = np.zeros(rewards.shape)
  ret = np.zeros(rewards.shape)
  for i in range(rewards.shape[0]):
    idx = [j for j in range(rewards.shape[1]) if mask[i, j]]
    last_adv, next_value = 0.0, 0.0
    for j in reversed(idx):
      delta = rewards[i, j] + gamma * next_value - values[i, j]
      last_adv = delta + gamma * lam * last_adv
      adv[i, j], ret[i, j] = last_adv, last_adv + values[i, j]
      next_value = values[i, j]
  return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0)])
def test_gae_matches_backward_loop(gamma, lam):
  rng = _rng(9)
  mask = _right_padded_mask(rng)
  mask[2, :2] = 0  # a row with prompt tokens in front as well
  values = rng.normal(size=(B, T)).astype(np.float32)
  rewards = np.asarray(rl.place_at_last(rng.normal(size=B).astype(np.float32), mask))
  rewards = rewards + 0.1 * rng.normal(size=(B, T)).astype(np.float32) * mask  # per-token terms
  want_adv, want_ret = _ref_gae(rewards, values, mask, gamma, lam)
  adv, ret = rl.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  np.testing.assert_allclose(adv, want_adv, **TOL)
  np.testing.assert_allclose(ret, want_ret, **TOL)


# ---------------------------------------------------------------------------
# Losses


def _ref_agg(loss, mask, loss_agg):
  rows = _ref_masked_rows(loss, mask)
  if loss_agg == "token_mean":
    flat = [v for r in rows for v in r]
    return sum(flat) / len(flat)
  per_seq = [sum(r) / len(r) for r in rows if r]
  return sum(per_seq) / len(per_seq)


def _loss_inputs(seed):
  rng = _rng(seed)
  mask = _right_padded_mask(rng)
  logp = rng.normal(-2, 1, size=(B, T)).astype(np.float32)
  old = (logp + rng.normal(0, 0.4, size=(B, T))).astype(np.float32)
  return rng, mask, logp, old


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_ppo_policy_loss(loss_agg, per_token_adv):
  rng, mask, logp, old = _loss_inputs(10)
  adv = rng.normal(size=(B, T) if per_token_adv else (B,)).astype(np.float32)
  eps = 0.2
  loss_t, clipped_t, kl_t = np.zeros((B, T)), np.zeros((B, T)), np.zeros((B, T))
  for i in range(B):
    for j in range(T):
      a = adv[i, j] if per_token_adv else adv[i]
      ratio = math.exp(logp[i, j] - old[i, j])
      unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
      loss_t[i, j] = max(unclipped, clipped)
      clipped_t[i, j] = float(clipped > unclipped)
      kl_t[i, j] = ratio - 1 - math.log(ratio)
  loss, metrics = rl.ppo_policy_loss(logp, old, adv, mask, eps, loss_agg)
  np.testing.assert_allclose(loss, _ref_agg(loss_t, mask, loss_agg), **TOL)
  np.testing.assert_allclose(metrics["clipfrac"], _ref_agg(clipped_t, mask, "token_mean"), **TOL)
  np.testing.assert_allclose(metrics["approx_kl"], _ref_agg(kl_t, mask, "token_mean"), **TOL)
  assert 0.0 < float(metrics["clipfrac"]) < 1.0


def test_ppo_gradient_ignores_garbage_on_padding():
  _, mask, logp, old = _loss_inputs(14)
  logp = np.where(mask > 0, logp, 1000.0).astype(np.float32)  # exp(+2000) would overflow
  old = np.where(mask > 0, old, -1000.0).astype(np.float32)
  adv_b = np.ones(B, np.float32)
  grad = jax.grad(lambda lp: rl.ppo_policy_loss(lp, old, adv_b, mask, 0.2)[0])(jnp.asarray(logp))
  assert bool(rl.all_finite(grad))
  assert float(jnp.max(jnp.abs(jnp.where(mask > 0, 0.0, grad)))) == 0.0


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_reinforce_policy_loss_and_gradient(loss_agg):
  rng, mask, logp, _ = _loss_inputs(11)
  adv_b = rng.normal(size=B).astype(np.float32)
  want_t = np.array([[-adv_b[i] * logp[i, j] for j in range(T)] for i in range(B)])
  got = rl.reinforce_policy_loss(logp, adv_b, mask, loss_agg)
  np.testing.assert_allclose(got, _ref_agg(want_t, mask, loss_agg), **TOL)
  # Gradient w.r.t. a token's log-prob is -A / (its weight); zero on padding.
  grad = jax.grad(rl.reinforce_policy_loss)(jnp.asarray(logp), adv_b, mask, loss_agg)
  assert float(jnp.max(jnp.abs(jnp.where(mask > 0, 0.0, grad)))) == 0.0
  n_tokens = mask.sum()
  if loss_agg == "token_mean":
    np.testing.assert_allclose(grad, -adv_b[:, None] * mask / n_tokens, **TOL)
  with pytest.raises(ValueError):
    rl.reinforce_policy_loss(logp, adv_b, mask, "sum")


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_value_loss_clipped(loss_agg):
  rng = _rng(12)
  mask = _right_padded_mask(rng)
  old_v = rng.normal(size=(B, T)).astype(np.float32)
  v = (old_v + rng.normal(0, 0.5, size=(B, T))).astype(np.float32)
  returns = rng.normal(size=(B, T)).astype(np.float32)
  clip = 0.2
  want_t, frac_t = np.zeros((B, T)), np.zeros((B, T))
  for i in range(B):
    for j in range(T):
      vc = old_v[i, j] + min(max(v[i, j] - old_v[i, j], -clip), clip)
      e, ec = (v[i, j] - returns[i, j]) ** 2, (vc - returns[i, j]) ** 2
      want_t[i, j], frac_t[i, j] = 0.5 * max(e, ec), float(ec > e)
  loss, metrics = rl.value_loss(v, old_v, returns, mask, clip, loss_agg)
  np.testing.assert_allclose(loss, _ref_agg(want_t, mask, loss_agg), **TOL)
  np.testing.assert_allclose(metrics["vf_clipfrac"], _ref_agg(frac_t, mask, "token_mean"), **TOL)


def test_all_finite():
  good = {"a": jnp.ones((2, 3)), "b": [jnp.zeros(2, jnp.bfloat16), jnp.arange(3)], "c": None}
  assert bool(rl.all_finite(good))
  assert bool(rl.all_finite({}))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    tree = {"a": jnp.ones((2, 3)).at[1, 2].set(bad), "b": jnp.zeros(2)}
    assert not bool(rl.all_finite(tree))


# ---------------------------------------------------------------------------
# Every public function traces and runs under jit (values are checked eagerly above).


def test_everything_jits():
  rng = _rng(13)
  mask = jnp.asarray(_right_padded_mask(rng))
  x = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
  r_b = jnp.asarray(rng.normal(size=B), jnp.float32)
  r_bk = jnp.asarray(rng.normal(size=(B, 2)), jnp.float32)
  calls = {
      "token_logprobs": (rl.token_logprobs, (jnp.ones((B, T, V)), jnp.zeros((B, T), jnp.int32))),
      "masked_sum": (rl.masked_sum, (x, mask)),
      "masked_mean": (rl.masked_mean, (x, mask)),
      "sequence_logprob": (rl.sequence_logprob, (x, mask)),
      "mean_token_logprob": (rl.mean_token_logprob, (x, mask)),
      "sequence_kl_k3": (lambda a, b, m: rl.sequence_kl(a, b, m, "k3"), (x, x * 0.5, mask)),
      "max_reward": (rl.max_reward, (r_bk,)),
      "kl_penalized": (rl.kl_penalized, (r_b, r_b, 0.1)),
      "weighted": (rl.weighted, (r_bk, jnp.array([1.0, 0.5]))),
      "rcfd": (rl.rcfd, (r_bk, r_bk * 0.5)),
      "rcfd_group": (rl.rcfd_group, (x[:, :4], r_b)),
      "rcfd_tilt": (rl.rcfd_tilt, (x[:, :4], r_b, x[:, 3:7])),
      "tilt_diagnostics": (rl.tilt_diagnostics, (x[:, :4], x[:, 3:7], 2.0)),
      "adaptive_kl": (rl.adaptive_kl, (jnp.asarray(0.1, jnp.float32), 3.0, 6.0, 1e4, 256)),
      "demo_calibrated_kl": (rl.demo_calibrated_kl, (jnp.asarray(0.1, jnp.float32), r_b, r_b + 1.0, 640.0, 64)),
      "whiten": (rl.whiten, (r_b,)),
      "leave_one_out": (rl.leave_one_out, (r_bk,)),
      "place_at_last": (rl.place_at_last, (r_b, mask)),
      "gae": (lambda r, v, m: rl.gae(r, v, m, 1.0, 0.95), (x, x, mask)),
      "ppo_policy_loss": (lambda a, b, c, m: rl.ppo_policy_loss(a, b, c, m, 0.3),
                          (x, x, r_b, mask)),
      "reinforce_policy_loss": (rl.reinforce_policy_loss, (x, r_b, mask)),
      "value_loss": (lambda a, b, c, m: rl.value_loss(a, b, c, m, 0.2), (x, x, x, mask)),
      "all_finite": (rl.all_finite, ({"a": x, "b": r_b},)),
  }
  # One jit around all of them: every function traces (no Python control flow
  # on traced values) for the cost of a single compilation. The arguments are
  # jit inputs, so even the scalars (beta, target, horizon) are traced.
  fns = {name: fn for name, (fn, _) in calls.items()}
  outs = jax.jit(lambda a: {name: fns[name](*a[name]) for name in fns})(
      {name: args for name, (_, args) in calls.items()})
  for name, out in outs.items():
    assert bool(rl.all_finite(out)), name
  loss_eager = rl.ppo_policy_loss(x, x * 0.9, r_b, mask, 0.3)[0]
  np.testing.assert_allclose(jax.jit(rl.ppo_policy_loss, static_argnums=5)(
      x, x * 0.9, r_b, mask, 0.3, "token_mean")[0], loss_eager, **TOL)


def test_masked_whiten_matches_numpy_on_masked_entries():
  rng = np.random.default_rng(7)
  x = rng.normal(3.0, 2.0, size=(4, 6)).astype(np.float32)
  mask = rng.random((4, 6)) > 0.3
  x_masked = np.where(mask, x, 1e6)  # garbage off the mask must not leak in
  vals = x[mask].astype(np.float64)
  want = (vals - vals.mean()) / (vals.std() + 1e-8)
  got = np.asarray(rl.masked_whiten(jnp.asarray(x_masked), jnp.asarray(mask)))
  np.testing.assert_allclose(got[mask], want, atol=1e-5)
  assert np.all(got[~mask] == 0)


# ---------------------------------------------------------------------------
# rcfd_group: the leave-one-out gradient of -(E[R|x] - R_d)^2


def _ref_rcfd_group(reward_pgk, demo_pk):
  p, g, k = reward_pgk.shape
  scale = [reward_pgk[:, :, c].std() + 1e-8 if k > 1 else 1.0 for c in range(k)]
  adv = np.zeros((p, g))
  for i in range(p):
    for j in range(g):
      for c in range(k):
        others = [reward_pgk[i, o, c] / scale[c] for o in range(g) if o != j]
        m = sum(others) / len(others)
        adv[i, j] += -(m - demo_pk[i, c] / scale[c]) * (reward_pgk[i, j, c] / scale[c] - m)
  return adv


def test_rcfd_group_matches_reference_and_is_scale_invariant():
  rng = _rng(21)
  reward = rng.normal(size=(5, 4, 1)).astype(np.float32)
  demo = rng.normal(size=(5, 1)).astype(np.float32)
  got = np.asarray(rl.rcfd_group(reward, demo))
  np.testing.assert_allclose(got, _ref_rcfd_group(reward, demo), **TOL)
  np.testing.assert_allclose(rl.rcfd_group(reward[..., 0], demo[:, 0]), got, **TOL)  # [P, G] accepted
  two = np.concatenate([reward, 30 + 10 * rng.normal(size=(5, 4, 1))], -1).astype(np.float32)
  demo2 = np.concatenate([demo, 30 + 10 * rng.normal(size=(5, 1))], -1).astype(np.float32)
  got2 = np.asarray(rl.rcfd_group(two, demo2))
  np.testing.assert_allclose(got2, _ref_rcfd_group(two, demo2), rtol=1e-4, atol=1e-4)
  scale = np.array([3.0, 0.1], np.float32)
  np.testing.assert_allclose(rl.rcfd_group(two * scale, demo2 * scale), got2, rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match="at least 2 samples"):
    rl.rcfd_group(reward[:, :1], demo)


def test_rcfd_group_pays_for_the_mean_not_the_spread():
  """In expectation over the other samples, A_i = -(mu - R_d) * R_i + const.

  So sample i's advantage depends on its reward linearly with slope
  -(mu - R_d), the direction that moves the prompt's mean to R_d, and not on
  its squared distance from the mean (the spread), which rcfd's -(R - R_d)^2
  penalises.
  """
  rng = _rng(24)
  r = rng.normal(size=(40000, 4)).astype(np.float32)  # one prompt's rewards: mean 0, std 1
  for demo in (0.0, 2.0, -1.0):
    adv = np.asarray(rl.rcfd_group(r, np.full((r.shape[0],), demo, np.float32))).reshape(-1)
    x = r.reshape(-1)
    design = np.stack([x, x ** 2, np.ones_like(x)], -1)
    slope, curve, _ = np.linalg.lstsq(design, adv, rcond=None)[0]
    assert slope == pytest.approx(demo, abs=0.05), (demo, slope)   # -(mu - R_d) with mu = 0
    assert abs(curve) < 0.05, (demo, curve)                        # no price on the spread
    cal = np.asarray(rl.rcfd(x, np.full_like(x, demo)))
    assert np.linalg.lstsq(design, cal, rcond=None)[0][1] == pytest.approx(-1.0, abs=1e-3)


def test_group_spread_counts_ties():
  r = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], np.float32)
  within, tied = rl.group_spread(r)
  np.testing.assert_allclose(within, [np.sqrt((0.0 + 1.0) / 2)], rtol=1e-6)
  np.testing.assert_allclose(tied, [0.5])


def test_token_entropy_matches_numpy():
  rng = _rng(23)
  logits = rng.normal(size=(2, 3, V)).astype(np.float32) * 3
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(rl.token_entropy(jnp.asarray(logits)), -(p * np.log(p)).sum(-1), rtol=1e-5)


TOY_V, TOY_DEMO_MEAN = 30, 0.6
TOY_REWARD = jnp.linspace(-3.0, 3.0, TOY_V)
TOY_THETA0 = -0.12 * jnp.square(TOY_REWARD)  # an SFT-like start: entropy 3.35 nats, reward std 1.53


@functools.lru_cache(maxsize=None)
def _toy_run(estimator: str, steps: int = 300, seed: int = 0):
  """A shared categorical policy over 30 outputs whose rewards are evenly spaced in [-3, 3].

  Every one of 64 prompts per step draws its R_d ~ N(0.6, 1.5) independently
  of the prompt, which the policy cannot see: the best it can do is match the
  demonstrations' reward distribution as a whole. 4 samples per prompt,
  REINFORCE with batch-whitened advantages and Adam, as the trainer runs it;
  pi_0 is the start. Returns the final policy's probabilities.
  """
  p, g = 64, 4
  tx = optax.adam(0.05)
  logp0_v = jax.nn.log_softmax(TOY_THETA0)

  def step(carry, key):
    theta, opt_state = carry
    k_demo, k_sample = jax.random.split(key)
    demo_p = TOY_DEMO_MEAN + 1.5 * jax.random.normal(k_demo, (p,))
    y_pg = jax.random.categorical(k_sample, theta, shape=(p, g))
    r_pg = TOY_REWARD[y_pg]
    if estimator == "rcfd":
      score = rl.rcfd(r_pg.reshape(-1), jnp.repeat(demo_p, g))
    elif estimator == "rcfd_tilt":
      score = rl.rcfd_tilt(r_pg, demo_p, logp0_v[y_pg] - jax.nn.log_softmax(theta)[y_pg])[0].reshape(-1)
    else:
      score = rl.rcfd_group(r_pg, demo_p).reshape(-1)
    adv = rl.whiten(score)
    grads = jax.grad(lambda th: -jnp.mean(adv * jax.nn.log_softmax(th)[y_pg.reshape(-1)]))(theta)
    updates, opt_state = tx.update(grads, opt_state, theta)
    return (optax.apply_updates(theta, updates), opt_state), None

  (theta, _), _ = jax.lax.scan(step, (TOY_THETA0, tx.init(TOY_THETA0)),
                               jax.random.split(jax.random.key(seed), steps))
  return np.asarray(jax.nn.softmax(theta), np.float64)


def _toy_stats(prob):
  """(entropy, mean reward, reward std) of a toy policy."""
  r = np.asarray(TOY_REWARD, np.float64)
  mean = np.sum(prob * r)
  return -np.sum(prob * np.log(prob)), mean, np.sqrt(np.sum(prob * np.square(r - mean)))


def _kl(p, q):
  return float(np.sum(p * (np.log(p) - np.log(q))))


def test_toy_policy_rcfd_collapses_where_rcfd_group_calibrates():
  """Unpredictable R_d: the paper's estimator buys a lower loss by removing the reward's spread."""
  entropy, mean, std = _toy_stats(_toy_run("rcfd"))
  assert entropy < 1.0 and std < 0.3, (entropy, std)       # collapsed onto a few outputs
  assert abs(mean - 0.6) < 0.3
  entropy, mean, std = _toy_stats(_toy_run("rcfd_group"))
  assert entropy > 2.5 and std > 1.0, (entropy, std)        # the spread survives (start: 3.35, 1.53)
  assert abs(mean - 0.6) < 0.15, mean                       # and the mean reaches the demonstrations'


# ---------------------------------------------------------------------------
# rcfd_tilt: toward pi_0 exp(lambda R) / Z, lambda set by the demonstrations' mean


def _ref_tilt(reward_pg, log_ratio_pg, target):
  """(lambda, [P, G] advantages) by float64 bisection of the self-normalized tilted mean, in reward units."""
  r, rho = reward_pg.astype(np.float64), log_ratio_pg.astype(np.float64)

  def weights(lam):
    a = lam * r + rho
    w = np.exp(a - a.max(1, keepdims=True))
    return w / w.sum(1, keepdims=True)

  lo, hi = -1e3, 1e3
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if np.mean(np.sum(weights(mid) * r, 1)) < target else (lo, mid)
  lam = 0.5 * (lo + hi)
  return lam, r.shape[1] * weights(lam) - 1.0


def test_rcfd_tilt_matches_reference():
  rng = _rng(31)
  reward = rng.normal(0.5, 2.0, size=(6, 4)).astype(np.float32)
  log_ratio = rng.normal(0.0, 0.7, size=(6, 4)).astype(np.float32)
  for target in (0.0, 0.5, 1.5):
    demo = (target + rng.normal(size=6)).astype(np.float32)
    demo += target - demo.mean()  # the batch's demonstrations average to `target`
    adv, lam = rl.rcfd_tilt(reward, demo, log_ratio)
    want_lam, want_adv = _ref_tilt(reward, log_ratio, float(demo.mean()))
    assert float(lam) == pytest.approx(want_lam, rel=1e-3, abs=1e-4)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(adv).sum(1), 0.0, atol=1e-5)   # centred within each prompt
    w = (np.asarray(adv) + 1) / 4
    assert np.mean(np.sum(w * reward, 1)) == pytest.approx(target, abs=1e-3)  # the tilt scores the demos' mean
  adv, lam = rl.rcfd_tilt(reward, np.full(6, 100.0, np.float32), log_ratio)  # beyond every sample: the bound
  assert float(lam) == pytest.approx(30.0 / reward.std(), rel=1e-4)           # 30 in 1 / the rewards' std
  a = float(lam) * reward.astype(np.float64) + log_ratio
  w = np.exp(a - a.max(1, keepdims=True))
  np.testing.assert_allclose(adv, 4 * w / w.sum(1, keepdims=True) - 1, rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match="at least 2 samples"):
    rl.rcfd_tilt(reward[:, :1], demo, log_ratio[:, :1])


def test_rcfd_tilt_is_still_where_the_policy_is_the_tilt():
  """pi = pi_0 exp(lambda0 R) / Z: log pi_0 - log pi = -lambda0 R + log Z(x), and the weights are flat."""
  rng = _rng(32)
  reward = rng.normal(size=(8, 4)).astype(np.float32)
  log_z = rng.normal(size=(8, 1)).astype(np.float32)
  adv, lam = rl.rcfd_tilt(reward, np.full(8, reward.mean(), np.float32), -0.7 * reward + log_z)
  assert float(lam) == pytest.approx(0.7, abs=1e-4)
  np.testing.assert_allclose(adv, 0.0, atol=1e-4)


def test_tilt_diagnostics_match_numpy():
  rng = _rng(33)
  reward = rng.normal(size=(5, 4)).astype(np.float32)
  log_ratio = rng.normal(size=(5, 4)).astype(np.float32)
  got = rl.tilt_diagnostics(reward, log_ratio, 2.0)
  a = 2.0 * reward.astype(np.float64) + log_ratio
  w = np.exp(a - a.max(1, keepdims=True))
  w /= w.sum(1, keepdims=True)
  assert float(got["ess"]) == pytest.approx(np.mean(1 / (w ** 2).sum(1)), rel=1e-5)
  assert float(got["reward_spread"]) == pytest.approx(np.mean((2.0 * reward).std(1)), rel=1e-5)
  assert float(got["ratio_spread"]) == pytest.approx(np.mean(log_ratio.std(1)), rel=1e-5)
  flat = rl.tilt_diagnostics(reward, -2.0 * reward, 2.0)  # the policy is the tilt: flat weights
  assert float(flat["ess"]) == pytest.approx(4.0, rel=1e-5)


def test_toy_policy_rcfd_tilt_reaches_the_least_kl_policy_with_the_demonstrations_mean():
  """Of the policies whose mean is the demonstrations', rcfd_tilt ends at the one nearest pi_0; rcfd_group does not.

  The exact answer, p* = pi_0 exp(lambda R) / Z with its mean at 0.6, is
  computed here by bisection; both arms calibrate the mean, only the tilt
  lands on p*.
  """
  p0 = np.asarray(jax.nn.softmax(TOY_THETA0), np.float64)
  lam, _ = _ref_tilt(np.asarray(TOY_REWARD)[None], np.log(p0)[None], TOY_DEMO_MEAN)
  p_star = p0 * np.exp(lam * np.asarray(TOY_REWARD, np.float64))
  p_star /= p_star.sum()
  tilt, group = _toy_run("rcfd_tilt"), _toy_run("rcfd_group")
  assert abs(_toy_stats(tilt)[1] - TOY_DEMO_MEAN) < 0.1
  assert _kl(p_star, tilt) < 0.01, _kl(p_star, tilt)                     # measured: 0.0005
  assert abs(_kl(tilt, p0) - _kl(p_star, p0)) < 0.02                     # the least KL: 0.078 nats
  assert _kl(p_star, group) > 0.1, _kl(p_star, group)                   # measured: 0.17
  assert _kl(group, p0) > 2 * _kl(p_star, p0)
