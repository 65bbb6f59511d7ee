"""SFT of the tiny GPT-2 policy on the synthetic movie reviews (all labels).

    python -m rcfd_jax.reproduce.prepare --out=build/tiny
    python -m rcfd_jax.main --config=configs/sft_tiny.py --workdir=runs/sft_tiny

Expect on 2 CPU cores about 2 minutes (600 updates of 32 reviews, ~0.2 s
each, plus ~10 s of loading and compiling; measured 2 min 15 s beside other
jobs, 6 min on cores shared with ten). The run is deterministic:
runs/sft_tiny/eval.json shows validation_loss 0.836 nats/token (token
accuracy 0.74) against a unigram_entropy of 5.12, and runs/sft_tiny/model/
is the SFT policy. Samples mostly read like the corpus, with some broken
words ("The humor is extremely forgettable, but the set design is fairly
harmless. Pas is an awful western."); more steps keep lowering the loss.

    python -m rcfd_jax.generate --model=runs/sft_tiny/model --prompt="I saw" --num_samples=3

RL configs start from it (policy.path=runs/sft_tiny/model) and so does
configs/rm_tiny.py. The argument overrides the assets directory:
--config=configs/sft_tiny.py:DIR.
"""

from rcfd_jax import supervised


def get_config(arg=None):
  assets = arg or "build/tiny"
  c = supervised.base_config()
  c.stage = "sft"
  c.model.path = f"{assets}/policy"         # random 2-layer width-64 GPT-2 from rcfd_jax.reproduce.prepare
  c.data.path = f"{assets}/reviews.jsonl"
  c.data.text_column = "text"
  c.total_steps = 600                       # ~5 epochs of 3800 reviews; the loss still falls slowly
  c.batch_size = 32
  c.seq_len = 128                           # covers 96% of reviews (median 78 tokens, longest 161 with EOS)
  c.data.validation_size = 200
  c.optim.learning_rate = 3e-3              # high for a tiny random model; 1e-3 ends ~0.3 nats worse
  c.optim.warmup_steps = 50
  c.log_every_steps = 50
  return c
