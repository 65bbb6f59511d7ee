"""The two supervised stages RCfD assumes before RL, as configs of one trainer.

    python -m rcfd_jax.main --config=configs/sft_tiny.py --workdir=runs/sft
    python -m rcfd_jax.main --config=configs/rm_tiny.py --workdir=runs/rm

stage "sft": next-token cross-entropy on the texts of a JSON-lines file, so
the policy writes text like the demonstrations (the paper's SFT policy).
stage "classifier": cross-entropy of a *ForSequenceClassification head on
text -> label, which gives the reward model whose logit RL calibrates.

Both stages share everything else: a Hugging Face directory to start from,
one jitted update (nnx.split, explicit in/out shardings, donated state,
AdamW with warmup + cosine and global-norm clipping), a data order fixed by
the seed, DIR/metrics.jsonl while training, DIR/eval.json on the held-out
examples at the end, and DIR/model/, a Hugging Face directory (weights,
config, tokenizer) that RL configs and transformers load directly.

Every text is encoded as the RL side sees text: the tokenizer's special
tokens, then the content, then EOS (demonstrations and sampled completions
both end in EOS), truncated to seq_len and right-padded. One text per row,
not packed: packing would let a review attend to the previous one and train
positions the rollouts never start from.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from rcfd_jax import files, metrics, models, optim, sharding
from rcfd_jax.errors import UserError, need
from rcfd_jax.models import hf

STAGES = ("sft", "classifier")
TASKS = {"sft": "causal_lm", "classifier": "seq_cls"}  # which head the start model is loaded with


def base_config() -> ml_collections.ConfigDict:
  """Every field of a supervised run; configs/sft_*.py and rm_*.py override some."""
  c = ml_collections.ConfigDict()
  c.stage = "sft"                   # sft (next-token LM loss) | classifier (text -> label)
  c.seed = 0                        # seeds the train/validation split and the data order
  c.total_steps = 500               # optimizer updates
  c.batch_size = 32                 # global examples per update (over all processes)
  c.seq_len = 128                   # tokens per example, EOS included; longer texts are truncated
  c.log_every_steps = 50            # metrics come off the device only on these steps (and the last)
  c.out_dir = "model"               # workdir subdirectory that receives the final HF model

  c.model = ml_collections.ConfigDict()
  c.model.path = ""                 # HF model directory (or hub id) to start from; its tokenizer is used

  c.data = ml_collections.ConfigDict()
  c.data.path = ""                  # JSON-lines file, one object per example
  c.data.text_column = "text"       # field holding the text
  c.data.label_column = "label"     # classifier: field holding the label (compared as text)
  c.data.labels = ("negative", "positive")  # classifier: label strings; index = class id
  c.data.skip_labels = ()           # classifier: labels whose rows are dropped (others must be in labels)
  c.data.validation_fraction = 0.05  # share of examples held out for eval.json
  c.data.validation_size = 0        # if > 0, the number held out (overrides the fraction)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3      # peak AdamW learning rate
  c.optim.warmup_steps = 50         # linear warmup from 0, then cosine decay to 0 at total_steps
  c.optim.weight_decay = 0.01       # decoupled decay on matrices only (not biases, norms)
  c.optim.max_grad_norm = 1.0       # global-norm clipping; 0 disables

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, -1, 1)         # (data, fsdp, tensor); -1 takes the remaining devices
  return c


# ---------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Examples:
  """Encoded examples: right-padded ids [N, T], mask [N, T] and class ids [N] (0 for sft)."""
  ids: np.ndarray
  mask: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, idx: np.ndarray) -> "Examples":
    return Examples(self.ids[idx], self.mask[idx], self.labels[idx])


def read_jsonl(path: str) -> list[dict]:
  """The objects of a JSON-lines file, with one clear error for each way it can be bad."""
  p = Path(path).expanduser()
  if not path or not p.is_file():
    raise UserError(f"data file {path!r} does not exist; set config.data.path to a JSON-lines file")
  rows = []
  with p.open(encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{p} line {n} is not valid JSON ({e.msg}); write one JSON object per line") from None
      if not isinstance(row, dict):
        raise UserError(f"{p} line {n} holds a {type(row).__name__}, not a JSON object")
      rows.append(row)
  if not rows:
    raise UserError(f"{p} holds no examples; point config.data.path at a non-empty JSON-lines file")
  return rows


def texts_and_labels(rows: list[dict], config) -> tuple[list[str], list[int]]:
  """Texts and class ids (0 for sft), checking columns and labels row by row."""
  d, path = config.data, config.data.path
  classify = config.stage == "classifier"
  class_of = {label: i for i, label in enumerate(d.labels)}
  texts, labels = [], []
  for n, row in enumerate(rows, 1):
    for column in (d.text_column, d.label_column) if classify else (d.text_column,):
      if column not in row:
        raise UserError(f"example {n} of {path} has no field {column!r} (it has {sorted(row)}); "
                        f"fix config.data.{'text' if column == d.text_column else 'label'}_column")
    text = row[d.text_column]
    if not isinstance(text, str):
      raise UserError(f"example {n} of {path}: field {d.text_column!r} holds {type(text).__name__}, not text")
    if classify:
      label = str(row[d.label_column])
      if label in d.skip_labels:
        continue
      if label not in class_of:
        raise UserError(f"example {n} of {path} has label {label!r}, which is neither in config.data.labels "
                        f"{tuple(d.labels)} nor in config.data.skip_labels {tuple(d.skip_labels)}")
      labels.append(class_of[label])
    else:
      labels.append(0)
    texts.append(text)
  if not texts:
    raise UserError(f"no usable examples in {path}: every row's label is in config.data.skip_labels")
  return texts, labels


def encode(texts: list[str], labels: list[int], tokenizer, seq_len: int) -> Examples:
  """Special tokens + text + EOS, truncated to seq_len, right-padded."""
  if getattr(tokenizer, "backend_tokenizer", None) is not None:  # the Rust tokenizer encodes the batch at once
    encoded = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=True)]
  else:
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  ids = np.full((len(texts), seq_len), pad, np.int32)
  mask = np.zeros((len(texts), seq_len), bool)
  for i, row in enumerate(encoded):
    row = (list(row) + [tokenizer.eos_token_id])[:seq_len]
    ids[i, :len(row)] = row
    mask[i, :len(row)] = True
  return Examples(ids, mask, np.asarray(labels, np.int32))


def split(examples: Examples, config) -> tuple[Examples, Examples]:
  """(train, validation), drawn by a permutation from the seed."""
  n = len(examples)
  d = config.data
  n_val = d.validation_size if d.validation_size > 0 else int(round(d.validation_fraction * n))
  if n_val >= n:
    raise UserError(f"holding out {n_val} of {n} examples leaves none to train on; "
                    "lower config.data.validation_size or validation_fraction")
  perm = np.random.default_rng([config.seed, 2**31 - 1]).permutation(n)
  return examples.take(np.sort(perm[n_val:])), examples.take(np.sort(perm[:n_val]))


class Order:
  """The global batch of each step: epochs of seeded permutations, read in sequence.

  A pure function of (seed, step), so a rerun sees the same batches.
  """

  def __init__(self, n: int, batch_size: int, seed: int):
    self.n, self.batch_size, self.seed = n, batch_size, seed
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
    return self._perms[epoch]

  def indices(self, step: int) -> np.ndarray:
    pos = step * self.batch_size + np.arange(self.batch_size)
    return np.array([self._perm(p // self.n)[p % self.n] for p in pos])


# ---------------------------------------------------------------------- losses

# A loss takes (model, batch) and returns sums over the batch's weighted
# examples: "count" plus one entry per reported metric. Sums, not means, so
# that evaluation can add them over batches.


def lm_sums(model, batch: dict) -> dict[str, jax.Array]:
  """Next-token cross-entropy on real tokens; padding and the first token carry no loss."""
  logits_btv = model(batch["ids"], attention_mask=batch["mask"])[:, :-1]
  targets_bt = batch["ids"][:, 1:]
  weight_bt = (batch["mask"][:, 1:] & batch["mask"][:, :-1]) * batch["weight"][:, None]
  logp_btv = jax.nn.log_softmax(logits_btv, axis=-1)
  # A masked sum rather than a gather: stays local when the vocabulary is sharded.
  hit_btv = jnp.arange(logp_btv.shape[-1]) == targets_bt[..., None]
  logp_bt = jnp.sum(jnp.where(hit_btv, logp_btv, 0.0), axis=-1)
  correct_bt = jnp.argmax(logits_btv, axis=-1) == targets_bt
  return {"count": weight_bt.sum(), "loss": -(logp_bt * weight_bt).sum(),
          "token_accuracy": (correct_bt * weight_bt).sum()}


def classifier_sums(model, batch: dict) -> dict[str, jax.Array]:
  """Cross-entropy of the class logits on each example's label."""
  logits_bc = model(batch["ids"], attention_mask=batch["mask"])
  logp_bc = jax.nn.log_softmax(logits_bc, axis=-1)
  hit_bc = jnp.arange(logp_bc.shape[-1]) == batch["labels"][:, None]
  nll_b = -jnp.sum(jnp.where(hit_bc, logp_bc, 0.0), axis=-1)
  correct_b = jnp.argmax(logits_bc, axis=-1) == batch["labels"]
  w_b = batch["weight"]
  return {"count": w_b.sum(), "loss": (nll_b * w_b).sum(), "accuracy": (correct_b * w_b).sum()}


LOSSES: dict[str, Callable] = {"sft": lm_sums, "classifier": classifier_sums}


# ---------------------------------------------------------------------- optimisation


@flax.struct.dataclass
class State:
  """Everything the update changes; donated to it each step."""
  step: jax.Array
  params: nnx.State
  opt_state: Any


def optimizer(c, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW on a warmup + cosine schedule, after optional global-norm clipping."""
  warmup = min(c.warmup_steps, max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, warmup, max(total_steps, warmup + 1))
  decay_matrices = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optim.adamw(schedule, c.max_grad_norm, c.weight_decay, mask=decay_matrices), schedule


def make_update(graphdef, rest, sums_fn, tx, schedule):
  """(state, batch) -> (state, metrics): one optimizer step on the mean loss."""

  def update(state: State, batch: dict):
    def objective(params):
      sums = sums_fn(nnx.merge(graphdef, params, rest), batch)
      return sums["loss"] / jnp.maximum(sums["count"], 1.0), sums

    (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    count = jnp.maximum(sums["count"], 1.0)
    metrics = {k: v / count for k, v in sums.items() if k != "count"}
    metrics.update(grad_norm=optax.global_norm(grads), learning_rate=schedule(state.step))
    return State(state.step + 1, params, opt_state), metrics

  return update


# ---------------------------------------------------------------------- the run


def check(config, model, num_processes: int) -> None:
  """Config mistakes that would otherwise surface as shape errors deep in jit."""
  need(config.total_steps > 0, "config.total_steps must be positive")
  need(config.batch_size > 0 and config.batch_size % num_processes == 0,
       f"config.batch_size={config.batch_size} must be a positive multiple of the {num_processes} processes")
  need(2 <= config.seq_len <= model.config.max_positions,
       f"config.seq_len={config.seq_len} must lie in [2, {model.config.max_positions}] (the model's context)")
  need(config.log_every_steps > 0, "config.log_every_steps must be positive")
  if config.stage == "classifier":
    labels = tuple(config.data.labels)
    need(len(labels) >= 2 and len(set(labels)) == len(labels),
         f"config.data.labels={labels} must name at least two distinct labels")
    need(model.config.num_labels == len(labels),
         f"{config.model.path} has {model.config.num_labels} class logits but config.data.labels has "
         f"{len(labels)} labels; make them agree")


def start_model(config, mesh) -> nnx.Module:
  """The model to train, sharded on `mesh`.

  A classifier may start from a causal LM directory (the SFT policy, as the
  paper's reward models start from a pretrained LM): its trunk is copied and
  a fresh score head with one logit per label is drawn from config.seed.
  """
  task = TASKS[config.stage]
  hf_config = hf.read_config(hf.resolve_dir(config.model.path))
  if task == "causal_lm" or models.task_of(hf_config) == "seq_cls":
    return models.load_pretrained(config.model.path, task=task, mesh=mesh)
  lm = models.load_pretrained(config.model.path, task="causal_lm", mesh=mesh)
  arch = [a.replace("LMHeadModel", "ForSequenceClassification").replace("ForCausalLM", "ForSequenceClassification")
          for a in hf_config.get("architectures") or []]
  model = models.build(dict(hf_config, num_labels=len(config.data.labels), architectures=arch), task="seq_cls",
                       mesh=mesh, seed=config.seed)
  trunk = dict(nnx.to_flat_state(nnx.state(lm, nnx.Param)))
  mine = nnx.to_flat_state(nnx.state(model, nnx.Param))
  nnx.update(model, nnx.from_flat_state([(k, trunk[k]) for k, _ in mine if k in trunk]))
  logging.info("classifier starts from the causal LM %s with a new %d-label head",
               config.model.path, len(config.data.labels))
  return model


def _device_batch(ex: Examples, weight: np.ndarray, mesh) -> dict:
  """This process's rows of a global batch, as arrays sharded over (data, fsdp)."""
  lo, n = jax.process_index() * len(ex) // jax.process_count(), len(ex) // jax.process_count()
  host = {"ids": ex.ids, "mask": ex.mask, "labels": ex.labels, "weight": weight.astype(np.float32)}
  return {k: sharding.put_rows(v[lo:lo + n], len(ex), mesh) for k, v in host.items()}


def evaluate(sums_j, params, ex: Examples, batch_size: int, mesh) -> dict[str, float]:
  """Metrics over all of `ex`; the last batch is padded with zero-weight rows."""
  total: dict[str, float] = {}
  for lo in range(0, len(ex), batch_size):
    idx = np.arange(lo, lo + batch_size)
    weight = (idx < len(ex)).astype(np.float32)
    batch = _device_batch(ex.take(np.minimum(idx, len(ex) - 1)), weight, mesh)
    for k, v in jax.device_get(sums_j(params, batch)).items():
      total[k] = total.get(k, 0.0) + float(v)
  count = max(total.pop("count", 0.0), 1.0)
  return {k: v / count for k, v in total.items()}


def unigram_entropy(ex: Examples) -> float:
  """Entropy (nats/token) of the predicted tokens' unigram distribution: the loss of a model without context."""
  targets = ex.ids[:, 1:][ex.mask[:, 1:]]
  p = np.bincount(targets) / max(len(targets), 1)
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def _write_json(path: Path, obj) -> None:
  if jax.process_index() == 0:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def run(config, workdir: str) -> dict[str, float]:
  """Trains config.stage from config.model.path; returns the validation metrics (eval.json)."""
  if config.stage not in STAGES:
    raise UserError(f"config.stage={config.stage!r}; use one of {STAGES}")
  if not config.model.path:
    raise UserError("config.model.path is empty; set it to the HF model directory to start from")
  wd = files.prepare_workdir(workdir)
  texts, labels = texts_and_labels(read_jsonl(config.data.path), config)  # data errors before any loading
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  tokenizer = hf.load_tokenizer(config.model.path)
  model = start_model(config, mesh)
  check(config, model, jax.process_count())
  train, val = split(encode(texts, labels, tokenizer, config.seq_len), config)
  truncated = float(np.mean(train.mask[:, -1]))
  logging.info("%s: %d train / %d validation examples, %.1f%% truncated to %d tokens",
               config.stage, len(train), len(val), 100 * truncated, config.seq_len)
  _write_json(wd / "config.json", json.loads(config.to_json_best_effort()))

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, schedule = optimizer(config.optim, config.total_steps)
  rep = sharding.replicated(mesh)
  param_sh, opt_sh = optim.shardings(tx, params, mesh)
  state_sh = State(step=rep, params=param_sh, opt_state=opt_sh)
  state = sharding.run_placed(lambda p: State(jnp.zeros((), jnp.int32), p, tx.init(p)), state_sh, params)

  sums_fn = LOSSES[config.stage]
  order = Order(len(train), config.batch_size, config.seed)
  ones = np.ones(config.batch_size, np.float32)
  first = _device_batch(train.take(order.indices(0)), ones, mesh)
  batch_sh = jax.tree.map(lambda x: x.sharding, first)
  t0 = time.perf_counter()
  update = jax.jit(make_update(graphdef, rest, sums_fn, tx, schedule), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, rep), donate_argnums=0).lower(state, first).compile()
  logging.info("compiled the update in %.1fs", time.perf_counter() - t0)

  writer = metrics.MetricsWriter(wd, config.total_steps)
  writer.truncate_after(0)  # a supervised run starts afresh; no records from an earlier one
  t_last, tokens, t_start = time.perf_counter(), 0, time.perf_counter()
  for step in range(config.total_steps):
    host = train.take(order.indices(step))
    state, m = update(state, first if step == 0 else _device_batch(host, ones, mesh))
    tokens += int(host.mask.sum())
    done = step + 1
    if done % config.log_every_steps == 0 or done == config.total_steps:
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      now = time.perf_counter()
      m["tokens_per_second"] = tokens / max(now - t_last, 1e-9)
      t_last, tokens = now, 0
      logging.info("step %d: %s", done, ", ".join(f"{k}={v:.4g}" for k, v in m.items()))
      writer.write(done, m)
  writer.close()
  train_seconds = time.perf_counter() - t_start

  sums_j = jax.jit(lambda p, b: sums_fn(nnx.merge(graphdef, p, rest), b), in_shardings=(param_sh, batch_sh))
  result = evaluate(sums_j, state.params, val, config.batch_size, mesh) if len(val) else {}
  result = {f"validation_{k}": v for k, v in result.items()}
  result.update(validation_examples=len(val), train_examples=len(train), steps=config.total_steps,
                train_seconds=train_seconds, truncated_fraction=truncated)
  if config.stage == "sft":
    result["unigram_entropy"] = unigram_entropy(train)  # the loss to beat by far
  _write_json(wd / "eval.json", result)

  out = models.save_pretrained(nnx.merge(graphdef, state.params, rest), wd / config.out_dir, tokenizer=tokenizer)
  if config.stage == "classifier" and jax.process_index() == 0:
    _name_labels(out / "config.json", tuple(config.data.labels))
  logging.info("wrote %s and %s", wd / "eval.json", out)
  return result


def _name_labels(config_json: Path, labels: tuple[str, ...]) -> None:
  """Puts the label strings into id2label/label2id, so pipelines print "positive", not LABEL_1."""
  cfg = json.loads(config_json.read_text())
  cfg["id2label"] = {str(i): label for i, label in enumerate(labels)}
  cfg["label2id"] = {label: i for i, label in enumerate(labels)}
  config_json.write_text(json.dumps(cfg, indent=2))
