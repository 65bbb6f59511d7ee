"""Sampling throughput: rcfd_jax.sampler vs transformers' generate (torch, CPU), same weights.

    python benchmarks/sampler.py                       # tiny GPT-2: 2 layers, width 128, vocab 1000
    python benchmarks/sampler.py --width=256 --layers=4

Both sides sample (temperature 1, no top-k / top-p) exactly --new_tokens
tokens for --batch prompts of --prompt_len tokens: transformers with
min_new_tokens, ours with eos_id=-1. The torch GPT-2 is built randomly and
saved; ours loads that directory, so both run identical fp32 weights.
torch gets as many threads as the cores JAX's CPU client uses. Compile
(ours) and first-call warm-up (peer) are reported separately; then the two
alternate A B A B for --rounds rounds, since these machines drift, and
medians are compared.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_WIDTH = flags.DEFINE_integer("width", 128, "Model width (n_embd).")
_LAYERS = flags.DEFINE_integer("layers", 2, "Transformer layers.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.")
_VOCAB = flags.DEFINE_integer("vocab", 1000, "Vocabulary size.")
_CONTEXT = flags.DEFINE_integer("context", 128, "Context length (n_positions).")
_BATCH = flags.DEFINE_integer("batch", 32, "Prompts per call.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "Tokens per prompt.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens sampled per prompt.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed A B rounds.")
_PEER_THREADS = flags.DEFINE_integer(
    "peer_threads", 0, "torch threads; 0 = the cores JAX uses. On a loaded machine torch's OpenMP "
    "threads degrade far worse than XLA's pool; 1 shows the peer's best case there.")


def _cores() -> int:
  """Cores this process may use; XLA's CPU client sizes its thread pool the same way."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv):
  del argv
  import jax
  import numpy as np
  import torch
  import transformers

  from rcfd_jax import models, sampler

  torch.set_num_threads(_PEER_THREADS.value or _cores())
  b, p, n = _BATCH.value, _PROMPT_LEN.value, _NEW_TOKENS.value
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=_VOCAB.value, n_positions=_CONTEXT.value, n_embd=_WIDTH.value,
                                n_layer=_LAYERS.value, n_head=_HEADS.value, bos_token_id=1,
                                eos_token_id=1, pad_token_id=0)
  peer = transformers.GPT2LMHeadModel(cfg).eval()
  with tempfile.TemporaryDirectory() as d:
    peer.save_pretrained(d)
    ours = sampler.Sampler(models.load_pretrained(d))

  prompts = np.random.default_rng(0).integers(2, _VOCAB.value, (b, p)).astype(np.int32)
  mask = np.ones((b, p), bool)
  prompts_t, mask_t = torch.tensor(prompts, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
  seed = [0]

  def run_ours():
    seed[0] += 1
    out = ours(prompts, mask, seed[0], max_new_tokens=n, temperature=1.0, eos_id=-1)
    tokens = np.asarray(jax.block_until_ready(out.tokens_bn))
    assert tokens.shape == (b, n) and bool(out.mask_bn.all())

  def run_peer():
    with torch.no_grad():
      out = peer.generate(input_ids=prompts_t, attention_mask=mask_t, do_sample=True, temperature=1.0,
                          top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    assert out.shape == (b, p + n)

  def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t

  first_ours, first_peer = timed(run_ours), timed(run_peer)
  timed(run_ours), timed(run_peer)  # second warm-up: caches, allocators
  times_ours, times_peer = [], []
  for _ in range(_ROUNDS.value):
    times_ours.append(timed(run_ours))
    times_peer.append(timed(run_peer))
  med_ours, med_peer = statistics.median(times_ours), statistics.median(times_peer)
  tps_ours, tps_peer = b * n / med_ours, b * n / med_peer
  print(f"config: gpt2 width={_WIDTH.value} layers={_LAYERS.value} heads={_HEADS.value} "
        f"vocab={_VOCAB.value} batch={b} prompt={p} new={n} fp32, jax cores={_cores()}, torch threads={torch.get_num_threads()}, "
        f"jax devices={jax.device_count()}")
  print(f"per-call seconds: ours={[round(t, 4) for t in times_ours]} "
        f"peer={[round(t, 4) for t in times_peer]}")
  print(f"sampler_first_call_s: ours={first_ours:.3f} peer={first_peer:.3f} "
        f"ratio={first_ours / first_peer:.2f} (s, ours includes compile)")
  print(f"sampler_tokens_per_s: ours={tps_ours:.0f} peer={tps_peer:.0f} ratio={tps_ours / tps_peer:.2f} "
        "(tokens/s)")


if __name__ == "__main__":
  app.run(main)
