"""bridge.host_rewards: decode the rollout and score it with host-side rewards."""

import types

import numpy as np

from conftest import load_config
from rcfd_jax import bridge, rewards, train
from rcfd_jax.reproduce import corpus, tiny


def test_host_rewards_passes_prompts_completions_and_rows():
  tok = tiny.train_tokenizer(corpus.pretraining_texts(100, 0), 400)
  seen = {}

  def fn(prompts, completions, rows):
    seen.update(prompts=prompts, completions=completions, rows=rows)
    return rewards.sentiment_words(prompts, completions, rows)

  comp = tok(["a good film", "bad bad"], padding="max_length", max_length=8, return_tensors="np")
  ro = types.SimpleNamespace(tokens=comp["input_ids"], mask=comp["attention_mask"].astype(bool))
  ds = types.SimpleNamespace(prompt_texts=["p0", "p1"], extras=[{"id": 0}, {"id": 1}])
  s = types.SimpleNamespace(tokenizer=tok, sc=types.SimpleNamespace(samples_per_prompt=1), train=ds,
                            rewards=rewards.Rewards([rewards.Source("function", "function")], None, fn))
  out = bridge.host_rewards(s, ro, np.array([1, 0]))
  np.testing.assert_array_equal(out["function"], [1.0, -2.0])
  assert seen["prompts"] == ["p1", "p0"] and seen["rows"] == [{"id": 1}, {"id": 0}]
  assert seen["completions"] == ["a good film", "bad bad"]


def test_evaluation_scores_host_rewards_per_validation_prompt(tiny_assets, tmp_path):
  """The eval rollout goes through the same bridge: one reward per validation prompt, on the decoded text."""
  import json

  c = load_config(f"tiny:{tiny_assets}", {
      "total_steps": 1, "eval.every_steps": 1, "checkpoint.every_steps": 1,
      "reward.sources": ("function",), "reward.function.name": "sentiment_words",
      "reward.cache_dir": str(tmp_path / "cache"), "rl.objective": "max", "mesh.shape": (1, 1, 1),
      "mesh.devices": 1})
  train.run(c, str(tmp_path / "run"))
  result = json.loads((tmp_path / "run" / "eval" / "step_1.json").read_text())
  assert result["num_samples"] == c.eval.num_prompts
  texts = [x["prompt"] + x["completion"] for x in result["samples"]]
  assert all(isinstance(t, str) for t in texts) and len(texts) == 4
  assert result["reward_mean"] == result["reward_mean/function"]
