"""An encoder reward model's forward: compile time against depth, speed against transformers.

    python benchmarks/encoder_rm.py                          # DeBERTa-v3 layout, width 256, 24 layers
    python benchmarks/encoder_rm.py --family=bert --layers=12

Builds a randomly initialised classifier in transformers (torch) shaped like
OpenAssistant/reward-model-deberta-v3-large-v2 (relative attention with
log buckets, shared position keys, one score) or like a BERT sentiment
classifier, at the given width and depth, saves it as safetensors and loads
it with rcfd_jax.models. Reports for our jitted forward the time to trace and
lower and the XLA compile time (what a run pays once per reward model and
batch shape), then scores the same right-padded batch on both sides,
alternating them, and prints sequences per second and the ratio.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

_FAMILY = flags.DEFINE_enum("family", "deberta", ["deberta", "bert"], "Encoder family.")
_WIDTH = flags.DEFINE_integer("width", 256, "Hidden size (4 heads of width/4; MLP 4x).")
_LAYERS = flags.DEFINE_integer("layers", 24, "Encoder layers (DeBERTa-v3-large has 24).")
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per forward.")
_TOKENS = flags.DEFINE_integer("tokens", 128, "Padded sequence length; rows are 50-100% full.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds of --iters forwards per side.")
_ITERS = flags.DEFINE_integer("iters", 3, "Forwards per side per round.")


def torch_model(family: str, width: int, layers: int):
  import transformers as tf
  common_kw = dict(vocab_size=1000, hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                   intermediate_size=4 * width, max_position_embeddings=512)
  if family == "bert":
    return tf.BertForSequenceClassification(tf.BertConfig(**common_kw, num_labels=2))
  return tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
      **common_kw, num_labels=1, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=256,
      max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False,
      type_vocab_size=0, layer_norm_eps=1e-7, hidden_act="gelu"))


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  from rcfd_jax import models

  torch.manual_seed(0)
  torch.set_num_threads(common.cores())
  peer = torch_model(_FAMILY.value, _WIDTH.value, _LAYERS.value).eval()
  rng = np.random.default_rng(0)
  b, t = _BATCH.value, _TOKENS.value
  lengths = rng.integers(t // 2, t + 1, b)
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
  ids = rng.integers(1, 1000, (b, t)) * mask
  with tempfile.TemporaryDirectory() as d:
    peer.save_pretrained(d)
    ours = models.load_pretrained(d)

  graphdef, state = nnx.split(ours)
  fwd = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m))
  jids, jmask = jnp.asarray(ids), jnp.asarray(mask)
  t0 = time.perf_counter()
  lowered = fwd.lower(state, jids, jmask)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  tids, tmask = torch.tensor(ids), torch.tensor(mask)
  with torch.no_grad():
    ref = peer(tids, attention_mask=tmask).logits.numpy()
  err = float(np.abs(np.asarray(compiled(state, jids, jmask)) - ref).max())

  def run_ours():
    jax.block_until_ready(compiled(state, jids, jmask))

  def run_peer():
    with torch.no_grad():
      peer(tids, attention_mask=tmask)

  times = {"ours": [], "peer": []}
  for fn in (run_ours, run_peer):  # warm-up
    fn()
  for _ in range(_ROUNDS.value):
    for name, fn in (("ours", run_ours), ("peer", run_peer)):
      for _ in range(_ITERS.value):
        s = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - s)
  o, p = common.median(times["ours"]), common.median(times["peer"])
  tag = f"{_FAMILY.value}_w{_WIDTH.value}l{_LAYERS.value}"
  print(f"{tag}: trace+lower {t1 - t0:.2f} s, XLA compile {t2 - t1:.2f} s; forward ours {o * 1e3:.1f} ms, "
        f"transformers {p * 1e3:.1f} ms; max |logit difference| {err:.1e}")
  print(f"encoder_rm_{tag}_sequences_per_s: ours={b / o:.1f} peer={b / p:.1f} ratio={p / o:.2f} "
        f"(sequences/s, {b}x{t} tokens, ours jitted vs transformers torch)")


if __name__ == "__main__":
  app.run(main)
