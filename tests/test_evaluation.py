"""Evaluation metrics against independent NumPy references and hand counts."""

import json
import math
import os

import numpy as np
import pytest

from rcfd_jax import evaluation


def _reference_alignment(demo, policy, bins, eps):
  """KL(rho_d || rho_pi) written out bin by bin, with its own binning."""
  lo = min(min(demo), min(policy))
  hi = max(max(demo), max(policy))
  width = (hi - lo) / bins
  counts_d = [0] * bins
  counts_p = [0] * bins
  for values, counts in ((demo, counts_d), (policy, counts_p)):
    for v in values:
      counts[min(int((v - lo) / width), bins - 1)] += 1  # the last bin is closed
  kl = 0.0
  for cd, cp in zip(counts_d, counts_p):
    pd = (cd / len(demo) + eps) / (1 + bins * eps)
    pp = (cp / len(policy) + eps) / (1 + bins * eps)
    kl += pd * math.log(pd / pp)
  return kl


@pytest.mark.parametrize("bins", [5, 20])
def test_alignment_matches_reference(bins):
  rng = np.random.default_rng(0)
  demo = rng.normal(0.0, 1.0, 300)
  policy = rng.normal(0.7, 0.5, 200)
  got = evaluation.alignment(demo, policy, bins=bins)
  want = _reference_alignment(list(demo), list(policy), bins, evaluation.ALIGNMENT_EPS)
  assert got == pytest.approx(want, rel=1e-9)


def test_alignment_is_zero_for_identical_samples_and_grows_with_shift():
  rng = np.random.default_rng(1)
  demo = rng.normal(size=500)
  assert evaluation.alignment(demo, demo.copy()) == pytest.approx(0.0, abs=1e-12)
  values = [evaluation.alignment(demo, demo + shift) for shift in (0.25, 0.5, 1.0, 2.0)]
  assert all(a < b for a, b in zip(values, values[1:])), values
  assert values[0] > 0


def test_alignment_is_finite_for_disjoint_and_constant_samples():
  disjoint = evaluation.alignment([0.0, 0.1], [5.0, 5.1], bins=10)
  assert math.isfinite(disjoint) and disjoint < -math.log(evaluation.ALIGNMENT_EPS) + 1
  assert evaluation.alignment([1.0, 1.0], [1.0, 1.0]) == 0.0
  with pytest.raises(ValueError, match="non-finite"):
    evaluation.alignment([1.0, np.nan], [1.0])


def test_distinct_n_hand_counts():
  seqs = [[1, 2, 3, 1, 2], [1, 2], [7]]
  # unigrams: 1,2,3,1,2 | 1,2 | 7 -> 8 total, unique {1,2,3,7}
  assert evaluation.distinct_n(seqs, 1) == 4 / 8
  # bigrams: (1,2),(2,3),(3,1),(1,2) | (1,2) | none -> 5 total, unique 3
  assert evaluation.distinct_n(seqs, 2) == 3 / 5
  # trigrams: (1,2,3),(2,3,1),(3,1,2) -> all unique
  assert evaluation.distinct_n(seqs, 3) == 1.0
  # n-grams never span two sequences.
  assert evaluation.distinct_n([[1], [2]], 2) == 0.0
  assert evaluation.distinct_n([np.array([5, 5, 5, 5])], 2) == 1 / 3


def test_logprob_by_position_matches_loops():
  rng = np.random.default_rng(2)
  logp = rng.normal(size=(4, 6))
  lengths = [6, 3, 1, 0]
  mask = np.arange(6)[None, :] < np.array(lengths)[:, None]
  got = evaluation.logprob_by_position(logp, mask)
  for t in range(6):
    vals = [logp[b, t] for b in range(4) if mask[b, t]]
    assert got[t] == pytest.approx(sum(vals) / len(vals))
  # No sequence reaches the last positions when every length is short.
  short = evaluation.logprob_by_position(logp, np.arange(6)[None, :] < np.array([2, 1, 0, 0])[:, None])
  assert np.isnan(short[2:]).all() and np.isfinite(short[:2]).all()


def test_summarize_keys_and_values():
  rewards = {"rm": np.array([1.0, 2.0, 3.0]), "length": np.array([3.0, 2.0, 1.0])}
  demo = {"rm": np.array([2.0, 2.0, 2.0]), "length": np.array([3.0, 2.0, 1.0])}
  completions = [[1, 2, 3], [1, 2], [4]]
  result = evaluation.summarize(rewards, demo, completions, seq_kl=np.array([0.1, 0.2, 0.3]), bins=4)
  assert result["reward_mean"] == 2.0 and result["reward_mean/length"] == 2.0
  assert result["demo_reward_mean"] == 2.0 and result["demo_reward_std"] == 0.0
  assert result["alignment"] == result["alignment/rm"] > 0
  assert result["alignment/length"] == pytest.approx(0.0, abs=1e-12)
  assert result["rcfd_reward_mean"] == pytest.approx(-2 / 3) and result["rcfd_reward_mean/length"] == 0.0
  assert result["distinct_1"] == 4 / 6 and result["distinct_2"] == 2 / 3
  assert result["length_mean"] == 2.0 and result["kl"] == pytest.approx(0.2)
  with pytest.raises(ValueError, match="demonstration rewards"):
    evaluation.summarize({"x": [1.0]}, {}, [[1]], [0.0])
  with pytest.raises(ValueError, match="one demonstration reward per completion"):
    evaluation.summarize({"x": [1.0, 2.0]}, {"x": [1.0]}, [[1], [2]], [0.0, 0.0])


def test_write_eval_writes_json_and_plots(tmp_path):
  rng = np.random.default_rng(3)
  result = evaluation.summarize({"rm": rng.normal(size=50)}, {"rm": rng.normal(size=50)},
                                [[1, 2, 3]] * 50, seq_kl=np.zeros(50))
  result["samples"] = [{"prompt": "p", "completion": "c"}]
  result["nan_metric"] = np.float32("nan")
  mask = np.ones((50, 8), bool)
  mask[:, 6:] = False
  paths = evaluation.write_eval(tmp_path, 7, result, logp_bt=rng.normal(size=(50, 8)), mask_bt=mask,
                                policy_rewards=rng.normal(size=50), demo_rewards=rng.normal(size=50))
  eval_dir = tmp_path / evaluation.EVAL_SUBDIR
  assert sorted(os.listdir(eval_dir)) == ["monitors.png", "step_7.json", "step_7_logprob.png",
                                          "step_7_rewards.png"]
  assert paths[0] == str(eval_dir / "step_7.json")
  loaded = json.loads((eval_dir / "step_7.json").read_text())
  assert loaded["step"] == 7 and loaded["alignment"] == pytest.approx(result["alignment"])
  assert loaded["nan_metric"] is None and loaded["samples"][0]["prompt"] == "p"
  assert len(loaded["logprob_by_position"]) == 8 and loaded["logprob_by_position"][7] is None
  for png in ("step_7_logprob.png", "step_7_rewards.png"):
    assert (eval_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_group_summary_matches_loops():
  rng = np.random.default_rng(4)
  r = rng.normal(size=(30, 3))
  r[0] = 1.5  # one prompt whose samples all score the same
  d = r.mean(1) + rng.normal(size=30)
  out = evaluation.group_summary({"rm": r, "len": r * 2}, {"rm": d, "len": d * 2})
  means = [sum(row) / 3 for row in r]
  var = [sum((x - m) ** 2 for x in row) / 2 for row, m in zip(r, means)]
  assert out["prompt_corr"] == pytest.approx(np.corrcoef(means, d)[0, 1])
  assert out["within_prompt_std"] == pytest.approx(np.sqrt(np.mean(var)))
  assert out["tied_frac"] == pytest.approx(1 / 30)
  want = -np.mean([(m - di) ** 2 - v / 3 for m, di, v in zip(means, d, var)])
  assert out["rcfd_group_reward_mean"] == pytest.approx(want)
  assert out["prompt_corr/len"] == pytest.approx(out["prompt_corr"])
  assert out["rcfd_group_reward_mean/len"] == pytest.approx(4 * want)
  one = evaluation.group_summary({"rm": r[:, :1]}, {"rm": d})  # one sample: correlation only
  assert set(one) == {"prompt_corr", "prompt_corr/rm"}
  assert evaluation.group_summary({"rm": np.ones((4, 2))}, {"rm": np.arange(4.0)})["prompt_corr"] == 0.0
  with pytest.raises(ValueError, match="want"):
    evaluation.group_summary({"rm": r[:5]}, {"rm": d})


def test_rcfd_group_value_is_unbiased():
  """Rewards ~ N(mu, 1), 3 per prompt: the mean estimate is -(mu - R_d)^2, not -(mu - R_d)^2 - 1/3."""
  rng = np.random.default_rng(22)
  for mu, demo in ((1.5, 0.5), (-1.0, -1.0)):
    r = mu + rng.normal(size=(20000, 3))
    d = np.full(20000, demo) + 1e-9 * rng.normal(size=20000)  # a constant R_d has no correlation to report
    got = evaluation.group_summary({"rm": r}, {"rm": d})["rcfd_group_reward_mean"]
    assert got == pytest.approx(-(mu - demo) ** 2, abs=0.03)
