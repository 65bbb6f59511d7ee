"""The host's side of a step: a batch of examples onto the mesh, completions back to text rewards.

The RL loop (rcfd_jax.train), evaluation (rcfd_jax.validate) and the tools
built on them all feed batches and score host-side rewards through these
functions; `s` is the run's train.Setup (its mesh, tokenizer, rewards and
training prompts are read).
"""

from __future__ import annotations

import numpy as np

from rcfd_jax import batching, distributed, prompts, sharding
from rcfd_jax.step import Batch


def device_batch(s, batcher: batching.Batcher, indices: np.ndarray, demo: np.ndarray) -> Batch:
  """The global batch of examples `indices` on the mesh; each process reads only its own rows.

  The rows a process feeds are those its devices hold under the batch
  sharding (distributed.process_rows), so the global array's row order is
  `indices` order on any number of processes.
  """
  n = len(indices)
  sh = sharding.rows_sharding(s.mesh, (n,))
  host = batcher.gather(np.asarray(indices)[distributed.process_rows(sh, n)])
  put = lambda x: sharding.put_rows(x, n, s.mesh)
  return Batch(put(host.prompt_ids), put(host.prompt_mask.astype(bool)), put(demo[host.indices]))


def host_rewards(s, ro, indices: np.ndarray, rm=None) -> dict:
  """The bridge: decode the rollout's completions, score them with host-side rewards (rm: train.Steps.rm)."""
  return score_on_host(s, s.train, indices, distributed.to_host(ro.tokens), distributed.to_host(ro.mask), rm)


def score_on_host(s, ds: prompts.PromptDataset, indices, tokens: np.ndarray, mask: np.ndarray,
                  rm=None) -> dict:
  """Host-side rewards of completions; rows are the prompts at `indices`, each repeated per sample."""
  completions = s.tokenizer.batch_decode(np.where(mask, tokens, s.tokenizer.pad_token_id),
                                         skip_special_tokens=True)
  idx = np.repeat(np.asarray(indices), len(tokens) // len(indices))  # k samples per prompt, in order
  return s.rewards.on_host([ds.prompt_texts[i] for i in idx], completions, [ds.extras[i] for i in idx], rm)
