"""prepare.build: the tiny assets, built once even when several processes start together."""

import subprocess
import sys
from pathlib import Path

import pytest

from rcfd_jax.errors import UserError
from rcfd_jax.reproduce import prepare

SMALL = dict(n_reviews=200, width=16)


def _files(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_processes_building_at_once_leave_one_complete_directory(tmp_path, env):
  out = tmp_path / "assets" / "tiny"
  code = f"from rcfd_jax.reproduce import prepare; prepare.build({str(out)!r}, n_reviews=200, width=16)"
  procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  for p in procs:
    assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
  # Nothing half-built or left over beside it: the assets and the lock file only.
  assert sorted(p.name for p in out.parent.iterdir()) == [".tiny.lock", "tiny"]
  reference = prepare.build(tmp_path / "reference", **SMALL)
  assert _files(out) == _files(reference)  # the bytes do not depend on the path or on the race


def test_a_directory_that_holds_something_else_is_not_overwritten(tmp_path):
  out = tmp_path / "tiny"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="exists but lacks the tiny assets' reviews.jsonl, .*--force"):
    prepare.build(out, **SMALL)
  assert _files(out) == {"notes.txt": b"mine"}
  prepare.build(out, force=True, **SMALL)
  assert (out / "policy" / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"
