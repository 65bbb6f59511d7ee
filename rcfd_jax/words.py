"""Word-count rewards computed on token ids inside the jitted step.

rewards.sentiment_words counts lexicon words in the decoded completion:
split on whitespace, strip .,!?;:"'() from both ends, lower-case, look up.
Most lexicon words are several BPE tokens (" good" is " go", "o", "d" in the
tiny tokenizer), and a sampled completion can spell a word with any split,
so a per-token score table would be wrong. Instead this module compiles the
rule into a finite automaton over bytes (prefix trie of the lexicon plus
"leading punctuation" and "trailing punctuation" states) and lifts it to
whole tokens once, on the host:

    next_state[S, V]   state after reading token v from state s
    emitted[S, V]      score of the words that token v closes (a leading space)
    final[S]           score of the word open at the end of the completion

The step then runs a scan over the N completion tokens with two gathers per
token: no decode, no host round trip. It matches the Python function on the
decoded text exactly, except for words touching non-ASCII characters that
Python treats as whitespace or lower-cases to ASCII (U+00A0, the Kelvin sign):
those bytes count as ordinary letters here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

STRIP = b".,!?;:\"'()"
WHITESPACE = bytes(b for b in range(128) if chr(b).isspace())
DEAD, OPEN = 0, 1  # no lexicon word possible until the next whitespace; only punctuation so far

# The sentiment lexicon: rewards.sentiment_words counts these on text, words:sentiment on token ids.
POSITIVE_WORDS = frozenset(
    "good great excellent wonderful amazing brilliant superb delightful moving beautiful "
    "fantastic lovely charming perfect masterful enjoyable touching memorable best love loved".split())
NEGATIVE_WORDS = frozenset(
    "bad terrible awful boring dull poor weak horrible dreadful mediocre painful tedious "
    "forgettable worst hate hated mess clumsy bland".split())


def lexicons() -> dict[str, dict[str, float]]:
  return {"sentiment": {**{w: 1.0 for w in POSITIVE_WORDS}, **{w: -1.0 for w in NEGATIVE_WORDS}}}


def byte_automaton(lexicon: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
  """(next_state [S, 256] int32, score [S] float32) of the byte-level word matcher.

  Whitespace bytes are not handled here (the token lifter resets at them).
  """
  children: list[dict[int, int]] = [{}, {}]  # DEAD, OPEN
  score = [0.0, 0.0]
  post: dict[float, int] = {}  # trailing-punctuation state of each distinct word score
  for word, s in lexicon.items():
    w = word.lower().encode()
    if not w or any(c in STRIP + WHITESPACE for c in w):
      raise ValueError(f"lexicon word {word!r} is empty or holds punctuation/whitespace")
    node = OPEN
    for c in w:
      if c not in children[node]:
        children.append({})
        score.append(0.0)
        children[node][c] = len(children) - 1
      node = children[node][c]
    score[node] = s
  for s in sorted({x for x in score if x != 0.0}):
    children.append({})
    score.append(s)
    post[s] = len(children) - 1
  n = len(children)
  nxt = np.zeros((n, 256), np.int32)  # default: DEAD
  for state in range(n):
    for b in range(256):
      c = b + 32 if 65 <= b <= 90 else b  # ASCII lower-case
      if state == OPEN and c in STRIP:
        nxt[state, b] = OPEN
      elif state in post.values():
        nxt[state, b] = state if c in STRIP else DEAD
      elif c in children[state] and state != DEAD:
        nxt[state, b] = children[state][c]
      elif c in STRIP and score[state] != 0.0:
        nxt[state, b] = post[score[state]]
  return nxt, np.asarray(score, np.float32)


@dataclasses.dataclass(frozen=True)
class TokenAutomaton:
  next_state: np.ndarray  # [S, V] int32
  emitted: np.ndarray     # [S, V] float32
  final: np.ndarray       # [S] float32


def token_bytes(tokenizer) -> list[bytes]:
  """What each id contributes to the decoded text (special tokens: nothing)."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  inv = {u: b for b, u in bytes_to_unicode().items()}
  special = set(tokenizer.all_special_ids)
  out = []
  for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
    if i in special or t is None:
      out.append(b"")
    elif all(ch in inv for ch in t):
      out.append(bytes(inv[ch] for ch in t))
    else:
      raise ValueError(f"token {i} ({t!r}) is not byte-level BPE; the words reward needs a byte-level tokenizer")
  return out


def compile_tokens(lexicon: dict[str, float], tokenizer) -> TokenAutomaton:
  """Lifts the byte automaton to whole tokens of a byte-level BPE tokenizer."""
  nxt_b, score = byte_automaton(lexicon)
  toks = token_bytes(tokenizer)
  s_all = np.arange(len(score), dtype=np.int32)
  next_state = np.empty((len(score), len(toks)), np.int32)
  emitted = np.zeros((len(score), len(toks)), np.float32)
  for v, bs in enumerate(toks):
    state = s_all.copy()
    for b in bs:
      if b in WHITESPACE:
        emitted[:, v] += score[state]
        state = np.full_like(state, OPEN)
      else:
        state = nxt_b[state, b]
    next_state[:, v] = state
  return TokenAutomaton(next_state, emitted, score)


def reward(automaton: TokenAutomaton, tokens_bn: jax.Array, mask_bn: jax.Array) -> jax.Array:
  """[B] lexicon score of each completion (tokens outside the mask are ignored)."""
  nxt, emit = jnp.asarray(automaton.next_state), jnp.asarray(automaton.emitted)

  def body(carry, x):
    state, total = carry
    tok, m = x
    total = total + jnp.where(m, emit[state, tok], 0.0)
    state = jnp.where(m, nxt[state, tok], state)
    return (state, total), None

  b = tokens_bn.shape[0]
  init = (jnp.full((b,), OPEN, jnp.int32), jnp.zeros((b,), jnp.float32))
  (state, total), _ = jax.lax.scan(body, init, (tokens_bn.T, mask_bn.T))
  return total + jnp.asarray(automaton.final)[state]
