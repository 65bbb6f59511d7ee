"""Evaluation on validation prompts: sample, score, compare with the demonstrations.

Writes DIR/eval/step_N.json (reward per source, the demonstrations' mean,
Alignment A, RCfD's reward -(R - R_d)^2, distinct-1/2, length, KL to pi_0,
the calibration and collapse monitors of evaluation.group_summary, a few
samples) and PNG plots (reward histogram of policy vs demonstrations;
log-likelihood by position; per-prompt mean reward against R_d).
The rollout used here is the training rollout compiled once more with
eval.samples_per_prompt samples per prompt and the evaluation temperature
(the "eval_rollout" program, rcfd_jax.programs), each batch of prompts with
the step's key folded with the batch's index. The per-sample metrics (reward, A, distinct-n, length,
KL) read the first sample of each prompt, so they do not depend on
eval.samples_per_prompt; the group monitors read all of them.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from rcfd_jax import batching, bridge, distributed, evaluation, rl
from rcfd_jax.step import fold_rng


def generate(s, steps, state, ds, demo: np.ndarray, num_prompts: int) -> dict[str, np.ndarray | list]:
  """Completions and rewards for the first num_prompts prompts of `ds`, batch by batch (steps: train.Steps).

  Arrays are [n, k, ...]: k = eval.samples_per_prompt completions per prompt;
  "demo" is [n, K].
  """
  b, k = s.config.rollout.prompts_per_step, s.config.eval.samples_per_prompt
  n = min(num_prompts, len(ds))
  batcher = batching.Batcher(ds, b, s.config.data, s.tokenizer.pad_token_id)
  out = {name: [] for name in ("rewards", "tokens", "mask", "logp", "ref_logp")}
  batch_key = jax.jit(fold_rng, out_shardings=s.state_sh.rng)
  for i, start in enumerate(range(0, n, b)):
    idx = np.arange(start, start + b) % n
    batch = bridge.device_batch(s, batcher, idx, demo)
    # Each batch samples with a key of its own: with the step's one key, row j of every batch would draw the
    # same random numbers, and the samples of different prompts would move together.
    ro = distributed.to_host(steps.eval_rollout(state.replace(rng=batch_key(state.rng, i)), s.frozen, batch))
    parts = dict(ro.rewards)
    if s.rewards.needs_host:
      parts.update(bridge.score_on_host(s, ds, idx, ro.tokens, ro.mask, steps.rm))
    keep = min(b, n - start)
    by_prompt = lambda x: np.asarray(x).reshape(b, k, *x.shape[1:])[:keep]  # rollouts are prompt-major
    out["rewards"].append(by_prompt(s.rewards.stack(parts)))
    out["tokens"].append(by_prompt(ro.tokens))
    out["mask"].append(by_prompt(ro.mask))
    out["logp"].append(by_prompt(ro.logp))
    out["ref_logp"].append(by_prompt(ro.ref_logp))
  res = {name: np.concatenate(v, axis=0) for name, v in out.items()}
  res["demo"] = demo[:n]
  res["prompts"] = [ds.prompt_texts[i] for i in range(n)]
  return res


def run(s, steps, state, wd: Path, step: int) -> dict:
  """One evaluation: metrics dict, also written under wd/eval."""
  g = generate(s, steps, state, s.val, s.demo_val, s.config.eval.num_prompts)
  first = {name: g[name][:, 0] for name in ("rewards", "tokens", "mask", "logp", "ref_logp")}
  mask = first["mask"].astype(bool)
  seq_kl = np.asarray(rl.sequence_kl(first["logp"], first["ref_logp"], mask, "k1"))
  completions = [list(t[m]) for t, m in zip(first["tokens"], mask)]
  names = s.rewards.names
  result = evaluation.summarize(
      rewards={name: first["rewards"][:, i] for i, name in enumerate(names)},
      demo_rewards={name: g["demo"][:, i] for i, name in enumerate(names)},
      completions=completions, seq_kl=seq_kl, bins=s.config.eval.bins)
  result.update(evaluation.group_summary(
      {name: g["rewards"][:, :, i] for i, name in enumerate(names)},
      {name: g["demo"][:, i] for i, name in enumerate(names)}))
  # -log pi of the policy's own tokens: a Monte Carlo estimate of its token entropy (at temperature 1).
  all_mask = g["mask"].astype(bool)
  result["entropy"] = float(-g["logp"][all_mask].mean()) if all_mask.any() else 0.0
  texts = s.tokenizer.batch_decode([c for c in completions[:4]], skip_special_tokens=True)
  result["samples"] = [{"prompt": p, "completion": t} for p, t in zip(g["prompts"][:4], texts)]
  result["step"] = step
  if jax.process_index() == 0:
    evaluation.write_eval(wd, step, result, logp_bt=first["ref_logp"], mask_bt=mask,
                          policy_rewards=first["rewards"][:, 0], demo_rewards=g["demo"][:, 0],
                          prompt_mean_rewards=g["rewards"][:, :, 0].mean(axis=1))
  return result
