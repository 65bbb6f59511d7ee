"""The one exception type for bad user input.

Anything the user can fix (a config field, a path, a dataset column, a model
directory) raises UserError with one sentence that says what is wrong and
what to do. Entry points print it as a single line and exit non-zero.
"""

import os
import sys


class UserError(Exception):
  """Bad input the user can fix; the message is shown as one line."""


def need(ok: bool, message: str) -> None:
  """Raises UserError(message) unless `ok`: one line per check in the config checks."""
  if not ok:
    raise UserError(message)


def exit_on_user_error(fn):
  """Wraps an entry point: a UserError becomes one stderr line and exit 2."""

  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.stdout.flush()
      sys.stderr.flush()
      # The entry points close their files before raising. Leaving without the
      # interpreter's teardown keeps the error line last: a failed async write
      # (e.g. a full disk) leaves library tasks whose tracebacks the garbage
      # collector would print after it.
      os._exit(2)

  wrapped.__name__ = fn.__name__
  wrapped.__doc__ = fn.__doc__
  return wrapped
