"""The RL core on the tiny model: objectives move what they target, sharding, LoRA, guards, accumulation.

Measurements are deterministic: the policy's next-token distributions on a
fixed batch of (prompt, demonstration) sequences, not sampled metrics, so a
flipped gradient sign fails the direction checks rather than drowning in
sampling noise. The reward is -|y|: the random policy ends about one of 64
rollouts of 8 tokens early, enough signal at a high learning rate (the
log-likelihood under a near-uniform random pi_0 is too flat to learn in a
few steps).
"""

import dataclasses
import json
import math
import shutil
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import load_config
from rcfd_jax import bridge, calibration, checkpoint, config as config_lib, metrics, models, rewards, rl, train
from rcfd_jax.errors import UserError
from rcfd_jax.models import layers as L
from rcfd_jax import step as step_lib
from rcfd_jax.step import make_rollout, make_scorer, make_update

N_MEASURE = 16


def tiny_config(assets, cache_dir, **overrides):
  """configs/tiny.py on `assets` with the length reward, 16 prompts x 4 samples of 8 tokens, lr 1e-2."""
  return load_config(f"tiny:{assets}", {
      "reward.cache_dir": str(cache_dir), "reward.sources": ("length",), "rl.baseline": "whiten",
      "rollout.max_new_tokens": 8, "rollout.prompts_per_step": 16, "rollout.samples_per_prompt": 4,
      "data.demo_max_tokens": 8, "data.max_examples": 64, "data.validation_size": 8,
      "optim.learning_rate": 1e-2, "eval.num_prompts": 8, **overrides})


PPO = {"rl.algorithm": "ppo", "rl.baseline": "gae", "rl.ppo.epochs": 2, "rl.ppo.minibatches": 2}


def test_objectives_and_baselines_are_named_once():
  """config.check accepts exactly the objectives and baselines the step looks up by name."""
  assert config_lib.OBJECTIVES == tuple(step_lib.OBJECTIVES) == typing.get_args(step_lib.Objective)
  assert config_lib.BASELINES == tuple(step_lib.BASELINES) == typing.get_args(step_lib.Baseline)


def test_unknown_objective_or_baseline_names_itself():
  """A StepConfig built past config.check still fails on a name the step does not know, naming it."""
  sc = step_lib.StepConfig.from_config(config_lib.base(), eos_id=2, pad_id=0)
  with pytest.raises(ValueError, match="maximum"):
    step_lib.objective(dataclasses.replace(sc, objective="maximum"), None, None, None, None, None)
  with pytest.raises(ValueError, match="baseline_x"):
    step_lib.advantages(dataclasses.replace(sc, baseline="baseline_x"), None, None)


def test_step_config_reads_each_field_from_its_config_entry():
  c = config_lib.base()
  c.rollout.samples_per_prompt, c.rollout.max_new_tokens, c.rollout.top_k = 3, 11, 5
  c.rl.ppo.epochs, c.rl.ppo.minibatches, c.optim.grad_accum = 2, 6, 4
  c.rl.ppo.value_clip, c.rl.clip_eps, c.rl.alpha = 0.25, 0.35, (1.0, 0.5)
  c.log_every_steps, c.total_steps = 7, 9
  want = dict(
      samples_per_prompt=3, max_new_tokens=11, temperature=c.rollout.temperature, top_k=5,
      top_p=c.rollout.top_p, eos_id=2, pad_id=0, objective=c.rl.objective, algorithm=c.rl.algorithm,
      baseline=c.rl.baseline, kl_estimator=c.rl.kl_estimator, adaptive_kl=c.rl.adaptive_kl,
      adaptive_kl_signal=c.rl.adaptive_kl_signal,
      kl_target=c.rl.kl_target, kl_horizon=c.rl.kl_horizon, alpha=(1.0, 0.5), ppo_epochs=2, minibatches=6,
      grad_accum=4, clip_eps=0.35, value_clip=0.25, vf_coef=c.rl.ppo.vf_coef, gamma=c.rl.ppo.gamma,
      lam=c.rl.ppo.lam, loss_agg=c.rl.loss_agg, tilt_proposal=c.rl.tilt_proposal, metrics_every=7,
      total_steps=9)
  assert dataclasses.asdict(step_lib.StepConfig.from_config(c, eos_id=2, pad_id=0)) == want


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("demo_cache")


def build(assets, cache_dir, **overrides):
  return train.build(tiny_config(assets, cache_dir, **overrides), Path("/nonexistent-unused"))


_FUSED, _MEASURE = {}, {}


def fused(s, objective):
  """The trainer's fused step compiled for `objective` on setup `s` (once per module)."""
  key = (id(s), objective)
  if key not in _FUSED:
    _FUSED[key] = train.compile_steps(dataclasses.replace(s, sc=dataclasses.replace(s.sc, objective=objective))).fused
  return _FUSED[key]


def train_steps(s, step_fn, state, n, demo=None, beta=None):
  """n fused steps from a copy of `state` (donated by the step); returns (state, metrics per step)."""
  state = jax.tree.map(jnp.copy, state)
  if beta is not None:
    state = state.replace(beta=jnp.asarray(beta, jnp.float32))
  demo = s.demo_train if demo is None else demo
  out = []
  for i in range(n):
    batch = bridge.device_batch(s, s.batcher, s.batcher.indices(i), demo)
    state, m = step_fn(state, s.frozen, batch)
    out.append({k: float(v) for k, v in jax.device_get(m).items()})
  return state, out


def _measure_fn(s):
  if id(s) in _MEASURE:
    return _MEASURE[id(s)]
  b = s.batcher.gather(np.arange(N_MEASURE))
  seq = jnp.asarray(np.concatenate([b.prompt_ids, b.demo_ids], 1))
  seq_mask = jnp.asarray(np.concatenate([b.prompt_mask, b.demo_mask], 1).astype(bool))
  mask = jnp.asarray(b.demo_mask, jnp.float32)
  p_len = b.prompt_ids.shape[1]

  @jax.jit
  def fn(params):
    logits, _ = s.parts.merge(params, s.frozen.base).completion_outputs(seq, seq_mask, p_len)
    ref_logits, _ = s.parts.reference(params, s.frozen.base, s.frozen.ref).completion_outputs(seq, seq_mask, p_len)
    logp, ref_logp = jax.nn.log_softmax(logits), jax.nn.log_softmax(ref_logits)
    p = jnp.exp(logp)
    per_pos = {"expected_loglik": (p * ref_logp).sum(-1), "kl": (p * (logp - ref_logp)).sum(-1),
               "p_eos": p[..., s.sc.eos_id]}
    return {k: rl.masked_mean(v, mask) for k, v in per_pos.items()}

  _MEASURE[id(s)] = fn
  return fn


def measure(s, state) -> dict:
  """Per-token P(EOS), E_pi[log pi_0] and KL(pi || pi_0) on fixed demonstration contexts."""
  return {k: float(v) for k, v in _measure_fn(s)(state.params).items()}


# The direction tests run on one device (8 virtual CPU devices on 2 cores cost
# collectives for nothing); test_sharded_step_matches_single_device covers the mesh.
ONE_DEVICE = {"mesh.shape": (1, 1, 1), "mesh.devices": 1}


@pytest.fixture(scope="module")
def reinforce(tiny_assets, cache):
  return build(tiny_assets, cache, **ONE_DEVICE)


@pytest.fixture(scope="module")
def ppo(tiny_assets, cache):
  """PPO, 2 epochs x 2 minibatches, value head."""
  return build(tiny_assets, cache, **PPO, **ONE_DEVICE)


@pytest.fixture(params=["reinforce", "ppo"])
def setup(request):
  return request.getfixturevalue(request.param)


def test_max_length_reward_makes_completions_shorter(setup):
  """R = -|y|: maximising it raises P(EOS) (a flipped gradient would lower it)."""
  s, state = setup
  before = measure(s, state)["p_eos"]
  after_state, ms = train_steps(s, fused(s, "max"), state, 4)
  assert measure(s, after_state)["p_eos"] > 1.2 * before  # a flipped sign would lower it
  assert all(m["skipped"] == 0 for m in ms)


def test_rcfd_pulls_reward_toward_the_demonstrations(setup):
  """Demos shorter than the samples pull P(EOS) up; demos as long as the budget pull it down."""
  s, state = setup
  step_fn = fused(s, "rcfd")
  before = measure(s, state)["p_eos"]
  n = s.sc.max_new_tokens
  short, m_short = train_steps(s, step_fn, state, 4, demo=np.full_like(s.demo_train, -2.0))
  long, m_long = train_steps(s, step_fn, state, 4, demo=np.full_like(s.demo_train, -float(n)))
  assert m_short[0]["demo_reward_mean"] == -2.0 > m_short[0]["reward_mean"]
  assert m_long[0]["demo_reward_mean"] == -float(n) < m_long[0]["reward_mean"]
  assert measure(s, short)["p_eos"] > 1.5 * before
  assert measure(s, long)["p_eos"] < before


def test_rcfd_group_groups_each_prompts_samples_and_pushes_toward_the_demonstration(setup):
  """The step hands calibration.rcfd_group each prompt's k consecutive rollouts, and the update follows it.

  Demonstrations as long as the budget: the few groups holding an early EOS
  have a mean above R_d = -n, and the update makes EOS rarer. (Short
  demonstrations need more groups with a spread than this random policy gives.)
  """
  s, state = setup
  k = s.sc.samples_per_prompt
  rng = np.random.default_rng(0)
  reward_rk = rng.normal(size=(4 * k, 2)).astype(np.float32)
  demo_rk = np.repeat(rng.normal(size=(4, 2)), k, axis=0).astype(np.float32)
  sc = dataclasses.replace(s.sc, objective="rcfd_group")
  got, extra = step_lib.objective(sc, jnp.asarray(reward_rk), jnp.asarray(demo_rk), None, None, None)
  assert extra == {}
  want = calibration.rcfd_group(reward_rk.reshape(4, k, 2), demo_rk[::k]).reshape(-1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  before = measure(s, state)["p_eos"]
  long, ms = train_steps(s, fused(s, "rcfd_group"), state, 4,
                         demo=np.full_like(s.demo_train, -float(s.sc.max_new_tokens)))
  assert measure(s, long)["p_eos"] < before
  m = ms[0]
  assert 0 <= m["reward_tied_frac/length"] <= 1 and m["reward_within_prompt_std/length"] >= 0
  assert 0 < m["entropy"] <= math.log(len(s.tokenizer))


def test_rcfd_tilt_weighs_each_prompts_samples_by_their_log_ratio_and_pushes_toward_the_demonstration(reinforce):
  """The step hands calibration.rcfd_tilt each prompt's k rollouts with log pi_0 - log pi, and follows it."""
  s, state = reinforce
  k = s.sc.samples_per_prompt
  rng = np.random.default_rng(1)
  reward_rk = rng.normal(size=(4 * k, 1)).astype(np.float32)
  demo_rk = np.repeat(rng.normal(size=(4, 1)), k, axis=0).astype(np.float32)
  log_ratio_r = rng.normal(size=4 * k).astype(np.float32)
  sc = dataclasses.replace(s.sc, objective="rcfd_tilt")
  assert step_lib.reads_reference(sc, s.rewards)
  got, extra = step_lib.objective(sc, jnp.asarray(reward_rk), jnp.asarray(demo_rk), None, None,
                                  jnp.asarray(log_ratio_r))
  want, lam = calibration.rcfd_tilt(reward_rk.reshape(4, k), demo_rk[::k, 0], log_ratio_r.reshape(4, k))
  np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-6)
  assert float(extra["tilt_lambda"]) == pytest.approx(float(lam))
  before = measure(s, state)["p_eos"]
  long, ms = train_steps(s, fused(s, "rcfd_tilt"), state, 4,
                         demo=np.full_like(s.demo_train, -float(s.sc.max_new_tokens)))
  assert measure(s, long)["p_eos"] < before
  assert all(m["tilt_lambda"] < 0 for m in ms)  # the demonstrations score below the samples: lambda < 0
  assert all(1 <= m["tilt_ess"] <= k and m["tilt_reward_spread"] >= 0 and m["tilt_ratio_spread"] >= 0 for m in ms)


def test_rcfd_tilt_from_reference_samples_pi_0_and_follows_the_weighted_likelihood(reinforce):
  """tilt_proposal=reference: rollouts come from pi_0 however far the policy has moved, and the step follows them."""
  s, state = reinforce
  sc = dataclasses.replace(s.sc, objective="rcfd_tilt", tilt_proposal="reference", baseline="none")
  steps = train.compile_steps(dataclasses.replace(s, sc=sc))
  before = measure(s, state)["p_eos"]
  long, ms = train_steps(s, steps.fused, state, 4, demo=np.full_like(s.demo_train, -float(s.sc.max_new_tokens)))
  assert measure(s, long)["p_eos"] < before             # long demonstrations: pi_0's long samples weigh more
  assert all(m["tilt_lambda"] < 0 and m["tilt_ratio_spread"] == 0 for m in ms)
  assert all("kl" not in m for m in ms)                # pi_0's samples say nothing of KL(pi || pi_0)
  assert ms[0]["reference_kl"] == pytest.approx(0.0, abs=1e-5)  # k1 of KL(pi_0 || pi) on pi_0's samples: 0 at first
  assert ms[-1]["reference_kl"] > 0.05                           # then the policy moves (measured: 0.18)
  batch = bridge.device_batch(s, s.batcher, s.batcher.indices(0), s.demo_train)
  score = jax.jit(make_scorer(s.parts, s.rewards))
  for proposal, from_pi0 in (("reference", True), ("policy", False)):
    ro = jax.jit(make_rollout(s.parts, s.rewards, dataclasses.replace(sc, tilt_proposal=proposal)))(
        long, s.frozen, batch)
    ref_logp, _ = score(long.params, s.frozen, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask)
    np.testing.assert_allclose(np.asarray(ro.ref_logp * ro.mask), np.asarray(ref_logp * ro.mask), atol=1e-4)
    gap = float(jnp.abs((ro.logp - ref_logp) * ro.mask).max())
    assert (gap < 1e-4) == from_pi0, (proposal, gap)     # the sampler's log-probs are pi_0's, or the policy's
  ro = steps.eval_rollout(long, s.frozen, batch)           # the evaluation samples the policy being trained
  assert float(jnp.abs((ro.logp - ro.ref_logp) * ro.mask).max()) > 1e-4


def test_rcfd_tilt_from_reference_runs_no_reference_forward(reinforce, monkeypatch):
  """pi_0 samples the rollout, so its log-probs come from the sampler: the reference forward is never traced."""
  s, state = reinforce
  sc = dataclasses.replace(s.sc, objective="rcfd_tilt", tilt_proposal="reference", baseline="none")
  batch = bridge.device_batch(s, s.batcher, s.batcher.indices(0), s.demo_train)

  def no_forward(*args):
    raise AssertionError("the reference forward ran")

  monkeypatch.setattr(step_lib, "_reference_logprobs", no_forward)
  jax.eval_shape(make_rollout(s.parts, s.rewards, sc), state, s.frozen, batch)
  with pytest.raises(AssertionError, match="reference forward"):
    jax.eval_shape(make_rollout(s.parts, s.rewards, dataclasses.replace(sc, tilt_proposal="policy")),
                   state, s.frozen, batch)


def test_kl_penalty_keeps_policy_closer_to_reference(setup):
  s, state = setup
  step_fn = fused(s, "kl")
  free, _ = train_steps(s, step_fn, state, 4, beta=0.0)
  held, ms = train_steps(s, step_fn, state, 4, beta=10.0)
  assert ms[0]["beta"] == 10.0
  kl_free, kl_held = measure(s, free)["kl"], measure(s, held)["kl"]
  assert kl_free > 1e-3
  assert kl_held < 0.7 * kl_free, (kl_held, kl_free)


def test_sharded_step_matches_single_device(ppo, tiny_assets, cache):
  s1, state1 = ppo
  s8, state8 = build(tiny_assets, cache, **PPO, **{"mesh.shape": (2, 2, 2)})
  assert s8.mesh.devices.size == 8 and s1.mesh.devices.size == 1
  out8, m8 = train_steps(s8, fused(s8, "rcfd"), state8, 2)
  out1, m1 = train_steps(s1, fused(s1, "rcfd"), state1, 2)
  assert [m["length_mean"] for m in m8] == [m["length_mean"] for m in m1]
  moved = 0.0
  for a, b, init in zip(jax.tree.leaves(out8.params), jax.tree.leaves(out1.params), jax.tree.leaves(state1.params)):
    # Adam divides by sqrt(v): fp32 reduction-order noise in near-zero gradients moves a
    # parameter by a small fraction of lr (1e-2), so atol is 2% of one step's update (the layer
    # scan lets XLA order the sharded reductions differently: one element of 8192 reached 1.7%).
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-4)
    moved = max(moved, float(np.abs(np.asarray(b) - np.asarray(init)).max()))
  assert moved > 1e-3  # the comparison is between trained parameters, not two copies of the initial ones


def test_lora_reference_is_base_model_and_only_adapters_train(tiny_assets, cache):
  s, state = build(tiny_assets, cache, **PPO, **ONE_DEVICE, **{"model.lora.rank": 4, "model.lora.targets": ("c_attn",)})
  paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state.params)}
  assert paths and all(("lora_a" in p or "lora_b" in p or p.startswith("value")) for p in paths), paths
  assert any("lora_b" in p for p in paths) and any(p.startswith("value") for p in paths)
  after, _ = train_steps(s, fused(s, "rcfd"), state, 2)
  changed = {"/".join(map(str, p)) for (p, a), (_, b) in zip(nnx.to_flat_state(state.params),
                                                              nnx.to_flat_state(after.params))
             if not np.array_equal(np.asarray(a[...]), np.asarray(b[...]))}
  assert any("lora_b" in p for p in changed) and any(p.startswith("value") for p in changed), changed

  # Base weights of the trained policy are the checkpoint's, bit for bit.
  base = models.load_pretrained(str(tiny_assets / "policy"), task="causal_lm", mesh=s.mesh)
  base_flat = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
  policy_lm = s.parts.merge(after.params, s.frozen.base).lm
  trained_flat = nnx.to_flat_state(nnx.state(policy_lm, nnx.Not(nnx.LoRAParam)))
  assert len(base_flat) == len(list(trained_flat))
  for path, v in trained_flat:
    np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(base_flat[path][...]), err_msg=str(path))

  # Reference log-probs (adapters off) are the base model's; the policy's are not.
  b = s.batcher.gather(np.arange(N_MEASURE))
  ids, pmask = jnp.asarray(b.prompt_ids), jnp.asarray(b.prompt_mask, bool)
  tokens, tmask = jnp.asarray(b.demo_ids), jnp.asarray(b.demo_mask, bool)
  ref_logp, _ = jax.jit(make_scorer(s.parts, s.rewards))(after.params, s.frozen, ids, pmask, tokens, tmask)
  seq, seq_mask = jnp.concatenate([ids, tokens], 1), jnp.concatenate([pmask, tmask], 1)
  base_logits = base(seq, seq_mask, positions=L.positions_from_mask(seq_mask))
  base_logp = rl.token_logprobs(base_logits[:, ids.shape[1] - 1:-1].astype(jnp.float32), tokens)
  m = np.asarray(tmask)
  np.testing.assert_allclose(np.asarray(ref_logp)[m], np.asarray(base_logp)[m], rtol=1e-5, atol=1e-5)
  policy_logits, _ = s.parts.merge(after.params, s.frozen.base).completion_outputs(seq, seq_mask, ids.shape[1])
  policy_logp = np.asarray(rl.token_logprobs(policy_logits, tokens))
  assert np.abs(policy_logp - np.asarray(base_logp))[m].max() > 1e-4


_POISON = {"on": False}


@rewards.register("test_step_poisonable")
def _poisonable(prompts, completions, rows):
  del prompts, rows
  return [math.nan if _POISON["on"] else float(len(c)) for c in completions]


def test_non_finite_reward_skips_steps_then_stops_with_a_checkpoint(tiny_assets, cache, tmp_path, monkeypatch):
  wd = tmp_path / "run"
  config = tiny_config(tiny_assets, cache, **{
      "reward.sources": ("function",), "reward.function.name": "test_step_poisonable", "rl.objective": "max",
      "rl.max_bad_steps": 2, "total_steps": 10, "checkpoint.every_steps": 1, "checkpoint.keep": 10,
      "eval.every_steps": 100, **ONE_DEVICE})
  write = metrics.MetricsWriter.write

  def poison_after_step_2(self, step, m):
    write(self, step, m)
    _POISON["on"] = step >= 2

  monkeypatch.setattr(metrics.MetricsWriter, "write", poison_after_step_2)
  try:
    with pytest.raises(UserError, match="2 updates in a row had non-finite"):
      train.run(config, str(wd))
  finally:
    _POISON["on"] = False
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["skipped"], r["skipped_total"]) for r in rows] == [(1, 0, 0), (2, 0, 0), (3, 1, 1), (4, 1, 2)]
  assert rows[2]["reward_mean"] is None  # NaN is written as null

  def latest(like=None):
    ckpt = checkpoint.Checkpointer(wd / "checkpoints")
    try:
      if like is None:
        return ckpt.all_steps()
      return ckpt.restore_latest(like)
    finally:
      ckpt.close()

  assert latest() == [1, 2, 3]  # step 4 raised before its save; 3 was saved skipped
  s, init = build(tiny_assets, cache, **ONE_DEVICE, **{"reward.sources": ("function",),
                                                       "reward.function.name": "test_step_poisonable",
                                                       "rl.objective": "max"})
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), init)
  step3, st3, _ = latest(like)
  shutil.rmtree(wd / "checkpoints" / "3")
  step2, st2, _ = latest(like)
  shutil.rmtree(wd / "checkpoints" / "2")
  _, st1, _ = latest(like)
  assert (step3, int(st3.bad_steps), int(st3.skipped_total), int(st3.step)) == (3, 1, 1, 3)
  assert step2 == 2 and int(st2.bad_steps) == 0
  for a, b in zip(jax.tree.leaves((st3.params, st3.opt_state)), jax.tree.leaves((st2.params, st2.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(st2.params), jax.tree.leaves(st1.params)))


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_grad_accum_gives_the_whole_batch_update(reinforce, loss_agg):
  """Micro-batches of very different token counts: accumulation must weight them by their share."""
  s, state = reinforce
  sgd = optax.sgd(1.0)  # the parameter change is the gradient itself (Adam's first step is only its sign)
  state = state.replace(params=jax.tree.map(jnp.copy, state.params), opt_state=sgd.init(state.params))
  batch = bridge.device_batch(s, s.batcher, s.batcher.indices(0), s.demo_train)
  ro = jax.jit(make_rollout(s.parts, s.rewards, s.sc))(state, s.frozen, batch)
  r, n = ro.tokens.shape
  lengths = np.where(np.arange(r) < r // 2, 2, n)  # first micro-batch: 2 tokens per row; second: n
  ro = ro.replace(mask=jnp.asarray(np.arange(n)[None, :] < lengths[:, None]))
  out = {}
  for accum in (1, 2):
    sc = dataclasses.replace(s.sc, objective="max", grad_accum=accum, loss_agg=loss_agg)
    update = jax.jit(make_update(s.parts, s.rewards, sgd, sc))
    new, m = update(state, s.frozen, ro, None)
    out[accum] = (jax.device_get(new.params), float(m["loss"]))
  assert out[2][1] == pytest.approx(out[1][1], rel=1e-5, abs=1e-7)
  deltas = []
  for a, b, p0 in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[2][0]), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    deltas.append(float(np.abs(np.asarray(a) - np.asarray(p0)).max()))
  assert max(deltas) > 1e-4


def test_demo_reward_controller_moves_beta_by_the_batchs_gap_to_its_demonstrations(reinforce):
  """adaptive_kl_signal=demo_reward: the update moves beta as rl.demo_calibrated_kl says, on this batch."""
  s, state = reinforce
  batch = bridge.device_batch(s, s.batcher, s.batcher.indices(0), s.demo_train)
  ro = jax.jit(make_rollout(s.parts, s.rewards, s.sc))(state, s.frozen, batch)
  state = state.replace(beta=jnp.asarray(0.1, jnp.float32))
  sc = dataclasses.replace(s.sc, objective="kl", adaptive_kl=True, adaptive_kl_signal="demo_reward",
                           kl_horizon=640.0)
  update = jax.jit(make_update(s.parts, s.rewards, optax.sgd(1e-3), sc))
  reward_b = np.asarray(s.rewards.stack(ro.rewards)).sum(-1)
  n = reward_b.shape[0]
  spread = np.linspace(-1.0, 1.0, n, dtype=np.float32)[:, None]  # std 0.58: shifts of 0.05 are not clipped
  for shift, direction in [(-0.05, 1), (0.05, -1), (-3.0, 1), (3.0, -1)]:  # demonstrations below / above
    demo_bk = np.broadcast_to(reward_b.mean() + shift + spread, ro.demo_reward.shape).astype(np.float32)
    new, _ = update(state.replace(opt_state=optax.sgd(1e-3).init(state.params)), s.frozen,
                    ro.replace(demo_reward=jnp.asarray(demo_bk)), None)
    d = demo_bk.sum(-1)
    gap = (reward_b.mean() - d.mean()) / d.std()
    want = 0.1 * (1 + np.clip(gap, -0.2, 0.2) * n / 640.0)
    np.testing.assert_allclose(float(new.beta), want, rtol=1e-4)
    assert np.sign(float(new.beta) - 0.1) == direction


def test_bfloat16_lora_with_accumulation_trains(tiny_assets, cache):
  """bf16 weights: gradients accumulate in float32 and come back in the parameters' dtype."""
  s, state = build(tiny_assets, cache, **{"model.dtype": "bfloat16", "model.lora.rank": 4,
                                         "model.lora.targets": ("c_attn",), "optim.grad_accum": 2},
                   **ONE_DEVICE)
  before = jax.tree.map(np.asarray, state.params)
  after, logs = train_steps(s, train.compile_steps(s).fused, state, 1)
  assert all(np.isfinite(v) for v in logs[0].values())
  assert logs[0]["skipped"] == 0
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()),
                       after.params, before)
  assert max(jax.tree.leaves(moved)) > 0
  assert {x.dtype for x in jax.tree.leaves(after.params)} == {x.dtype for x in jax.tree.leaves(before)}


def test_reference_forward_runs_only_on_logged_steps_unless_the_update_reads_it(reinforce):
  """Reward `length` and objective max: pi_0's log-probs feed only the kl metric."""
  s, state = reinforce
  batch = bridge.device_batch(s, s.batcher, s.batcher.indices(0), s.demo_train)
  sc = dataclasses.replace(s.sc, objective="max", metrics_every=3, total_steps=5)
  logged_only = jax.jit(make_rollout(s.parts, s.rewards, sc))
  every_step = jax.jit(make_rollout(s.parts, s.rewards, dataclasses.replace(sc, metrics_every=1)))
  kl_objective = jax.jit(make_rollout(s.parts, s.rewards, dataclasses.replace(sc, objective="kl")))
  for step, logged in ((0, False), (2, True), (3, False), (4, True)):  # steps 3 and 5 (the last) log
    st = state.replace(step=jnp.asarray(step, jnp.int32))
    ro, ref = logged_only(st, s.frozen, batch), every_step(st, s.frozen, batch)
    np.testing.assert_array_equal(np.asarray(ro.tokens), np.asarray(ref.tokens))
    assert np.isfinite(np.asarray(ref.ref_logp)).all()
    if logged:
      np.testing.assert_array_equal(np.asarray(ro.ref_logp), np.asarray(ref.ref_logp))
    else:
      assert np.isnan(np.asarray(ro.ref_logp)).all(), step
    np.testing.assert_array_equal(np.asarray(kl_objective(st, s.frozen, batch).ref_logp),
                                  np.asarray(ref.ref_logp))
