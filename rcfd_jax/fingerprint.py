"""Content identities for cache keys and for deciding what may be shared.

A key that names a thing by where it lives or by its shape reuses stale
results when the thing changes in place (a reward model retrained to the same
shapes, a tokenizer with new merges), so every identity here is computed from
content. Weight files can be gigabytes: each file's digest is computed once
and remembered by (path, size, mtime, ctime, inode), in this process and in a
small JSON file per weight file under a memo directory.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

from rcfd_jax import files

# Tokenizer JSON fields that transformers rewrites on every padded or truncating
# call; they change no token id, so a used tokenizer keeps its identity.
_CALL_STATE = ("padding", "truncation")
_memo: dict[tuple, str] = {}


def _sha256(data: Any) -> str:
  return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def tokenizer(tok) -> str:
  """Identity of everything that maps text to ids and back.

  Covers the vocabulary, merges, normalizer, pre-tokenizer, post-processor
  (BOS/EOS templates), decoder, added tokens and which ids are the special
  tokens. Two tokenizers with equal fingerprints give the same ids for any text.
  """
  backend = getattr(tok, "backend_tokenizer", None)
  if backend is not None:
    body = {k: v for k, v in json.loads(backend.to_str()).items() if k not in _CALL_STATE}
  else:  # a slow (Python) tokenizer: its vocabulary and class are all there is to compare
    body = {"class": type(tok).__name__, "vocab": sorted(tok.get_vocab().items())}
  special = [tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id]
  return _sha256([body, special])


def _stat_key(path: Path) -> tuple:
  st = path.stat()
  return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _hash_bytes(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


def file_digest(path: str | os.PathLike, memo_dir: str | os.PathLike) -> str:
  """sha256 of a file's bytes, computed once per (path, size, mtime, ctime, inode).

  Rewriting the file in place changes its mtime and ctime, so the digest is
  computed again; an unchanged file is read once per machine, not per run.
  """
  path = Path(path)
  key = _stat_key(path)
  if key in _memo:
    return _memo[key]
  memo = Path(os.path.expanduser(memo_dir)) / f"{_sha256(key[0])[:32]}.json"
  try:
    saved = json.loads(memo.read_text())
    if tuple(saved["key"]) == key:
      _memo[key] = saved["sha256"]
      return saved["sha256"]
  except (OSError, ValueError, KeyError, TypeError):
    pass
  _memo[key] = _hash_bytes(path)
  try:  # atomic, so a concurrent reader sees the old memo or the new one
    memo.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(memo, lambda fh: json.dump({"key": list(key), "sha256": _memo[key]}, fh))
  except OSError:  # a read-only memo directory costs a re-hash next run, nothing else
    pass
  return _memo[key]


def model_dir(path: str | os.PathLike, memo_dir: str | os.PathLike) -> str:
  """Identity of a model directory's config.json and weight bytes (all safetensors files)."""
  path = Path(path)
  weights = sorted(path.glob("*.safetensors"))
  return _sha256([(path / "config.json").read_text(),
                  [(f.name, file_digest(f, memo_dir)) for f in weights]])


def code(fn) -> str:
  """Identity of a Python function: its name and the source of the module that defines it.

  The whole module, because a reward function reads module-level tables
  (word lists, weights) that its own source does not show.
  """
  module = inspect.getmodule(fn)
  try:
    source = inspect.getsource(module) if module is not None else inspect.getsource(fn)
  except (OSError, TypeError):  # defined interactively: the bytecode and constants stand in
    source = repr((fn.__code__.co_code, fn.__code__.co_consts))
  return _sha256([f"{fn.__module__}.{fn.__qualname__}", source])
