"""Train a policy with RL, optionally calibrated to demonstrations (RCfD).

    python -m rcfd_jax.main --config=configs/tiny.py --workdir=/tmp/run
    python -m rcfd_jax.main --config=configs/tldr.py --workdir=DIR --config.rl.objective=kl --config.rl.beta=0.1

A second run of the same command resumes from the latest good checkpoint.
Config files are Python: run only configs you trust.
"""

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, evaluations and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of Orbax and JAX internals; warnings and errors still show."""

  def filter(self, record):
    noisy = "/orbax/" in record.pathname or "/jax/_src/" in record.pathname
    return record.levelno >= std_logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from rcfd_jax import train
  from rcfd_jax.errors import UserError
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    train.run(flags.FLAGS.config, flags.FLAGS.workdir)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
  """absl's parse, but a bad --config or --config.x override is one stderr line, exit 2.

  absl prints "FATAL Flags parsing error" plus a usage hint for type errors,
  and an unknown override field surfaces from ml_collections as a bare
  AttributeError with a traceback.
  """
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).replace("\\n", " ")
    if isinstance(e, (AttributeError, KeyError)):  # ml_collections' repr-quoted "'x'\nDid you mean ..."
      text = "unknown config field " + text.replace("\\", "").replace("'", "").replace(" Did you", "; did you")
    print("error: " + " ".join(text.split()), file=sys.stderr)
    sys.exit(2)


def run():
  """Entry point that turns config-file problems into one line too."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  run()
