"""Builds the hub-free assets the tiny config runs on.

    python -m rcfd_jax.reproduce.prepare --out=build/tiny

writes, deterministically from --seed:
  OUT/reviews.jsonl      the synthetic movie-review corpus (corpus.py; --regime=voiced for
                         reviews that open with a rating and a title in the reviewer's voice)
  OUT/policy/            a small random GPT-2 with a BPE tokenizer trained on the corpus
  OUT/reward_model/      a small random GPT-2 classifier sharing that tokenizer
An existing OUT is left as it is unless --force is given. The trainer calls
`build(config.assets_dir)` before a run (configs/tiny.py sets it), so the
tiny config builds these bytes itself on first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from rcfd_jax.errors import UserError
from rcfd_jax.reproduce import corpus, tiny

_PARTS = ("reviews.jsonl", "policy/config.json", "policy/model.safetensors", "policy/tokenizer.json",
          "reward_model/config.json", "reward_model/model.safetensors")


def build(out: str | Path, *, n_reviews: int = 4000, vocab_size: int = 512, seed: int = 0,
          width: int = 64, layers: int = 2, regime: str = "plain", force: bool = False) -> Path:
  """Writes corpus (of corpus.REGIMES[regime]), tokenizer, policy and reward model directories under `out`.

  Safe when several processes start at once: one builds in a temporary
  sibling under a file lock and renames it to `out`; the others wait for the
  lock and find the assets there. A crash leaves no half-built `out`.
  """
  out = Path(out)
  if not force and _complete(out):
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with _locked(out.parent / f".{out.name}.lock"):
    if not force and _complete(out):  # another process built them while this one waited
      return out
    if not force and out.exists() and any(out.iterdir()):
      missing = [p for p in _PARTS if not (out / p).is_file()]
      raise UserError(f"{out} exists but lacks the tiny assets' {', '.join(missing)}; remove it, or "
                      "rebuild it with python -m rcfd_jax.reproduce.prepare --force --out=" + str(out))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the assets from other users once renamed
    try:
      _write(tmp, n_reviews=n_reviews, vocab_size=vocab_size, seed=seed, width=width, layers=layers,
             regime=regime)
      _move_in(tmp, out)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return out


def _complete(out: Path) -> bool:
  return all((out / p).is_file() for p in _PARTS)


@contextlib.contextmanager
def _locked(lock: Path):
  with open(lock, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
    yield


def _write(out: Path, *, n_reviews: int, vocab_size: int, seed: int, width: int, layers: int,
           regime: str) -> None:
  corpus.write_corpus(out, n_reviews=n_reviews, seed=seed, regime=regime)
  tok = tiny.train_tokenizer(corpus.pretraining_texts(n_reviews, seed, regime), vocab_size)
  cfg = tiny.gpt2_config(len(tok), n_embd=width, n_layer=layers)
  tiny.write_model_dir(out / "policy", cfg, tok, seed=seed)
  tiny.write_model_dir(out / "reward_model", dict(cfg, **tiny.gpt2_config(len(tok), n_embd=width, n_layer=layers,
                                                                          num_labels=2)), tok, seed=seed + 1)


def _move_in(built: Path, out: Path) -> None:
  """Renames `built` to `out`; an existing `out` (--force) has each part replaced in turn."""
  if out.exists() and not any(out.iterdir()):
    out.rmdir()
  if not out.exists():
    built.rename(out)
    return
  for part in sorted(built.iterdir()):
    target = out / part.name
    if part.is_dir() and target.exists():  # a directory cannot replace another in one rename
      old = out / f".{part.name}.old"
      shutil.rmtree(old, ignore_errors=True)
      target.rename(old)
      part.rename(target)
      shutil.rmtree(old)
    else:
      os.replace(part, target)


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
  flags.DEFINE_enum("regime", "plain", list(corpus.REGIMES),
                    "Corpus regime (rcfd_jax.reproduce.corpus.REGIMES).")
  flags.DEFINE_bool("force", False, "Rebuild even if OUT already holds the assets.")
  app.run(main)
