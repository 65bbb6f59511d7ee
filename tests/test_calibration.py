"""rcfd_jax.calibration against NumPy references written here, and on a toy policy.

The references are naive (Python loops, float64) and share no code path with
the vectorised jax versions. The toy policy shows what each estimator does
where the prompt does not predict the demonstration's reward.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rcfd_jax import calibration, rl

B = 5
TOL = dict(rtol=1e-5, atol=1e-5)


def _rng(seed=0):
  return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# rcfd: the paper's -(R - R_d)^2


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
  got = np.asarray(calibration.rcfd(reward, demo))
  np.testing.assert_allclose(got, _ref_rcfd(reward, demo, False), **TOL)
  np.testing.assert_allclose(calibration.rcfd(reward[:, 0], demo[:, 0]), got, **TOL)  # [B] accepted
  assert got[2] == 0.0 and np.all(np.delete(got, 2) < 0)
  # Maximal exactly at R = R_d: any perturbation of the reward lowers it.
  for delta in (-1.0, -1e-2, 1e-2, 1.0):
    assert float(calibration.rcfd(demo[2:3] + delta, demo[2:3])[0]) < 0.0
  np.testing.assert_allclose(calibration.rcfd(reward, demo, whiten_each=True),
                             _ref_rcfd(reward, demo, True), **TOL)


def test_rcfd_several_rewards_whitens_each_component_and_is_scale_invariant():
  rng = _rng(6)
  demo = np.stack([rng.normal(size=B), rng.uniform(10, 50, size=B)], -1).astype(np.float32)
  reward = (demo + rng.normal(size=(B, 2)) * [1.0, 10.0]).astype(np.float32)
  got = calibration.rcfd(reward, demo)
  np.testing.assert_allclose(got, _ref_rcfd(reward, demo, True), **TOL)
  np.testing.assert_allclose(calibration.rcfd(reward, demo, whiten_each=False),
                             _ref_rcfd(reward, demo, False), rtol=1e-5, atol=1e-3)
  scale = np.array([1.0, 7.5], np.float32)  # e.g. length in other units
  np.testing.assert_allclose(calibration.rcfd(reward * scale, demo * scale), got, rtol=1e-4, atol=1e-4)


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
  got = np.asarray(calibration.rcfd_group(reward, demo))
  np.testing.assert_allclose(got, _ref_rcfd_group(reward, demo), **TOL)
  np.testing.assert_allclose(calibration.rcfd_group(reward[..., 0], demo[:, 0]), got, **TOL)  # [P, G] accepted
  two = np.concatenate([reward, 30 + 10 * rng.normal(size=(5, 4, 1))], -1).astype(np.float32)
  demo2 = np.concatenate([demo, 30 + 10 * rng.normal(size=(5, 1))], -1).astype(np.float32)
  got2 = np.asarray(calibration.rcfd_group(two, demo2))
  np.testing.assert_allclose(got2, _ref_rcfd_group(two, demo2), rtol=1e-4, atol=1e-4)
  scale = np.array([3.0, 0.1], np.float32)
  np.testing.assert_allclose(calibration.rcfd_group(two * scale, demo2 * scale), got2, rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match="at least 2 samples"):
    calibration.rcfd_group(reward[:, :1], demo)


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
    adv = np.asarray(calibration.rcfd_group(r, np.full((r.shape[0],), demo, np.float32))).reshape(-1)
    x = r.reshape(-1)
    design = np.stack([x, x ** 2, np.ones_like(x)], -1)
    slope, curve, _ = np.linalg.lstsq(design, adv, rcond=None)[0]
    assert slope == pytest.approx(demo, abs=0.05), (demo, slope)   # -(mu - R_d) with mu = 0
    assert abs(curve) < 0.05, (demo, curve)                        # no price on the spread
    cal = np.asarray(calibration.rcfd(x, np.full_like(x, demo)))
    assert np.linalg.lstsq(design, cal, rcond=None)[0][1] == pytest.approx(-1.0, abs=1e-3)


def test_group_spread_counts_ties():
  r = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], np.float32)
  within, tied = calibration.group_spread(r)
  np.testing.assert_allclose(within, [np.sqrt((0.0 + 1.0) / 2)], rtol=1e-6)
  np.testing.assert_allclose(tied, [0.5])


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
    if estimator == "rcfd_tilt_reference":  # pi_0's samples, weighted likelihood: no whitening
      y_pg = jax.random.categorical(k_sample, TOY_THETA0, shape=(p, g))
      adv = calibration.rcfd_tilt_from_reference(TOY_REWARD[y_pg], demo_p)[0].reshape(-1)
      grads = jax.grad(lambda th: -jnp.mean(adv * jax.nn.log_softmax(th)[y_pg.reshape(-1)]))(theta)
      updates, opt_state = tx.update(grads, opt_state, theta)
      return (optax.apply_updates(theta, updates), opt_state), None
    if estimator == "rcfd":
      score = calibration.rcfd(r_pg.reshape(-1), jnp.repeat(demo_p, g))
    elif estimator == "rcfd_tilt":
      score = calibration.rcfd_tilt(r_pg, demo_p, logp0_v[y_pg] - jax.nn.log_softmax(theta)[y_pg])[0].reshape(-1)
    else:
      score = calibration.rcfd_group(r_pg, demo_p).reshape(-1)
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
    adv, lam = calibration.rcfd_tilt(reward, demo, log_ratio)
    want_lam, want_adv = _ref_tilt(reward, log_ratio, float(demo.mean()))
    assert float(lam) == pytest.approx(want_lam, rel=1e-3, abs=1e-4)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(adv).sum(1), 0.0, atol=1e-5)   # centred within each prompt
    w = (np.asarray(adv) + 1) / 4
    assert np.mean(np.sum(w * reward, 1)) == pytest.approx(target, abs=1e-3)  # the tilt scores the demos' mean
  adv, lam = calibration.rcfd_tilt(reward, np.full(6, 100.0, np.float32), log_ratio)  # beyond every sample: the bound
  assert float(lam) == pytest.approx(30.0 / reward.std(), rel=1e-4)           # 30 in 1 / the rewards' std
  a = float(lam) * reward.astype(np.float64) + log_ratio
  w = np.exp(a - a.max(1, keepdims=True))
  np.testing.assert_allclose(adv, 4 * w / w.sum(1, keepdims=True) - 1, rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match="at least 2 samples"):
    calibration.rcfd_tilt(reward[:, :1], demo, log_ratio[:, :1])


def test_rcfd_tilt_is_still_where_the_policy_is_the_tilt():
  """pi = pi_0 exp(lambda0 R) / Z: log pi_0 - log pi = -lambda0 R + log Z(x), and the weights are flat."""
  rng = _rng(32)
  reward = rng.normal(size=(8, 4)).astype(np.float32)
  log_z = rng.normal(size=(8, 1)).astype(np.float32)
  adv, lam = calibration.rcfd_tilt(reward, np.full(8, reward.mean(), np.float32), -0.7 * reward + log_z)
  assert float(lam) == pytest.approx(0.7, abs=1e-4)
  np.testing.assert_allclose(adv, 0.0, atol=1e-4)


def test_tilt_diagnostics_match_numpy():
  rng = _rng(33)
  reward = rng.normal(size=(5, 4)).astype(np.float32)
  log_ratio = rng.normal(size=(5, 4)).astype(np.float32)
  got = calibration.tilt_diagnostics(reward, log_ratio, 2.0)
  a = 2.0 * reward.astype(np.float64) + log_ratio
  w = np.exp(a - a.max(1, keepdims=True))
  w /= w.sum(1, keepdims=True)
  assert float(got["ess"]) == pytest.approx(np.mean(1 / (w ** 2).sum(1)), rel=1e-5)
  assert float(got["reward_spread"]) == pytest.approx(np.mean((2.0 * reward).std(1)), rel=1e-5)
  assert float(got["ratio_spread"]) == pytest.approx(np.mean(log_ratio.std(1)), rel=1e-5)
  flat = calibration.tilt_diagnostics(reward, -2.0 * reward, 2.0)  # the policy is the tilt: flat weights
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


def test_rcfd_tilt_from_reference_is_the_uncentred_tilt_without_a_log_ratio():
  rng = _rng(34)
  reward = rng.normal(0.5, 2.0, size=(6, 4)).astype(np.float32)
  demo = rng.normal(1.0, 1.0, size=6).astype(np.float32)
  adv, lam = calibration.rcfd_tilt_from_reference(reward, demo)
  want_lam, want_adv = _ref_tilt(reward, np.zeros_like(reward), float(demo.mean()))
  assert float(lam) == pytest.approx(want_lam, rel=1e-3, abs=1e-4)
  np.testing.assert_allclose(adv, want_adv + 1.0, rtol=1e-3, atol=1e-4)
  assert np.all(np.asarray(adv) >= 0)
  np.testing.assert_allclose(np.asarray(adv).sum(1), 4.0, rtol=1e-5)         # G per prompt: not centred
  assert np.mean(np.sum(np.asarray(adv) / 4 * reward, 1)) == pytest.approx(float(demo.mean()), abs=1e-3)


def test_toy_policy_rcfd_tilt_from_reference_samples_lands_near_the_least_kl_policy():
  """Trained on pi_0's samples alone, by their weighted likelihood, the policy moves to p* and stays there."""
  p0 = np.asarray(jax.nn.softmax(TOY_THETA0), np.float64)
  lam, _ = _ref_tilt(np.asarray(TOY_REWARD)[None], np.log(p0)[None], TOY_DEMO_MEAN)
  p_star = p0 * np.exp(lam * np.asarray(TOY_REWARD, np.float64))
  p_star /= p_star.sum()
  ref = _toy_run("rcfd_tilt_reference")
  assert abs(_toy_stats(ref)[1] - TOY_DEMO_MEAN) < 0.05, _toy_stats(ref)  # measured: 0.58
  assert _kl(p_star, ref) < 0.01, _kl(p_star, ref)                       # measured: 0.003
  assert _kl(ref, p0) < 1.5 * _kl(p_star, p0), (_kl(ref, p0), _kl(p_star, p0))


def test_everything_jits():
  """One jit around every function: no Python control flow on traced values."""
  rng = _rng(13)
  x = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  r_b, r_bk = x[:, 0], x[:, :2]
  calls = {
      "rcfd": (calibration.rcfd, (r_bk, r_bk * 0.5)),
      "rcfd_group": (calibration.rcfd_group, (x[:, :4], r_b)),
      "group_spread": (calibration.group_spread, (x[:, :4],)),
      "rcfd_tilt": (calibration.rcfd_tilt, (x[:, :4], r_b, x[:, 3:7])),
      "rcfd_tilt_from_reference": (calibration.rcfd_tilt_from_reference, (x[:, :4], r_b)),
      "tilt_diagnostics": (calibration.tilt_diagnostics, (x[:, :4], x[:, 3:7], 2.0)),
  }
  fns = {name: fn for name, (fn, _) in calls.items()}
  outs = jax.jit(lambda a: {name: fns[name](*a[name]) for name in fns})(
      {name: args for name, (_, args) in calls.items()})
  for name, out in outs.items():
    assert bool(rl.all_finite(out)), name
