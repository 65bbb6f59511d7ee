"""Prompts and demonstrations for RL: build the paper's prompts, tokenise them, split.

RCfD needs every prompt x paired with a human demonstration y_d, so the data
pipeline's product is a list of (prompt ids, demonstration) pairs built the
way the paper builds them:
  continuation  Wikipedia (64-token prompt, continuation <= 320 tokens) and
                IMDB (first 10 tokens of a positive review; the rest is y_d);
  tldr          Reddit TL;DR comparisons at annotator confidence >= 5,
                prompt "Summarize: <post>", y_d = the chosen summary;
  columns       prompt and demonstration read from two columns.
Rows come through the `datasets` library from local files or a hub id
(rcfd_jax.sources); rcfd_jax.batching turns the prompts into fixed-shape
batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterator

import ml_collections
import numpy as np

from rcfd_jax import fingerprint, sources
from rcfd_jax.errors import UserError

FORMATS = ("columns", "continuation", "tldr")
OVERFLOWS = ("truncate", "drop", "error")
_SPLIT_KEY = 2**32 - 1  # seeds the train/validation split apart from the epoch permutations
_CHUNK = 1024  # rows tokenized per tokenizer call


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` section of a config; experiment configs copy and override it."""
  c = ml_collections.ConfigDict()
  c.path = ""  # local .jsonl/.json/.parquet/.csv file or directory, save_to_disk dir, or hub id
  c.hub_config = ""  # dataset config name for hub ids (e.g. "comparisons"); "" for none
  c.split = "train"  # split to read; carved into train and validation below
  c.format = "columns"  # "columns" | "continuation" | "tldr": how prompt and y_d are built
  c.prompt_column = "prompt"  # columns: the prompt text
  c.demo_column = "demonstration"  # columns: the demonstration text
  c.text_column = "text"  # continuation: the text split into prompt and demonstration
  c.label_column = ""  # keep only rows whose label equals label_value; "" disables the filter
  c.label_value = ""  # compared as text: "positive", or "1" for IMDB's integer labels
  c.prompt_tokens = 10  # continuation: the first N text tokens are the prompt (IMDB 10, Wikipedia 64)
  c.demo_max_tokens = 32  # demonstration tokens kept, EOS included: <= rollout.max_new_tokens
  c.prompt_template = "{prompt}"  # wraps the prompt text, e.g. "Summarize: {prompt}" for tldr
  c.min_confidence = 5  # tldr: keep comparisons with annotator confidence >= this (paper: 5)
  c.max_prompt_tokens = 64  # fixed prompt width, special tokens (BOS) included; longer prompts meet prompt_overflow
  c.prompt_overflow = "truncate"  # "truncate" (keep the last prompt tokens) | "drop" | "error"
  c.validation_fraction = 0.05  # share of prompts held out for evaluation
  c.validation_size = 0  # if > 0, the number of held-out examples (overrides the fraction)
  c.shuffle_seed = 0  # seeds the split and the per-epoch order of batches
  c.max_examples = 0  # keep the first N usable rows (after filters); 0 = all
  return c


@dataclasses.dataclass
class PromptDataset:
  """Tokenised prompts with their demonstrations; one entry per example."""
  prompt_ids: list[list[int]]  # policy tokens, special tokens included, <= max_prompt_tokens
  prompt_texts: list[str]  # what the reward models see as x
  demo_texts: list[str]  # y_d exactly as truncated to demo_ids (what the RM scores)
  demo_ids: list[list[int]]  # policy tokens of y_d, <= demo_max_tokens, EOS last
  extras: list[dict[str, Any]]  # the row's columns that were not consumed
  fingerprint: str  # cache key of demonstration rewards: config fields, tokenizer, file bytes

  def __len__(self) -> int:
    return len(self.prompt_ids)

  def subset(self, indices, name: str) -> PromptDataset:
    """The examples at `indices`, with a fingerprint that names the subset."""
    idx = [int(i) for i in indices]
    key = hashlib.sha256(f"{self.fingerprint}:{name}:{idx}".encode()).hexdigest()
    return PromptDataset([self.prompt_ids[i] for i in idx], [self.prompt_texts[i] for i in idx],
                         [self.demo_texts[i] for i in idx], [self.demo_ids[i] for i in idx],
                         [self.extras[i] for i in idx], key)


@dataclasses.dataclass
class DataSplits:
  """Train and held-out prompts; no prompt text is in both."""
  train: PromptDataset
  validation: PromptDataset


def load(config: ml_collections.ConfigDict, tokenizer) -> DataSplits:
  """Reads config.path, builds the prompts and splits them; the trainer's one entry point."""
  return split(load_prompts(config, tokenizer), config)


def _require_columns(columns, needed, path) -> None:
  for col in needed:
    if col not in columns:
      raise UserError(f"column '{col}' is not in {path}; available columns: "
                      f"{', '.join(columns)}")


def _subfields(feature) -> set[str]:
  """Field names of a struct column, or of the structs a list column holds."""
  inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", feature)
  return set(inner) if isinstance(inner, dict) else set()


def _require_tldr_fields(features, path) -> None:
  """The nested fields the tldr format reads; the hub's parquet conversion must keep them too."""
  needed = {"info": "post", "summaries": "text", "extra": "confidence"}
  missing = [f"{col}.{field}" for col, field in needed.items() if field not in _subfields(features[col])]
  if missing:
    raise UserError(f"the tldr format reads {', '.join(missing)}, which the rows of {path} lack; "
                    "point data.path at the TL;DR comparisons (openai/summarize_from_feedback, "
                    "config comparisons) or use format=columns")


def _text(value, column: str, row: int) -> str:
  if value is None:
    return ""
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      raise UserError(f"column '{column}' row {row} holds bytes that are not UTF-8 text; "
                      "re-encode the data as UTF-8") from None
  if not isinstance(value, str):
    raise UserError(f"column '{column}' row {row} holds {type(value).__name__}, not text")
  return value


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
  """Token ids of `texts`; the Rust backend directly when there is one (5x faster)."""
  if not texts:
    return []
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    return tokenizer(texts, add_special_tokens=special)["input_ids"]
  return [e.ids for e in backend.encode_batch(texts, add_special_tokens=special)]


# ---------------------------------------------------------------------- rows -> texts


@dataclasses.dataclass
class _Row:
  index: int  # row number in the file(s), for error messages
  prompt: str | list[int]  # text, or the prompt's content tokens (continuation)
  demo: str | list[int]  # text, or tokens (continuation)
  extras: dict[str, Any]


def _rows(ds, config, tokenizer) -> Iterator[_Row]:
  """Rows that pass the filters, in file order, as prompt/demonstration pairs."""
  fmt, path = config.format, config.path
  cols = list(ds.column_names)
  needed = {"columns": [config.prompt_column, config.demo_column],
            "continuation": [config.text_column],
            "tldr": ["info", "summaries", "choice", "extra"]}[fmt]
  _require_columns(cols, needed + ([config.label_column] if config.label_column else []), path)
  if fmt == "tldr":
    _require_tldr_fields(ds.features, path)
  consumed = set(needed) if fmt != "tldr" else {"info", "summaries"}
  start = 0
  for batch in ds.iter(batch_size=_CHUNK):
    n = len(batch[cols[0]])
    keep = [j for j in range(n) if not config.label_column
            or str(batch[config.label_column][j]) == str(config.label_value)]
    extras = [{c: batch[c][j] for c in cols if c not in consumed} for j in keep]
    if fmt == "columns":
      for j, ex in zip(keep, extras):
        prompt = _text(batch[config.prompt_column][j], config.prompt_column, start + j)
        demo = _text(batch[config.demo_column][j], config.demo_column, start + j)
        yield _Row(start + j, prompt, demo, ex)
    elif fmt == "continuation":
      texts = [_text(batch[config.text_column][j], config.text_column, start + j) for j in keep]
      ids = _encode(tokenizer, texts, special=False)
      for j, ex, t in zip(keep, extras, ids):
        if len(t) > config.prompt_tokens:  # too short to leave a demonstration: skipped
          yield _Row(start + j, t[:config.prompt_tokens], t[config.prompt_tokens:], ex)
    else:
      for j, ex in zip(keep, extras):
        confidence = (batch["extra"][j] or {}).get("confidence")
        info, summaries = batch["info"][j] or {}, batch["summaries"][j] or []
        post = _text(info.get("post"), "info.post", start + j)
        if confidence is None or confidence < config.min_confidence or not post.strip():
          continue  # low confidence, or a CNN/DM article row with no Reddit post
        choice = batch["choice"][j]
        if not isinstance(choice, int) or not 0 <= choice < len(summaries):
          raise UserError(f"tldr row {start + j}: choice {choice!r} does not index its "
                          f"{len(summaries)} summaries")
        demo = _text(summaries[choice].get("text"), "summaries.text", start + j)
        ex["info"] = {k: v for k, v in info.items() if k != "post"}
        yield _Row(start + j, post, demo, ex)
    start += n


# -------------------------------------------------------------------- tokenization


class _Prompter:
  """Applies the template and fits prompts into max_prompt_tokens."""

  def __init__(self, config, tokenizer):
    template = config.prompt_template
    if template.count("{prompt}") != 1:
      raise UserError(f"data.prompt_template must contain '{{prompt}}' once; got {template!r}")
    self.tok, self.config = tokenizer, config
    self.before, self.after = template.split("{prompt}")
    self.special = _encode(tokenizer, [""], special=True)[0]
    self.before_ids, self.after_ids = _encode(tokenizer, [self.before, self.after], special=False)
    self.room = config.max_prompt_tokens - len(self.special + self.before_ids + self.after_ids)
    if config.format == "continuation" and self.room < config.prompt_tokens:
      # prompt_tokens counts text tokens; the width must also hold what the tokenizer adds
      # (Llama's BOS) and the template, or the prompt would silently lose its first tokens.
      added = []
      if self.special:
        names = " ".join(tokenizer.convert_ids_to_tokens(self.special))
        added.append(f"{len(self.special)} the policy tokenizer adds ({names})")
      if self.before_ids or self.after_ids:
        added.append(f"{len(self.before_ids + self.after_ids)} of data.prompt_template")
      raise UserError(
          f"data.max_prompt_tokens={config.max_prompt_tokens} cannot hold a continuation prompt of "
          f"data.prompt_tokens={config.prompt_tokens} text tokens"
          + (f" plus {' and '.join(added)}" if added else "") + "; set "
          f"data.max_prompt_tokens={config.max_prompt_tokens - self.room + config.prompt_tokens}")

  def __call__(self, rows: list[_Row]) -> list[tuple[list[int], str] | None]:
    """(ids, text) per row, or None for a row that overflow="drop" drops."""
    texts = [r.prompt for r in rows if isinstance(r.prompt, str)]
    full = iter(_encode(self.tok, [self.before + t + self.after for t in texts], special=True))
    out = []
    for r in rows:
      if isinstance(r.prompt, str):
        ids, text = next(full), self.before + r.prompt + self.after
        if len(ids) <= self.config.max_prompt_tokens:
          out.append((ids, text))
          continue
        content = _encode(self.tok, [r.prompt], special=False)[0]
      else:
        content = r.prompt
      ids = self.special + self.before_ids + content + self.after_ids
      if len(ids) > self.config.max_prompt_tokens:
        if self.config.prompt_overflow == "drop":
          out.append(None)
          continue
        if self.config.prompt_overflow == "error" or self.room <= 0:
          raise UserError(
              f"row {r.index}: the prompt has {len(ids)} tokens, more than "
              f"data.max_prompt_tokens={self.config.max_prompt_tokens}"
              + (f" (the template alone takes {len(ids) - len(content)})" if self.room <= 0
                 else "; raise it or set data.prompt_overflow to truncate or drop"))
        content = content[len(content) - self.room:]  # keep the end, nearest the reply
        ids = self.special + self.before_ids + content + self.after_ids
      text = self.before + self.tok.decode(content, skip_special_tokens=True) + self.after
      out.append((ids, text))
    for r in rows:
      if isinstance(r.prompt, str) and not r.prompt.strip():
        raise UserError(f"row {r.index}: the prompt is empty; every example needs one")
    return out


def _demos(rows: list[_Row], config, tokenizer) -> list[tuple[list[int], str]]:
  """Demonstration ids truncated to demo_max_tokens with EOS last, and the matching text."""
  keep = config.demo_max_tokens - 1
  texts = [r.demo for r in rows if isinstance(r.demo, str)]
  for r in rows:
    if isinstance(r.demo, str) and not r.demo.strip():
      raise UserError(f"row {r.index}: the demonstration is empty; every prompt needs one "
                      "(filter such rows out of the data)")
  encoded = iter(_encode(tokenizer, texts, special=False))
  out = []
  for r in rows:
    ids = next(encoded) if isinstance(r.demo, str) else r.demo
    text = r.demo if isinstance(r.demo, str) and len(ids) <= keep else None
    ids = ids[:keep]
    text = text or tokenizer.decode(ids, skip_special_tokens=True)
    out.append((ids + [tokenizer.eos_token_id], text))
  return out


def _check_config(config, tokenizer) -> None:
  if config.format not in FORMATS:
    raise UserError(f"data.format must be one of {', '.join(FORMATS)}; got {config.format!r}")
  if config.prompt_overflow not in OVERFLOWS:
    raise UserError(f"data.prompt_overflow must be one of {', '.join(OVERFLOWS)}; "
                    f"got {config.prompt_overflow!r}")
  if config.demo_max_tokens < 2:
    raise UserError("data.demo_max_tokens must be >= 2 (one token and the EOS)")
  if config.max_prompt_tokens < 1 or (config.format == "continuation" and config.prompt_tokens < 1):
    raise UserError("data.max_prompt_tokens and data.prompt_tokens must be >= 1")
  if tokenizer.eos_token_id is None:
    raise UserError("the policy tokenizer has no EOS token; demonstrations must end with one")


def load_prompts(config: ml_collections.ConfigDict, tokenizer) -> PromptDataset:
  """All usable examples of config.path, built as config.format says, in file order."""
  _check_config(config, tokenizer)
  prompter = _Prompter(config, tokenizer)  # refuses a prompt width before any data is read
  ds, source_hash = sources.read(config)
  fields = {k: config[k] for k in (
      "split", "hub_config", "format", "prompt_column", "demo_column", "text_column",
      "label_column", "label_value", "prompt_tokens", "demo_max_tokens", "prompt_template",
      "min_confidence", "max_prompt_tokens", "prompt_overflow", "max_examples")}
  key = hashlib.sha256(json.dumps(
      [fields, fingerprint.tokenizer(tokenizer), source_hash], sort_keys=True).encode()).hexdigest()
  out = PromptDataset([], [], [], [], [], key)
  rows = _rows(ds, config, tokenizer)
  while not config.max_examples or len(out) < config.max_examples:
    chunk = [r for _, r in zip(range(_CHUNK), rows)]
    if not chunk:
      break
    for r, p, (d_ids, d_text) in zip(chunk, prompter(chunk), _demos(chunk, config, tokenizer)):
      if p is None or (config.max_examples and len(out) >= config.max_examples):
        continue
      out.prompt_ids.append(p[0])
      out.prompt_texts.append(p[1])
      out.demo_ids.append(d_ids)
      out.demo_texts.append(d_text)
      out.extras.append(r.extras)
  if not out.prompt_ids:
    filters = _filters(config)
    if not filters:
      raise UserError(f"no examples in {config.path}: it holds no rows")
    raise UserError(f"no examples left in {config.path} after filtering ({'; '.join(filters)}); "
                    "check the filters")
  return out


def _filters(config) -> list[str]:
  """The row filters this config sets, in words, for the error that says nothing passed them."""
  out = []
  if config.label_column:
    out.append(f"data.label_column {config.label_column!r} == {config.label_value!r}")
  if config.format == "continuation":
    out.append(f"texts longer than data.prompt_tokens={config.prompt_tokens} tokens")
  if config.format == "tldr":
    out.append(f"a Reddit post and annotator confidence >= data.min_confidence={config.min_confidence}")
  if config.prompt_overflow == "drop":
    out.append(f"prompts within data.max_prompt_tokens={config.max_prompt_tokens} "
               "(data.prompt_overflow=drop)")
  return out


# ------------------------------------------------------------------------- splitting


def split(ds: PromptDataset, config: ml_collections.ConfigDict) -> DataSplits:
  """Holds out whole prompts (seeded), so no prompt of the validation set is trained on.

  TL;DR has several comparisons per post: splitting rows would leak posts.
  """
  groups: dict[str, list[int]] = {}
  for i, text in enumerate(ds.prompt_texts):
    groups.setdefault(text, []).append(i)
  order = list(groups.values())
  size = config.validation_size or int(round(config.validation_fraction * len(ds)))
  if config.validation_fraction > 0 or config.validation_size > 0:
    size = max(size, 1)
  if not 0 <= config.validation_fraction < 1 or size >= len(ds) or config.validation_size < 0:
    raise UserError(f"data.validation_size/validation_fraction hold out {size} of {len(ds)} "
                    "examples; leave some for training")
  held: list[int] = []
  for g in np.random.default_rng([config.shuffle_seed, _SPLIT_KEY]).permutation(len(order)):
    if len(held) >= size:
      break
    held.extend(order[g])
  held_set = set(held)
  if len(held_set) == len(ds):
    raise UserError(f"validation took every example of {len(ds)} (few distinct prompts); "
                    "lower data.validation_size or validation_fraction")
  train = [i for i in range(len(ds)) if i not in held_set]
  return DataSplits(ds.subset(train, "train"), ds.subset(sorted(held_set), "validation"))
