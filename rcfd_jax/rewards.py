"""Reward sources: one number per (prompt, completion), stacked into a reward vector.

Kinds (config.reward.sources lists names; each name's kind is its prefix):
  loglik       mean per-token log-likelihood of the completion under the frozen
               initial policy (use case 1), rl.mean_token_logprob of the
               reference log-probs that the step also reads for the KL.
  length       -|y| in tokens.
  classifier   a *ForSequenceClassification reward model: the logit of
               config.reward.classifier.label_index (IMDB positive class; 0 for a
               preference RM's scalar score).
  function     a registered Python function of (prompts, completions, rows).
  words        words:LEXICON, a lexicon word count (words:sentiment is
               sentiment_words) run on token ids inside the step (rcfd_jax.words).

A classifier whose tokenizer is the policy's runs inside the jitted step on
the token ids. Otherwise (the paper's DistilBERT and DeBERTa RMs) the host
decodes the completions and re-tokenizes them for the RM between the rollout
and the update (the "bridge"); its time is reported as bridge_seconds.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rcfd_jax import fingerprint, models, rl, words
from rcfd_jax.errors import UserError
from rcfd_jax.models import hf
from rcfd_jax.words import NEGATIVE_WORDS, POSITIVE_WORDS

KINDS = ("loglik", "length", "classifier", "function", "words")

# name -> fn(prompts: list[str], completions: list[str], rows: list[dict]) -> sequence of floats
FUNCTIONS: dict[str, Callable[[list[str], list[str], list[dict]], Sequence[float]]] = {}


def register(name: str):
  """Decorator that makes a Python reward function available as config.reward.function.name."""

  def deco(fn):
    FUNCTIONS[name] = fn
    return fn

  return deco


@register("sentiment_words")
def sentiment_words(prompts, completions, rows):
  """Positive minus negative sentiment words in the completion: a programmatic reward."""
  del prompts, rows
  out = []
  for text in completions:
    words = [w.strip(".,!?;:\"'()").lower() for w in text.split()]
    out.append(float(sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)))
  return out


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  kind: str


def parse_sources(names: Sequence[str]) -> list[Source]:
  if not names:
    raise UserError("config.reward.sources is empty; list at least one of " + ", ".join(KINDS))
  out = []
  for n in names:
    kind = n.split(":")[0]
    if kind not in KINDS:
      raise UserError(f"unknown reward source {n!r} in config.reward.sources; use one of {', '.join(KINDS)}")
    out.append(Source(n, kind))
  if len({s.name for s in out}) != len(out):
    raise UserError(f"config.reward.sources lists a source twice: {list(names)}")
  return out


@dataclasses.dataclass
class Classifier:
  """A reward model and how its inputs are made."""
  graphdef: Any
  state: nnx.State
  tokenizer: Any
  in_graph: bool          # shares the policy's tokenizer: runs inside the jitted step
  label_index: int
  max_tokens: int
  input: str              # "concat": RM reads prompt + completion; "pair": tokenizer(prompt, completion)
  model_dir: Path         # its weights' content names its demonstration rewards in the cache
  tokenizer_fp: str | None  # fingerprint.tokenizer of its tokenizer (None when built without one)

  def logits_fn(self):
    label = self.label_index

    def fn(state, ids, mask):
      return nnx.merge(self.graphdef, state)(ids, attention_mask=mask)[:, label]

    return fn

  def check_reads(self, texts: list[str], max_unknown: float = 0.5) -> None:
    """Refuses an RM whose tokenizer maps most of `texts` to its unknown token.

    Such an RM (another language's vocabulary, say) scores every completion
    as the same string of unknowns, so its reward carries no signal.
    """
    unk = self.tokenizer.unk_token_id
    if self.in_graph or unk is None or not texts:
      return
    ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    total = sum(len(i) for i in ids)
    unknown = sum(t == unk for i in ids for t in i)
    if total and unknown / total > max_unknown:
      raise UserError(f"the reward model's tokenizer reads {unknown / total:.0%} of the prompt and demonstration "
                      f"tokens as unknown ({self.tokenizer.unk_token}); its vocabulary cannot read this data "
                      "or the policy's text: use a reward model trained on this language")

  def encode(self, prompts: list[str], completions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Host bridge: (ids, mask) [rows, max_tokens] from the RM's own tokenizer, fixed shapes.

    The RM program (rcfd_jax.programs, "reward_model") then scores them.
    """
    if self.input == "pair":  # preference RMs read (question, answer) pairs
      enc = self.tokenizer(prompts, completions, padding="max_length", truncation=True,
                           max_length=self.max_tokens, return_tensors="np")
    else:
      enc = self.tokenizer([p + c for p, c in zip(prompts, completions)], padding="max_length",
                           truncation=True, max_length=self.max_tokens, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)


def load_rm_tokenizer(model_dir):
  """The reward model's tokenizer, padding with eos where it has no pad token."""
  tok = hf.open_tokenizer(model_dir, "the reward model's tokenizer")
  if tok.pad_token is None:  # the bridge pads to max_tokens; the mask hides the pad id
    if tok.eos_token is None:
      raise UserError(f"the reward model's tokenizer in {model_dir} has neither a pad nor an eos token; "
                      "set pad_token in its tokenizer_config.json")
    tok.pad_token = tok.eos_token
  return tok


def load_classifier(cfg, policy_tokenizer, mesh, load=models.load_pretrained,
                    load_tokenizer=load_rm_tokenizer) -> Classifier:
  """Loads config.reward.classifier.path and decides whether it can run in the step.

  `load` and `load_tokenizer` are models.load_pretrained and load_rm_tokenizer
  for training; rcfd_jax.aot passes models.load_abstract and a loader that
  returns None where a directory holds only config.json. Without both
  tokenizers, a decoder RM is taken to share the policy's (an encoder never does).
  """
  model_dir = hf.resolve_dir(cfg.path)
  model = load(str(model_dir), task="seq_cls", mesh=mesh)
  n_labels = model.config.num_labels
  if not 0 <= cfg.label_index < n_labels:
    raise UserError(f"config.reward.classifier.label_index={cfg.label_index} but {cfg.path} has "
                    f"{n_labels} labels")
  tok = load_tokenizer(model_dir)
  # In the step the RM reads the policy's token ids: only a tokenizer that makes the same ids
  # from any text (vocabulary, merges, normalizer, special tokens) may skip re-tokenizing.
  tokenizer_fp = fingerprint.tokenizer(tok) if tok is not None else None
  same_tokenizer = (tok is None or policy_tokenizer is None
                    or tokenizer_fp == fingerprint.tokenizer(policy_tokenizer))
  in_graph = model.config.model_type in ("gpt2", "llama", "qwen2", "mistral") and same_tokenizer
  graphdef, state = nnx.split(model)
  if cfg.input not in ("concat", "pair"):
    raise UserError(f"config.reward.classifier.input={cfg.input!r}; use concat or pair")
  in_graph = in_graph and cfg.input == "concat"
  return Classifier(graphdef, state, tok, in_graph, cfg.label_index, cfg.max_tokens, cfg.input,
                    model_dir, tokenizer_fp)


def length_reward(completion_mask_bn: jax.Array) -> jax.Array:
  return -completion_mask_bn.sum(-1).astype(jnp.float32)


@dataclasses.dataclass
class Rewards:
  """The configured reward sources, split into in-step and host-side ones."""
  sources: list[Source]
  classifier: Classifier | None
  function: Callable | None
  automata: dict[str, words.TokenAutomaton] = dataclasses.field(default_factory=dict)

  @property
  def names(self) -> list[str]:
    return [s.name for s in self.sources]

  @property
  def needs_host(self) -> bool:
    """True when some reward must be computed on the host between rollout and update."""
    return any(self.on_host_source(s) for s in self.sources)

  def on_host_source(self, s: Source) -> bool:
    """Whether source `s` is computed on the host (a Python function, or an RM with its own tokenizer)."""
    return s.kind == "function" or (s.kind == "classifier" and not self.classifier.in_graph)

  def in_graph(self, rm_state, seq_ids, seq_mask, completion_mask, ref_logp) -> dict[str, jax.Array]:
    """Rewards computable inside the jitted step; host ones are left out."""
    out = {}
    for s in self.sources:
      if s.kind == "loglik":
        out[s.name] = rl.mean_token_logprob(ref_logp, completion_mask)
      elif s.kind == "length":
        out[s.name] = length_reward(completion_mask)
      elif s.kind == "words":
        out[s.name] = words.reward(self.automata[s.name], seq_ids[:, -completion_mask.shape[1]:], completion_mask)
      elif s.kind == "classifier" and self.classifier.in_graph:
        out[s.name] = self.classifier.logits_fn()(rm_state, seq_ids, seq_mask).astype(jnp.float32)
    return out

  def on_host(self, prompts: list[str], completions: list[str], rows: list[dict],
              rm: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Rewards that need text: the RM bridge and Python functions.

    rm(ids, mask) -> [rows] scores: the compiled reward-model program for this
    many rows (programs.host_forward), needed when the classifier runs on the host.
    """
    out = {}
    for s in self.sources:
      if s.kind == "classifier" and not self.classifier.in_graph:
        out[s.name] = np.asarray(rm(*self.classifier.encode(prompts, completions)), np.float32)
      elif s.kind == "function":
        vals = np.asarray(self.function(prompts, completions, rows), np.float32)
        if vals.shape != (len(completions),):
          raise UserError(f"reward function returned shape {vals.shape}, expected ({len(completions)},)")
        out[s.name] = vals
    return out

  def stack(self, parts: dict[str, Any]) -> Any:
    """[B, K] reward matrix in config order."""
    xp = jnp if any(isinstance(v, jax.Array) for v in parts.values()) else np
    return xp.stack([xp.asarray(parts[n], dtype=xp.float32) for n in self.names], axis=-1)


def build(cfg, policy_tokenizer, mesh, load=models.load_pretrained, load_tokenizer=load_rm_tokenizer) -> Rewards:
  """Rewards from config.reward (sources, classifier, function); load_classifier says what the loaders are."""
  sources = parse_sources(cfg.sources)
  kinds = {s.kind for s in sources}
  classifier = (load_classifier(cfg.classifier, policy_tokenizer, mesh, load, load_tokenizer)
                if "classifier" in kinds else None)
  function = None
  if "function" in kinds:
    if cfg.function.module:
      try:
        importlib.import_module(cfg.function.module)
      except ImportError as e:
        raise UserError(f"cannot import config.reward.function.module={cfg.function.module!r}: {e}") from None
    if cfg.function.name not in FUNCTIONS:
      raise UserError(f"config.reward.function.name={cfg.function.name!r} is not registered; "
                      f"registered: {', '.join(sorted(FUNCTIONS))}")
    function = FUNCTIONS[cfg.function.name]
  if sum(s.kind == "classifier" for s in sources) > 1 or sum(s.kind == "function" for s in sources) > 1:
    raise UserError("config.reward.sources may name at most one classifier and one function")
  automata = {}
  for s in sources:
    if s.kind == "words":
      lexicon = s.name.partition(":")[2]
      if policy_tokenizer is None:
        raise UserError(f"reward source {s.name!r} needs the policy's tokenizer; pass a policy directory that holds one")
      if lexicon not in words.lexicons():
        raise UserError(f"reward source {s.name!r}: unknown lexicon; use words:" + " | words:".join(words.lexicons()))
      automata[s.name] = words.compile_tokens(words.lexicons()[lexicon], policy_tokenizer)
  return Rewards(sources, classifier, function, automata)


class Timer:
  """Wall time of a block, for the bridge metric."""

  def __enter__(self):
    self.t0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.t0
