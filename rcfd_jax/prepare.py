"""Builds the hub-free assets the tiny config runs on.

    python -m rcfd_jax.prepare --out=build/tiny

writes, deterministically from --seed:
  OUT/reviews.jsonl      the synthetic movie-review corpus (rcfd_jax.corpus; --regime=voiced for
                         reviews that open with a rating and a title in the reviewer's voice)
  OUT/policy/            a small random GPT-2 with a BPE tokenizer trained on the corpus
  OUT/reward_model/      a small random GPT-2 classifier sharing that tokenizer
An existing OUT is left as it is unless --force is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

from rcfd_jax import corpus, tiny



def build(out: str | Path, *, n_reviews: int = 4000, vocab_size: int = 512, seed: int = 0,
          width: int = 64, layers: int = 2, regime: str = "plain", force: bool = False) -> Path:
  """Writes corpus (of corpus.REGIMES[regime]), tokenizer, policy and reward model directories under `out`."""
  out = Path(out)
  if not force and (out / "policy" / "config.json").exists() and (out / "reward_model" / "config.json").exists():
    return out
  corpus.write_corpus(out, n_reviews=n_reviews, seed=seed, regime=regime)
  tok = tiny.train_tokenizer(corpus.pretraining_texts(n_reviews, seed, regime), vocab_size)
  cfg = tiny.gpt2_config(len(tok), n_embd=width, n_layer=layers)
  tiny.write_model_dir(out / "policy", cfg, tok, seed=seed)
  tiny.write_model_dir(out / "reward_model", dict(cfg, **tiny.gpt2_config(len(tok), n_embd=width, n_layer=layers,
                                                                          num_labels=2)), tok, seed=seed + 1)
  return out


def main(argv):
  del argv
  out = build(flags.FLAGS.out, n_reviews=flags.FLAGS.n_reviews, vocab_size=flags.FLAGS.vocab_size,
              seed=flags.FLAGS.seed, regime=flags.FLAGS.regime, force=flags.FLAGS.force)
  print(f"tiny assets in {out}", file=sys.stderr)


if __name__ == "__main__":
  # Flags live with the entry point so importing this module (tests, reproduce) defines none.
  flags.DEFINE_string("out", "build/tiny", "Output directory.")
  flags.DEFINE_integer("n_reviews", 4000, "Reviews in the corpus.")
  flags.DEFINE_integer("vocab_size", 512, "Tokenizer vocabulary.")
  flags.DEFINE_integer("seed", 0, "Seed of the corpus and the random weights.")
  flags.DEFINE_enum("regime", "plain", list(corpus.REGIMES), "Corpus regime (rcfd_jax.corpus.REGIMES).")
  flags.DEFINE_bool("force", False, "Rebuild even if OUT already holds the assets.")
  app.run(main)
