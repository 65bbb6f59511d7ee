"""rl.rcfd_target: what rcfd and rcfd_group calibrate each training prompt to (rcfd_jax.demos.calibration_targets)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcfd_jax import config as config_lib
from rcfd_jax import calibration, demos
from rcfd_jax.errors import UserError


def test_targets_demo_is_each_prompts_own_and_mean_is_the_column_mean():
  demo_nk = (np.random.default_rng(0).normal(size=(7, 2)) * [1.0, 30.0] + [0.5, -4.0]).astype(np.float32)
  np.testing.assert_array_equal(demos.calibration_targets(demo_nk, "demo"), demo_nk)
  mean_nk = demos.calibration_targets(demo_nk, "mean")
  assert mean_nk.shape == demo_nk.shape and mean_nk.dtype == np.float32
  for k in range(2):
    np.testing.assert_allclose(mean_nk[:, k], sum(float(v) for v in demo_nk[:, k]) / 7, rtol=1e-6)
  with pytest.raises(ValueError, match="median"):
    demos.calibration_targets(demo_nk, "median")


def _gradients(target: str, batches: int = 4000, p: int = 16, g: int = 4, seed: int = 0):
  """[batches, V] rcfd_group policy gradients (raw advantages) of a fixed categorical policy.

  30 outputs with rewards evenly spaced in [-3, 3], an SFT-like start whose
  mean reward (about 0) is below the demonstrations' (0.6); each prompt's
  R_d ~ N(0.6, 1.5) is independent of the prompt.
  """
  r_v = jnp.linspace(-3.0, 3.0, 30)
  theta = -0.12 * jnp.square(r_v)

  def one(key):
    k_demo, k_sample = jax.random.split(key)
    demo_p = 0.6 + 1.5 * jax.random.normal(k_demo, (p,))
    if target == "mean":
      demo_p = jnp.full((p,), 0.6)
    y_pg = jax.random.categorical(k_sample, theta, shape=(p, g))
    adv = calibration.rcfd_group(r_v[y_pg], demo_p).reshape(-1)
    return jax.grad(lambda th: jnp.mean(adv * jax.nn.log_softmax(th)[y_pg.reshape(-1)]))(theta)

  return np.asarray(jax.vmap(one)(jax.random.split(jax.random.key(seed), batches)), np.float64)


def test_mean_target_keeps_the_expected_gradient_and_removes_the_demonstrations_noise():
  """Unpredictable R_d: same expected gradient, a fraction of the variance."""
  per_prompt, mean = _gradients("demo"), _gradients("mean")
  mu_d, mu_m = per_prompt.mean(0), mean.mean(0)
  stderr = np.sqrt(per_prompt.var(0) / len(per_prompt) + mean.var(0) / len(mean))
  assert np.all(np.abs(mu_d - mu_m) < 5 * stderr + 1e-6)
  assert np.linalg.norm(mu_m) > 10 * np.sqrt(mean.var(0).sum() / len(mean))  # the signal is resolved
  assert mean.var(0).sum() < 0.5 * per_prompt.var(0).sum(), (mean.var(0).sum(), per_prompt.var(0).sum())


def test_config_refuses_an_unknown_target_and_a_target_no_objective_reads():
  c = importlib.import_module("configs.tiny").get_config()
  c.rl.objective, c.rl.baseline, c.rollout.samples_per_prompt = "rcfd_group", "whiten", 4
  for target in config_lib.CALIBRATION_TARGETS:
    c.rl.rcfd_target = target
    config_lib.check(c)
  c.rl.rcfd_target = "median"
  with pytest.raises(UserError, match="rcfd_target"):
    config_lib.check(c)
  c.rl.objective, c.rl.rcfd_target = "max", "mean"
  with pytest.raises(UserError, match="reads no target"):
    config_lib.check(c)
