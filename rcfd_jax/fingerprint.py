"""Content identities for cache keys and for deciding what may be shared.

A key that names a thing by where it lives or by its shape reuses stale
results when the thing changes in place (a tokenizer with new merges), so
every identity here is computed from content.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Tokenizer JSON fields that transformers rewrites on every padded or truncating
# call; they change no token id, so a used tokenizer keeps its identity.
_CALL_STATE = ("padding", "truncation")


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
