"""Demonstration rewards R(x, y_d): computed once per dataset, cached on disk.

The demonstrations are scored by the very function that scores sampled
completions (rcfd_jax.step.make_scorer, compiled as the "demo_scoring"
program), with the frozen initial policy and reward models, so R(x, y) and
R(x, y_d) are comparable. The cache key names by content everything the
scores depend on (`cache_key`): a resumed or repeated run reads the file
instead of scoring again, and a model retrained in place, to the same
shapes, misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
from absl import logging

from rcfd_jax import batching, distributed, files, fingerprint, programs, sharding, words
from rcfd_jax.models import hf


def cache_path(cache_dir: str, key: str) -> Path:
  return Path(os.path.expanduser(cache_dir)) / f"{key}.npy"


def score(ds, progs, parts, frozen, rewards, tokenizer, config) -> np.ndarray:
  """[n, K] rewards of each example's demonstration, in config.reward.sources order.

  Runs the run's "demo_scoring" program (and its reward model on the host),
  compiled once for config.reward.demo_batch_size rows (rcfd_jax.programs).
  """
  n, bs = len(ds), config.reward.demo_batch_size
  batcher = batching.Batcher(ds, bs, config.data, tokenizer.pad_token_id)
  prog = progs["demo_scoring"]
  rm = programs.host_rm(progs, rewards.classifier) if rewards.classifier is not None else None
  out = []
  for start in range(0, n, bs):
    idx = np.arange(start, start + bs) % n  # the last chunk wraps so shapes never change
    b = batcher.gather(idx)
    rows = [sharding.put_global(x, a.sharding) for x, a in zip(
        (b.prompt_ids, b.prompt_mask.astype(bool), b.demo_ids, b.demo_mask.astype(bool)), prog.args[2:])]
    _, graph = prog.fn(parts.trainable, frozen, *rows)
    host = rewards.on_host([ds.prompt_texts[i] for i in idx], [ds.demo_texts[i] for i in idx],
                           [ds.extras[i] for i in idx], rm)
    parts_np = distributed.to_host(graph)
    parts_np.update(host)
    out.append(rewards.stack(parts_np)[: min(bs, n - start)])
  return np.concatenate(out, axis=0).astype(np.float32)


def calibration_targets(demo_nk: np.ndarray, target: str) -> np.ndarray:
  """[n, K] what rcfd and rcfd_group calibrate each training prompt to (config.rl.rcfd_target).

  demo: each prompt's own R(x, y_d), the paper's target.
  mean: the training demonstrations' mean reward, per component, for every
    prompt. Over the demonstrations of one prompt, E[(mu(x) - R_d)^2] =
    (mu(x) - E[R_d|x])^2 + Var(R_d|x): the gradient in mu reads only
    E[R_d|x], and each prompt's own R_d adds its deviation from it as zero-mean
    noise. Where the prompt does not predict R_d, E[R_d|x] is the mean, and
    this target has the same expected gradient with none of that noise; where
    it does, it calibrates only the overall mean, not each prompt.
  """
  if target == "demo":
    return demo_nk
  if target == "mean":
    return np.broadcast_to(demo_nk.mean(axis=0, dtype=np.float64), demo_nk.shape).astype(demo_nk.dtype)
  raise ValueError(f"unknown calibration target {target!r}")


def cache_key(ds, rewards, tokenizer, config) -> str:
  """Names the demonstration rewards of `ds` by the content of all that makes them.

  The policy's and the reward model's weight bytes (their digests are
  remembered under cache_dir/digests, so multi-GB files are read once), the
  reward function's code, the lexicons, the EOS id, the reward model's
  tokenizer and settings, and the dataset's fingerprint (rows, data config,
  policy tokenizer).
  """
  memo = Path(os.path.expanduser(config.reward.cache_dir)) / "digests"
  clf = rewards.classifier
  parts = dict(
      sources=rewards.names,
      policy=fingerprint.model_dir(hf.resolve_dir(config.policy.path), memo),
      data=ds.fingerprint,
      eos_id=tokenizer.eos_token_id,
      widths=[config.data.max_prompt_tokens, config.data.demo_max_tokens],
      dtype=config.model.dtype,
      classifier=None if clf is None else [
          fingerprint.model_dir(clf.model_dir, memo), clf.tokenizer_fp, clf.label_index,
          clf.max_tokens, clf.input, clf.in_graph],
      # A function's module source does not show the lexicons it imports from words.py.
      function=None if rewards.function is None else [fingerprint.code(rewards.function), words.lexicons()],
      lexicons={name: words.lexicons()[name.partition(":")[2]] for name in rewards.automata})
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def rewards_for(datasets, progs, parts, frozen, rewards, tokenizer, config) -> list[np.ndarray]:
  """Demonstration rewards for each dataset, from the cache when present."""
  results = []
  for ds in datasets:
    f = cache_path(config.reward.cache_dir, cache_key(ds, rewards, tokenizer, config))
    cached = _read(f, len(ds), len(rewards.names))
    if cached is not None:
      logging.info("demonstration rewards from cache %s", f)
      results.append(cached)
      continue
    values = score(ds, progs, parts, frozen, rewards, tokenizer, config)
    if jax.process_index() == 0:
      _write(f, values)
    results.append(values)
  return results


def _read(f: Path, n: int, k: int) -> np.ndarray | None:
  try:
    v = np.load(f, allow_pickle=False)
  except (OSError, ValueError, EOFError):  # missing, damaged, or empty (np.load raises EOFError)
    return None
  return v if v.shape == (n, k) and np.isfinite(v).all() else None


def _write(f: Path, values: np.ndarray) -> None:
  """Atomic: a crash mid-write leaves the old cache (or none), never half a file."""
  try:
    f.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(f, lambda fh: np.save(fh, values, allow_pickle=False), binary=True)
  except OSError as e:
    logging.warning("could not cache demonstration rewards in %s: %s", f.parent, e)
