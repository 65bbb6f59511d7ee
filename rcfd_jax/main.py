"""Train a policy with RL (optionally calibrated to demonstrations, RCfD), or run a supervised stage.

    python -m rcfd_jax.main --config=configs/tiny.py --workdir=/tmp/run
    python -m rcfd_jax.main --config=configs/tldr.py --workdir=DIR --config.rl.objective=kl --config.rl.beta=0.1
    python -m rcfd_jax.main --config=configs/sft_tiny.py --workdir=DIR     # config.stage = "sft"

config.stage picks the trainer: "rl" (rcfd_jax.train) or "sft" / "classifier"
(rcfd_jax.supervised). A second run of the same command resumes RL from the
latest good checkpoint. Config files are Python: run only configs you trust.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from rcfd_jax import cli
from rcfd_jax.cli import parse_flags  # noqa: F401  (tests run main with their own flag parsing)

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, evaluations and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from rcfd_jax import supervised, train
  from rcfd_jax.errors import exit_on_user_error
  cli.quiet_logging()
  config = flags.FLAGS.config
  trainer = train.run if config.stage == "rl" else supervised.run
  exit_on_user_error(trainer)(config, flags.FLAGS.workdir)


def run(argv: list[str] | None = None) -> None:
  """The command line: parse flags (one-line errors), then main under absl."""
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  parsed = parse_flags(sys.argv if argv is None else argv)
  app.run(main, flags_parser=lambda _: parsed)  # parsed above; a second parse would redefine overrides


if __name__ == "__main__":
  run()
