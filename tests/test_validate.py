"""validate: the evaluation rollout's rows and the evaluation's metrics, against direct computations.

One tiny setup (one device, 4 prompts x 2 samples of 8 tokens per batch) and
one compiled evaluation rollout serve every test. The rewards are the
completion length (in the step) and a host function of the prompt and the
decoded completion, so each reward can be recomputed from the returned rows.
The demonstration rewards are made up: scoring them is rcfd_jax.demos's job.
"""

import dataclasses
import json
import zlib

import jax
import numpy as np
import pytest

from conftest import load_config
from rcfd_jax import rewards, train, validate

NUM_PROMPTS, K = 6, 2  # 6 prompts: a batch of 4 and a second one that wraps around


@rewards.register("test_validate_prompt_and_completion")
def prompt_and_completion(prompts, completions, rows):
  """Names the prompt (a checksum, in the thousands) and the completion (its length in characters)."""
  del rows
  return [1000.0 * (zlib.crc32(p.encode()) % 1000) + len(c) for p, c in zip(prompts, completions)]


@pytest.fixture(scope="module")
def generated(tiny_assets, tmp_path_factory):
  """(setup, initial state, generate's output for NUM_PROMPTS prompts)."""
  c = load_config(f"tiny:{tiny_assets}", {
      "mesh.shape": (1, 1, 1), "mesh.devices": 1, "reward.cache_dir": str(tmp_path_factory.mktemp("cache")),
      "reward.sources": ("length", "function"), "reward.function.name": "test_validate_prompt_and_completion",
      "rl.objective": "max", "rollout.prompts_per_step": 4, "rollout.samples_per_prompt": K,
      "rollout.max_new_tokens": 8, "data.demo_max_tokens": 8, "data.max_examples": 64,
      "data.validation_size": 8, "eval.samples_per_prompt": K, "eval.num_prompts": NUM_PROMPTS})
  s, state = train.setup(c)
  s.demo_val = np.random.default_rng(0).normal(size=(len(s.val), 2)).astype(np.float32)
  return s, state, validate.generate(s, s.steps, state, s.val, s.demo_val, NUM_PROMPTS)


def _decode(s, tokens, mask):
  return s.tokenizer.decode(tokens[mask], skip_special_tokens=True)


def test_generate_returns_k_completions_for_each_of_the_first_prompts(generated):
  s, _, g = generated
  assert g["prompts"] == s.val.prompt_texts[:NUM_PROMPTS]
  np.testing.assert_array_equal(g["demo"], s.demo_val[:NUM_PROMPTS])
  assert g["rewards"].shape == (NUM_PROMPTS, K, 2)
  for name in ("tokens", "mask", "logp", "ref_logp"):
    assert g[name].shape == (NUM_PROMPTS, K, 8), name
  # k samples, not k copies of one.
  assert any(not np.array_equal(g["tokens"][i, 0], g["tokens"][i, 1]) for i in range(NUM_PROMPTS))


def test_generate_rewards_are_those_of_each_row_prompt_and_completion(generated):
  s, _, g = generated
  mask = g["mask"].astype(bool)
  np.testing.assert_array_equal(g["rewards"][..., 0], -mask.sum(-1))  # length: -|y|
  want = np.array([[prompt_and_completion([s.val.prompt_texts[i]], [_decode(s, g["tokens"][i, j], mask[i, j])],
                                          None)[0] for j in range(K)] for i in range(NUM_PROMPTS)])
  assert len(set((want // 1000).ravel())) > 1  # the prompts are told apart
  np.testing.assert_array_equal(g["rewards"][..., 1], want)


def test_generate_stops_at_the_end_of_the_dataset_and_is_deterministic(generated):
  s, state, g = generated
  every = validate.generate(s, s.steps, state, s.val, s.demo_val, 100)
  assert len(s.val) < 100 and every["prompts"] == s.val.prompt_texts and len(every["tokens"]) == len(s.val)
  # The first batch (prompts 0-3) is the same rollout both times.
  for name in ("tokens", "mask", "rewards", "logp"):
    np.testing.assert_array_equal(every[name][:4], g[name][:4], err_msg=name)


def test_generate_gives_every_batch_a_sampling_key_of_its_own(generated):
  """One key for every batch would give row j of each batch the same random numbers: correlated prompts."""
  s, state, g = generated
  seen = []

  def recording(st, frozen, batch):
    seen.append(np.asarray(st.rng))
    return s.steps.eval_rollout(st, frozen, batch)

  again = validate.generate(s, dataclasses.replace(s.steps, eval_rollout=recording), state, s.val, s.demo_val,
                            NUM_PROMPTS)
  base = jax.random.wrap_key_data(state.rng)
  want = [np.asarray(jax.random.key_data(jax.random.fold_in(base, i))) for i in range(2)]
  assert len(seen) == 2 and not np.array_equal(seen[0], seen[1])
  for got, w in zip(seen, want):
    np.testing.assert_array_equal(got, w)
  np.testing.assert_array_equal(again["tokens"], g["tokens"])  # the same keys as generate's own


def test_run_reports_the_first_samples_and_the_groups_and_writes_them(generated, tmp_path):
  s, state, g = generated
  result = validate.run(s, s.steps, state, tmp_path, 7)
  r0, r1, demo = g["rewards"][:, 0, 0], g["rewards"][:, 0, 1], g["demo"]
  mask = g["mask"][:, 0].astype(bool)
  logp, ref_logp = g["logp"][:, 0], g["ref_logp"][:, 0]
  approx = lambda x: pytest.approx(float(x), rel=1e-5, abs=1e-6)
  # Per-sample metrics read each prompt's first sample; the first reward source is the headline.
  assert result["reward_mean"] == approx(r0.mean()) == approx(-mask.sum(-1).mean())
  assert result["length_mean"] == approx(mask.sum(-1).mean())
  assert result["reward_mean/function"] == approx(r1.mean())
  assert result["demo_reward_mean"] == approx(demo[:, 0].mean())
  assert result["demo_reward_mean/function"] == approx(demo[:, 1].mean())
  assert result["rcfd_reward_mean"] == approx(-np.mean((r0 - demo[:, 0]) ** 2))
  kl = np.where(mask, logp - ref_logp, 0.0).sum(-1).mean()
  assert result["kl"] == approx(kl) and abs(result["kl"]) < 1e-3  # the initial policy is pi_0
  completions = [list(t[m]) for t, m in zip(g["tokens"][:, 0], mask)]
  unigrams = [t for c in completions for t in c]
  assert result["distinct_1"] == approx(len(set(unigrams)) / len(unigrams))
  assert result["num_samples"] == NUM_PROMPTS
  # The entropy estimate and the group monitors read all K samples.
  all_mask = g["mask"].astype(bool)
  assert result["entropy"] == approx(-g["logp"][all_mask].mean())
  assert result["within_prompt_std"] == approx(np.sqrt(g["rewards"][..., 0].var(axis=1, ddof=1).mean()))
  prompt_mean = g["rewards"][..., 0].mean(axis=1)
  corr = np.corrcoef(prompt_mean, demo[:, 0])[0, 1] if prompt_mean.std() > 0 else 0.0
  assert result["prompt_corr"] == approx(corr)
  assert result["samples"] == [{"prompt": p, "completion": _decode(s, t, m)}
                               for p, t, m in zip(g["prompts"][:4], g["tokens"][:4, 0], mask[:4])]
  assert result["step"] == 7

  out = tmp_path / "eval"
  on_disk = json.loads((out / "step_7.json").read_text())
  for key, value in result.items():
    assert on_disk[key] == (approx(value) if isinstance(value, float) else value), key
  counts = mask.sum(0)
  curve = np.where(mask, ref_logp, 0.0).sum(0) / np.maximum(counts, 1)
  assert [None if c == 0 else approx(v) for v, c in zip(curve, counts)] == on_disk["logprob_by_position"]
  for name in ("step_7_rewards.png", "step_7_calibration.png", "step_7_logprob.png", "monitors.png"):
    assert (out / name).stat().st_size > 0, name
