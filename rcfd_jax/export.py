"""Write a trained policy as a Hugging Face directory (LoRA merged).

    python -m rcfd_jax.export --workdir=DIR --out=HF_DIR

reads DIR/config.json (written by the trainer) and the latest good
checkpoint in DIR/checkpoints, rebuilds the policy exactly as training did,
and saves its language model with the tokenizer; transformers loads HF_DIR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_collections
from absl import app, flags

from rcfd_jax.errors import UserError



def is_workdir(path: str | Path) -> bool:
  p = Path(path)
  return (p / "config.json").is_file() and (p / "checkpoints").is_dir()


def run_config(workdir: str | Path) -> ml_collections.ConfigDict:
  f = Path(workdir) / "config.json"
  try:
    return ml_collections.ConfigDict(json.loads(f.read_text()))
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"cannot read the run's config {f}: {e}") from None


def load_trained(workdir: str | Path):
  """(language model with trained weights, tokenizer, step) from a training workdir."""
  from rcfd_jax import checkpoint, config as config_lib, models, policy as policy_lib, sharding
  if not is_workdir(workdir):
    raise UserError(f"{workdir} is not a training workdir (no config.json and checkpoints/)")
  config = run_config(workdir)
  mesh = sharding.mesh_from_config(config.mesh)
  tokenizer = policy_lib.load_tokenizer(config.policy.path)
  lm = models.load_pretrained(config.policy.path, task="causal_lm", dtype=config_lib.DTYPES[config.model.dtype],
                              mesh=mesh)
  parts, _ = policy_lib.build(lm, config, value_head=config.rl.baseline == "gae", mesh=mesh)
  ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints", max_to_keep=config.checkpoint.keep)
  restored = ckpt.restore_params(sharding.abstract(parts.trainable, sharding.state_shardings(parts.trainable, mesh)))
  ckpt.close()
  if restored is None:
    raise UserError(f"{workdir}/checkpoints holds no checkpoint that restores")
  step, params = restored
  return parts.merge(params, parts.frozen).lm, tokenizer, step


def export(workdir: str | Path, out: str | Path) -> Path:
  from rcfd_jax import models
  lm, tokenizer, step = load_trained(workdir)
  out = models.save_pretrained(lm, out, tokenizer=tokenizer)
  print(f"exported step {step} of {workdir} to {out}", file=sys.stderr)
  return out


def main(argv):
  del argv
  if not flags.FLAGS.workdir or not flags.FLAGS.out:
    print("error: --workdir and --out are required", file=sys.stderr)
    sys.exit(2)
  try:
    export(flags.FLAGS.workdir, flags.FLAGS.out)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  # Flags live with the entry point so importing this module (generate, tests) defines none.
  flags.DEFINE_string("workdir", None, "Training workdir (holds config.json and checkpoints/).")
  flags.DEFINE_string("out", None, "Output Hugging Face directory.")
  app.run(main)
