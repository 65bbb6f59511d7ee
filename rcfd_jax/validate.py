"""Evaluation on validation prompts: sample, score, compare with the demonstrations.

Writes DIR/eval/step_N.json (reward per source, the demonstrations' mean,
Alignment A, RCfD's reward -(R - R_d)^2, distinct-1/2, length, KL to pi_0, a
few samples) and PNG plots
(reward histogram of policy vs demonstrations; log-likelihood by position).
The rollout used here is the training rollout compiled once more with one
sample per prompt and the evaluation temperature (the "eval_rollout"
program, rcfd_jax.programs).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from rcfd_jax import distributed, evaluation, rl

def generate(s, steps, state, ds, demo: np.ndarray, num_prompts: int) -> dict[str, np.ndarray | list]:
  """Completions and rewards for the first num_prompts prompts of `ds`, batch by batch (steps: train.Steps)."""
  from rcfd_jax import data, train
  b = s.config.rollout.prompts_per_step
  n = min(num_prompts, len(ds))
  batcher = data.Batcher(ds, b, s.config.data, s.tokenizer.pad_token_id)
  out = {k: [] for k in ("rewards", "tokens", "mask", "logp", "ref_logp", "demo")}
  for start in range(0, n, b):
    idx = np.arange(start, start + b) % n
    batch = train.device_batch(s, batcher, idx, demo)
    ro = distributed.to_host(steps.eval_rollout(state, s.frozen, batch))
    parts = dict(ro.rewards)
    if s.rewards.needs_host:
      parts.update(train.score_on_host(s, ds, idx, ro.tokens, ro.mask, steps.rm))
    keep = min(b, n - start)
    out["rewards"].append(s.rewards.stack(parts)[:keep])
    out["tokens"].append(ro.tokens[:keep])
    out["mask"].append(ro.mask[:keep])
    out["logp"].append(ro.logp[:keep])
    out["ref_logp"].append(ro.ref_logp[:keep])
    out["demo"].append(demo[idx[:keep]])
  res = {k: np.concatenate(v, axis=0) for k, v in out.items()}
  res["prompts"] = [ds.prompt_texts[i] for i in range(n)]
  return res


def run(s, steps, state, wd: Path, step: int) -> dict:
  """One evaluation: metrics dict, also written under wd/eval."""
  g = generate(s, steps, state, s.val, s.demo_val, s.config.eval.num_prompts)
  mask = g["mask"].astype(bool)
  seq_kl = np.asarray(rl.sequence_kl(g["logp"], g["ref_logp"], mask, "k1"))
  completions = [list(t[m]) for t, m in zip(g["tokens"], mask)]
  result = evaluation.summarize(
      rewards={name: g["rewards"][:, i] for i, name in enumerate(s.rewards.names)},
      demo_rewards={name: g["demo"][:, i] for i, name in enumerate(s.rewards.names)},
      completions=completions, seq_kl=seq_kl, bins=s.config.eval.bins)
  texts = s.tokenizer.batch_decode([c for c in completions[:4]], skip_special_tokens=True)
  result["samples"] = [{"prompt": p, "completion": t} for p, t in zip(g["prompts"][:4], texts)]
  result["step"] = step
  if jax.process_index() == 0:
    evaluation.write_eval(wd, step, result, logp_bt=g["ref_logp"], mask_bt=mask,
                          policy_rewards=g["rewards"][:, 0], demo_rewards=g["demo"][:, 0])
  return result
