"""Train a policy with RL (optionally calibrated to demonstrations, RCfD), or run a supervised stage.

    python -m rcfd_jax.main --config=configs/tiny.py --workdir=/tmp/run
    python -m rcfd_jax.main --config=configs/tldr.py --workdir=DIR --config.rl.objective=kl --config.rl.beta=0.1
    python -m rcfd_jax.main --config=configs/sft_tiny.py --workdir=DIR     # config.stage = "sft"

config.stage picks the trainer: "rl" (rcfd_jax.train) or "sft" / "classifier"
(rcfd_jax.supervised). A second run of the same command resumes RL from the
latest good checkpoint. Config files are Python: run only configs you trust.
"""

import logging as std_logging
import os
import sys
import traceback

import ml_collections
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
  from rcfd_jax import supervised, train
  from rcfd_jax.errors import exit_on_user_error
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = flags.FLAGS.config
  trainer = train.run if config.stage == "rl" else supervised.run
  exit_on_user_error(trainer)(config, flags.FLAGS.workdir)


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags so a bad --config file or override is one line and exit 2, not a traceback."""
  try:
    argv = flags.FLAGS(argv)
    config = flags.FLAGS.config
    if not isinstance(config, ml_collections.ConfigDict):
      getattr(config, "keys", None)  # a file that failed to load gives an object that raises its error when read
      raise TypeError(f"get_config() in the --config file returned {type(config).__name__}, not a ConfigDict")
  except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError) as e:
    lines = str(e).replace("\\n", "\n").replace("\\'", "'").splitlines()
    print(f"error: bad flags: {' '.join(l.strip().strip(chr(39)) for l in lines if l.strip())}",
          file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # the config file's own code failed: SyntaxError, NameError, ImportError...
    where = "" if isinstance(e, SyntaxError) else " at {0.filename}:{0.lineno}".format(
        traceback.extract_tb(e.__traceback__)[-1])
    print(f"error: the --config file failed to load ({type(e).__name__}: {e}{where}); fix it "
          "(config files are Python: run only configs you trust)", file=sys.stderr)
    sys.exit(2)
  return argv


def run(argv: list[str] | None = None) -> None:
  """The command line: parse flags (one-line errors), then main under absl."""
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  parsed = parse_flags(sys.argv if argv is None else argv)
  app.run(main, flags_parser=lambda _: parsed)  # parsed above; a second parse would redefine overrides


if __name__ == "__main__":
  run()
