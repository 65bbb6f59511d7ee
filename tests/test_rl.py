"""rcfd_jax.rl against NumPy references written here, plus the properties the trainer relies on.

The references are deliberately naive (Python loops over rows and tokens,
float64) so they share no code path with the vectorised jax versions.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
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


def test_token_entropy_matches_numpy():
  rng = _rng(23)
  logits = rng.normal(size=(2, 3, V)).astype(np.float32) * 3
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(rl.token_entropy(jnp.asarray(logits)), -(p * np.log(p)).sum(-1), rtol=1e-5)
