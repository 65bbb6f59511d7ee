"""What the command-line entry points share: flag parsing with one-line errors, quiet library logs.

main (training) and aot (compiling for TPU topologies) both take --config=FILE[:ARG] and
--config.a.b=v overrides; a bad file or override is one `error: ...` line and exit 2.
"""

import logging as std_logging
import sys
import traceback

import ml_collections
from absl import flags, logging


class QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of Orbax and JAX internals; warnings and errors still show."""

  def filter(self, record):
    noisy = "/orbax/" in record.pathname or "/jax/_src/" in record.pathname
    return record.levelno >= std_logging.WARNING or not noisy


def quiet_logging() -> None:
  """INFO for this project's own lines; Orbax's and JAX's internal chatter only from warnings up."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(QuietLibraries())


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
