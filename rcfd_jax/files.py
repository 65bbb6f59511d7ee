"""Files a run writes: the workdir, and whole-or-nothing writes of single files.

Every file that a crash must not leave half-written (metrics.jsonl when it
is rewritten, evaluation JSONs and plots, the demonstration-reward cache,
digest memos, aot results) goes through `write_atomically`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import IO, Callable

from rcfd_jax.errors import UserError


def write_atomically(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> None:
  """Calls write(f) on a new file beside `path`, then renames it over `path`.

  Readers see the old file or the new one, never half of one: the data is
  flushed to disk before the rename, and the temporary file is removed when
  anything fails. The directory must exist. The temporary name is unique
  (several processes may write the same cache entry) and starts with a dot,
  so listings of the directory's step files never see it.
  """
  path = Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
  try:
    with open(tmp, "xb" if binary else "x", **({} if binary else {"encoding": "utf-8"})) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def check_workdir(workdir: str) -> None:
  """Fails before anything is loaded or written when workdir cannot become a writable directory.

  Creating it waits until the inputs have loaded, so a bad config or dataset
  leaves no new directory behind.
  """
  wd = Path(workdir).expanduser().absolute()
  existing = next(p for p in (wd, *wd.parents) if p.exists())
  if not existing.is_dir():
    raise UserError(f"workdir {wd} is not writable ({existing} is not a directory); pick another --workdir")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"workdir {wd} is not writable (no write permission on {existing}); pick another --workdir")


def prepare_workdir(workdir: str) -> Path:
  """Creates the workdir or explains why it cannot be written."""
  import jax  # here, so that the data and fingerprint modules import this one without jax
  wd = Path(workdir).expanduser()
  try:
    wd.mkdir(parents=True, exist_ok=True)
    probe = wd / f".write_probe_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise UserError(f"workdir {wd} is not writable ({e.strerror}); pick another --workdir") from None
  return wd
