"""Evaluation metrics as pure NumPy functions, and the files one evaluation writes.

The paper's headline metric is Alignment A = KL(rho_d || rho_pi): how far the
distribution of rewards the policy's generations get is from the
distribution the demonstrations get, on the same validation prompts. 0 means
the policy is rewarded exactly like the demonstrations, neither less (under
optimised) nor more (reward over-optimisation).

Everything here runs on host arrays after the device work is done, so it is
plain NumPy and tested against loops.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from rcfd_jax import files

EVAL_SUBDIR = "eval"

# Probability mass added to every histogram bin before the KL. Without it a
# bin where the demonstrations have mass and the policy has none makes A
# infinite, which happens at every evaluation with a few hundred samples. A
# tiny floor keeps A finite and bounded by about log(1 / eps) = 13.8 for
# disjoint samples, while changing A by O(bins * eps) otherwise.
ALIGNMENT_EPS = 1e-6


def _as_1d(name: str, x: Any) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64).reshape(-1)
  if x.size == 0:
    raise ValueError(f"{name} is empty")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} has non-finite values")
  return x


def reward_bins(demo_rewards: Any, policy_rewards: Any, bins: int = 20) -> np.ndarray:
  """Bin edges shared by both samples: `bins` equal bins over their joint range.

  Shared edges make the two histograms comparable bin by bin; spanning both
  samples means no reward falls outside. When every value is equal NumPy
  widens the range to value +- 0.5.
  """
  both = np.concatenate([_as_1d("demo_rewards", demo_rewards), _as_1d("policy_rewards", policy_rewards)])
  return np.histogram_bin_edges(both, bins=bins)


def _histogram(x: np.ndarray, edges: np.ndarray, eps: float) -> np.ndarray:
  counts, _ = np.histogram(x, bins=edges)
  p = counts / counts.sum()
  return (p + eps) / (1.0 + eps * len(p))


def alignment(demo_rewards: Any, policy_rewards: Any, bins: int = 20, eps: float = ALIGNMENT_EPS) -> float:
  """Alignment A = KL(rho_d || rho_pi) between reward histograms (0 is perfect).

  Args:
    demo_rewards: [N] rewards of the demonstrations.
    policy_rewards: [M] rewards of the policy's generations (M may differ).
    bins: number of equal-width bins over the range of both samples.
    eps: probability added to each bin of both histograms, which are then
      renormalised (see ALIGNMENT_EPS).

  Returns:
    The KL divergence in nats; exactly 0 for identical samples.
  """
  d = _as_1d("demo_rewards", demo_rewards)
  p = _as_1d("policy_rewards", policy_rewards)
  edges = reward_bins(d, p, bins)
  rho_d = _histogram(d, edges, eps)
  rho_pi = _histogram(p, edges, eps)
  return float(np.sum(rho_d * (np.log(rho_d) - np.log(rho_pi))))


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
  """Unique n-grams over all n-grams in a set of token sequences (diversity).

  n-grams are counted within each sequence, never across two; a sequence
  shorter than n contributes none. Returns 0 when there are no n-grams.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  unique: set[tuple[int, ...]] = set()
  total = 0
  for seq in sequences:
    seq = tuple(int(t) for t in seq)
    grams = [seq[i:i + n] for i in range(len(seq) - n + 1)]
    unique.update(grams)
    total += len(grams)
  return len(unique) / total if total else 0.0


def logprob_by_position(logp_bt: Any, mask_bt: Any) -> np.ndarray:
  """Mean log-likelihood of the generated token at each position ([T]).

  The paper's Figure 2: a reward-hacking policy drifts into text the
  reference model finds unlikely, and that shows as a falling curve. Only
  tokens where mask_bt is true count; a position no sequence reaches is NaN.
  """
  logp = np.asarray(logp_bt, dtype=np.float64)
  mask = np.asarray(mask_bt).astype(bool)
  if logp.shape != mask.shape or logp.ndim != 2:
    raise ValueError(f"logp_bt {logp.shape} and mask_bt {mask.shape} must be the same [batch, time] shape")
  counts = mask.sum(axis=0)
  sums = np.where(mask, logp, 0.0).sum(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def summarize(rewards: Mapping[str, Any], demo_rewards: Mapping[str, Any],
              completions: Sequence[Sequence[int]], seq_kl: Any, bins: int = 20) -> dict[str, float]:
  """The evaluation dict: rewards, Alignment A, diversity, length, KL.

  Args:
    rewards: reward source name -> [N] rewards of the policy's completions.
      The first source is the primary one: its values are also reported
      under the plain keys reward_mean, demo_reward_mean, demo_reward_std,
      alignment (the paper's headline numbers) and rcfd_reward_mean.
    demo_rewards: the same names -> [N] rewards of the demonstrations of
      the same prompts, in the same order.
    completions: N generated token sequences (padding removed).
    seq_kl: [N] per-sequence KL(pi || pi_0) estimates.
    bins: histogram bins for Alignment A.

  Returns:
    Flat dict of floats, also keyed "<metric>/<source>" for every source.
  """
  if not rewards:
    raise ValueError("summarize needs at least one reward source")
  missing = set(rewards) - set(demo_rewards)
  if missing:
    raise ValueError(f"no demonstration rewards for reward sources {sorted(missing)}")
  result: dict[str, float] = {}
  for i, name in enumerate(rewards):
    policy = _as_1d(f"rewards[{name!r}]", rewards[name])
    demo = _as_1d(f"demo_rewards[{name!r}]", demo_rewards[name])
    if policy.shape != demo.shape:
      raise ValueError(f"rewards[{name!r}] has {policy.size} values and demo_rewards[{name!r}] "
                       f"{demo.size}: pass one demonstration reward per completion, in prompt order")
    source = {
        "reward_mean": float(policy.mean()),
        "demo_reward_mean": float(demo.mean()),
        "demo_reward_std": float(demo.std()),
        "alignment": alignment(demo, policy, bins=bins),
        # RCfD's own reward, -(R(x, y) - R(x, y_d))^2, averaged: the value the paper's
        # checkpoint selection maximizes for an RCfD run.
        "rcfd_reward_mean": float(-np.mean((policy - demo) ** 2)),
    }
    if i == 0:
      result.update(source)
    result.update({f"{key}/{name}": value for key, value in source.items()})
  lengths = np.array([len(c) for c in completions], dtype=np.float64)
  result["distinct_1"] = distinct_n(completions, 1)
  result["distinct_2"] = distinct_n(completions, 2)
  result["length_mean"] = float(lengths.mean()) if lengths.size else 0.0
  result["kl"] = float(np.mean(np.asarray(seq_kl, dtype=np.float64)))
  result["num_samples"] = len(completions)
  return result


def group_summary(rewards_pg: Mapping[str, Any], demo_rewards_p: Mapping[str, Any],
                  tol: float = 1e-6) -> dict[str, float]:
  """Calibration and collapse monitors from G samples per validation prompt.

  Args:
    rewards_pg: reward source name -> [P, G] rewards of G completions per prompt.
    demo_rewards_p: the same names -> [P] rewards of each prompt's demonstration.
    tol: two rewards closer than tol * (1 + |mean|) count as the same score.

  Returns, per source as "<metric>/<source>" and for the first source also
  under the plain key:
    prompt_corr: corr over prompts of the mean reward of the prompt's
      completions with R_d. How far the policy's reward follows each
      demonstration's (0: it only matches their distribution as a whole).
    with G >= 2 also
    within_prompt_std: root mean within-prompt variance (ddof 1);
    tied_frac: fraction of prompts whose G completions all score the same;
    rcfd_group_reward_mean: mean over prompts of the unbiased estimate of
      -(E[R|x] - R_d)^2, the value the rcfd_group objective climbs.
  """
  result: dict[str, float] = {}
  for i, name in enumerate(rewards_pg):
    r = np.asarray(rewards_pg[name], dtype=np.float64)
    d = _as_1d(f"demo_rewards_p[{name!r}]", demo_rewards_p[name])
    if r.ndim != 2 or r.shape[0] != d.size:
      raise ValueError(f"rewards_pg[{name!r}] has shape {r.shape}; want [{d.size}, G]")
    mean_p = r.mean(axis=1)
    both_vary = mean_p.std() > 0 and d.std() > 0
    source = {"prompt_corr": float(np.corrcoef(mean_p, d)[0, 1]) if both_vary else 0.0}
    g = r.shape[1]
    if g >= 2:
      var_p = r.var(axis=1, ddof=1)
      tied_p = r.max(axis=1) - r.min(axis=1) <= tol * (1.0 + np.abs(mean_p))
      source.update(within_prompt_std=float(np.sqrt(var_p.mean())), tied_frac=float(tied_p.mean()),
                    rcfd_group_reward_mean=float(-np.mean((mean_p - d) ** 2 - var_p / g)))
    if i == 0:
      result.update(source)
    result.update({f"{key}/{name}": value for key, value in source.items()})
  return result


def _jsonable(x: Any) -> Any:
  """Plain JSON values: numpy scalars/arrays to Python, non-finite to null."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, np.generic):
    return _jsonable(x.item())
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def _save_figure(fig, path: str) -> None:
  files.write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)


def _reward_histogram(policy_rewards, demo_rewards, bins: int, step: int, path: str) -> None:
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  # Figure without pyplot renders with Agg and touches no global backend
  # state, so it is safe in a training process that never shows windows.
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  edges = reward_bins(demo_rewards, policy_rewards, bins)
  ax.hist(np.asarray(demo_rewards).reshape(-1), bins=edges, density=True, alpha=0.5, label="demonstrations")
  ax.hist(np.asarray(policy_rewards).reshape(-1), bins=edges, density=True, alpha=0.5, label="policy")
  ax.set_xlabel("reward")
  ax.set_ylabel("density")
  ax.set_title(f"Rewards at step {step}")
  ax.legend()
  _save_figure(fig, path)


def _logprob_plot(curve: np.ndarray, step: int, path: str) -> None:
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  positions = np.arange(len(curve))
  keep = np.isfinite(curve)
  ax.plot(positions[keep], curve[keep])
  ax.set_xlabel("generation position")
  ax.set_ylabel("mean log-likelihood")
  ax.set_title(f"Log-likelihood by position at step {step}")
  _save_figure(fig, path)


def _calibration_plot(prompt_mean_rewards, demo_rewards, step: int, path: str) -> None:
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(5, 5))
  ax = fig.add_subplot()
  d, m = np.asarray(demo_rewards).reshape(-1), np.asarray(prompt_mean_rewards).reshape(-1)
  ax.scatter(d, m, s=6, alpha=0.5)
  lo, hi = float(min(d.min(), m.min())), float(max(d.max(), m.max()))
  ax.plot([lo, hi], [lo, hi], color="k", lw=1, ls="--", label="calibrated per prompt")
  ax.axhline(float(d.mean()), color="gray", lw=1, ls=":", label="demonstrations' mean")
  ax.set_xlabel("demonstration reward R_d")
  ax.set_ylabel("mean reward of the prompt's completions")
  ax.set_title(f"Per-prompt calibration at step {step}")
  ax.legend(fontsize=8)
  _save_figure(fig, path)


MONITORS = ("entropy", "within_prompt_std", "tied_frac", "prompt_corr")


def _monitor_plot(out_dir: str, path: str) -> None:
  """The collapse monitors of every evaluation so far, against the step."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  records = []
  for name in os.listdir(out_dir):
    if name.startswith("step_") and name.endswith(".json"):
      with open(os.path.join(out_dir, name), encoding="utf-8") as f:
        records.append(json.load(f))
  records.sort(key=lambda r: r["step"])
  fig = Figure(figsize=(4 * len(MONITORS), 3.5))
  for ax, key in zip(fig.subplots(1, len(MONITORS)), MONITORS):
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if points:
      ax.plot(*zip(*points), marker="o")
    ax.set_title(key)
    ax.set_xlabel("step")
  fig.tight_layout()
  _save_figure(fig, path)


def write_eval(workdir: str | os.PathLike, step: int, result: Mapping[str, Any], *,
               logp_bt: Any = None, mask_bt: Any = None,
               policy_rewards: Any = None, demo_rewards: Any = None, bins: int = 20,
               prompt_mean_rewards: Any = None) -> list[str]:
  """Writes DIR/eval/step_N.json and the plots whose inputs are given.

  Call it on one process only. Plots: step_N_rewards.png (policy vs
  demonstration reward histograms, on the bins Alignment A uses) when both
  reward arrays are given; step_N_calibration.png (each prompt's mean reward
  against its R_d) when prompt_mean_rewards and demo_rewards are;
  step_N_logprob.png (logprob_by_position) when logp_bt and mask_bt are; and
  monitors.png, the collapse monitors (MONITORS) of every evaluation so far.
  The curve is also stored in the JSON under "logprob_by_position". Every
  file is written to a temporary name and renamed, so a crash never leaves a
  truncated file.

  Returns:
    The paths written, JSON first.
  """
  out_dir = os.path.join(os.fspath(workdir), EVAL_SUBDIR)
  os.makedirs(out_dir, exist_ok=True)
  record = dict(result)
  record["step"] = int(step)
  paths = []
  curve = None
  if logp_bt is not None and mask_bt is not None:
    curve = logprob_by_position(logp_bt, mask_bt)
    record["logprob_by_position"] = curve

  json_path = os.path.join(out_dir, f"step_{step}.json")

  def write_json(f):
    json.dump(_jsonable(record), f, indent=2)
    f.write("\n")

  files.write_atomically(json_path, write_json)
  paths.append(json_path)
  if policy_rewards is not None and demo_rewards is not None:
    path = os.path.join(out_dir, f"step_{step}_rewards.png")
    _reward_histogram(policy_rewards, demo_rewards, bins, step, path)
    paths.append(path)
  if prompt_mean_rewards is not None and demo_rewards is not None:
    path = os.path.join(out_dir, f"step_{step}_calibration.png")
    _calibration_plot(prompt_mean_rewards, demo_rewards, step, path)
    paths.append(path)
  if curve is not None:
    path = os.path.join(out_dir, f"step_{step}_logprob.png")
    _logprob_plot(curve, step, path)
    paths.append(path)
  path = os.path.join(out_dir, "monitors.png")
  _monitor_plot(out_dir, path)
  paths.append(path)
  return paths
