"""Fixed-shape batches of prompts: the batch of step s is a pure function of (seed, s, batch size).

So resuming a run needs only the step, and every host builds its own share
of the global batch without talking to the others.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from rcfd_jax.errors import UserError
from rcfd_jax.prompts import PromptDataset


@dataclasses.dataclass(frozen=True)
class DataPosition:
  """Where a step's batch starts in the stream of epochs; checkpoints store it."""
  epoch: int
  offset: int  # index in the epoch's permutation of the batch's first example


@dataclasses.dataclass(frozen=True)
class HostBatch:
  """One process's share of a global batch, in host memory; array shapes never change between steps.

  bridge.device_batch places its arrays on the mesh as a step.Batch.
  """
  prompt_ids: np.ndarray  # [b, max_prompt_tokens] int32, left-padded
  prompt_mask: np.ndarray  # [b, max_prompt_tokens] int32, 1 on prompt tokens
  demo_ids: np.ndarray  # [b, demo_max_tokens] int32, right-padded, EOS included
  demo_mask: np.ndarray  # [b, demo_max_tokens] int32
  indices: np.ndarray  # [b] int64 positions of the examples in the dataset
  prompt_texts: list[str]
  demo_texts: list[str]
  position: DataPosition  # of the global batch, the same on every process


class Batcher:
  """Global batch of step s = a pure function of (seed, s, global batch size).

  The examples form an endless stream of epochs, epoch e being the dataset in
  the order np.random.default_rng([seed, e]).permutation(n); step s takes
  stream positions [s * B, (s + 1) * B). Every example comes once per epoch,
  a batch may straddle two epochs, and resuming needs only the step.
  """

  def __init__(self, dataset: PromptDataset, global_batch_size: int,
               config: ml_collections.ConfigDict, pad_id: int):
    if len(dataset) == 0:
      raise UserError("cannot batch an empty dataset")
    if global_batch_size < 1:
      raise UserError(f"global batch size must be >= 1; got {global_batch_size}")
    self.dataset, self.global_batch_size, self.pad_id = dataset, global_batch_size, pad_id
    self.seed = config.shuffle_seed
    self.prompt_len, self.demo_len = config.max_prompt_tokens, config.demo_max_tokens
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 2:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
    return self._perms[epoch]

  def position(self, step: int) -> DataPosition:
    epoch, offset = divmod(step * self.global_batch_size, len(self.dataset))
    return DataPosition(int(epoch), int(offset))

  def state(self, step: int) -> dict[str, Any]:
    """What a checkpoint stores to check, on resume, that the data stream is the same."""
    pos = self.position(step)
    return dict(step=step, epoch=pos.epoch, offset=pos.offset, seed=self.seed,
                global_batch_size=self.global_batch_size, num_examples=len(self.dataset),
                fingerprint=self.dataset.fingerprint)

  def check_state(self, step: int, saved: dict[str, Any]) -> None:
    """Raises UserError if a checkpoint's data state differs from this batcher's at `step`."""
    now = self.state(step)
    diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
    if diff:
      raise UserError(f"the data stream differs from the checkpoint's ({'; '.join(diff)}); "
                      "resume with the same data, tokenizer, seed and batch size")

  def indices(self, step: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Dataset indices of this process's contiguous share of the global batch of `step`."""
    if self.global_batch_size % process_count:
      raise UserError(f"global batch size {self.global_batch_size} is not divisible by the "
                      f"{process_count} processes")
    local = self.global_batch_size // process_count
    pos = step * self.global_batch_size + process_index * local + np.arange(local)
    epochs, offsets = np.divmod(pos, len(self.dataset))
    return np.concatenate([self._perm(int(e))[offsets[epochs == e]] for e in np.unique(epochs)])

  def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> HostBatch:
    return self.gather(self.indices(step, process_index, process_count), self.position(step))

  def gather(self, indices, position: DataPosition | None = None) -> HostBatch:
    """Pads the examples at `indices` into fixed-shape arrays (also for evaluation)."""
    indices = np.asarray(indices, dtype=np.int64)
    b = len(indices)
    prompt = np.full((b, self.prompt_len), self.pad_id, np.int32)
    demo = np.full((b, self.demo_len), self.pad_id, np.int32)
    prompt_mask = np.zeros((b, self.prompt_len), np.int32)
    demo_mask = np.zeros((b, self.demo_len), np.int32)
    for row, i in enumerate(indices):
      p, d = self.dataset.prompt_ids[i], self.dataset.demo_ids[i]
      if len(p) > self.prompt_len or len(d) > self.demo_len:
        raise UserError(f"example {i} is longer than max_prompt_tokens/demo_max_tokens; the "
                        "dataset was built with another data config")
      prompt[row, self.prompt_len - len(p):], prompt_mask[row, self.prompt_len - len(p):] = p, 1
      demo[row, :len(d)], demo_mask[row, :len(d)] = d, 1
    return HostBatch(prompt, prompt_mask, demo, demo_mask, indices,
                 [self.dataset.prompt_texts[i] for i in indices],
                 [self.dataset.demo_texts[i] for i in indices],
                 position or DataPosition(-1, -1))
