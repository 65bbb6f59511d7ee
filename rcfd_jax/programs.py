"""Every program one RL run compiles: what it computes, its shardings, its donation, its arguments.

    progs = programs.build(parts, frozen, rewards, sc, tx, state, config)   # name -> Program
    compiled, peaks = programs.compile_checked(progs, resident, limit, where, programs.advice(config))
                                                         # one UserError line if a program cannot fit

The trainer (rcfd_jax.train) calls the jitted functions; rcfd_jax.aot builds
the same programs over a TPU topology from abstract weights and compiles
them without running anything. Names:

  iteration          rollout + update fused (every reward inside the step), state donated
  rollout            sample, score, in-step rewards           } when a reward needs the host:
  reward_model       the RM on the host bridge's re-tokenized text } rollout, bridge, update
  update             objective, advantages, loss, optimizer   }
  demo_scoring       R(x, y_d) of a batch of demonstrations (once per dataset), and
  demo_reward_model  its RM on the host (when its batch differs from the ones above)
  eval_rollout       one sample per validation prompt at the evaluation temperature, and
  eval_reward_model  its RM on the host (when its batch differs)

Every [rows, ...] input and output is split over (data, fsdp) where the rows
divide (sharding.rows_sharding); parameters keep their logical shardings.
Arguments are jax.ShapeDtypeStructs carrying those shardings, so lowering
needs no data.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rcfd_jax import distributed, memory, sharding
from rcfd_jax.errors import UserError
from rcfd_jax.step import Batch, fold_rng, make_rollout, make_scorer, make_update

REWARD_MODELS = ("reward_model", "eval_reward_model", "demo_reward_model")


@dataclasses.dataclass(frozen=True)
class Program:
  fn: Callable                 # jax.jit-ed with explicit shardings (state donated where it is replaced)
  args: tuple                  # abstract arguments: ShapeDtypeStructs with their shardings
  resident: tuple[int, ...]    # positions of args that live on the devices for the whole run


def abstract_of(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of jax.Arrays or ShapeDtypeStructs."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _rows(mesh, shape, dtype) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.rows_sharding(mesh, shape))


def _rows_like(mesh, tree: Any) -> Any:
  return jax.tree.map(lambda x: _rows(mesh, x.shape, x.dtype), tree)


def _shardings(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, tree)


def _on(mesh, fn: Callable) -> Callable:
  """fn traced with `mesh` as the abstract mesh, so the models lay their activations out on it
  (sharding.constrain, layers.activations)."""

  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced


def chunked(rollout: Callable, chunks: int) -> Callable:
  """The rollout of B prompts as `chunks` sequential rollouts of B / chunks prompts (config.rollout.micro_batches).

  Only one chunk's KV cache and scoring activations are alive at a time.
  Chunk c holds prompts c, c + chunks, c + 2 * chunks, ...: with the prompts
  split over the devices in contiguous blocks, every chunk is spread evenly
  over all of them. Each chunk samples with its own key (the state's key
  folded with c); rows come back in prompt order, a prompt's samples adjacent.
  """
  if chunks == 1:
    return rollout

  def run(state, frozen, batch: Batch):
    split = lambda x: x.reshape(-1, chunks, *x.shape[1:]).swapaxes(0, 1)  # [chunks, B / chunks, ...]

    def one(c_and_batch):
      c, b = c_and_batch
      return rollout(state.replace(rng=fold_rng(state.rng, c)), frozen, b)

    out = jax.lax.map(one, (jnp.arange(chunks), jax.tree.map(split, batch)))
    prompts = batch.prompt_ids.shape[0] // chunks

    def merge(x):  # [chunks, prompts * k, ...] -> [prompts * chunks * k, ...] in prompt order
      x = x.reshape(chunks, prompts, -1, *x.shape[2:]).swapaxes(0, 1)
      return x.reshape(-1, *x.shape[3:])

    return jax.tree.map(merge, out)

  return run


def chunked_rows(fn: Callable, chunks: int) -> Callable:
  """fn(state, ids, mask) -> [rows] run on `chunks` sequential slices of the rows (same layout as chunked)."""
  if chunks == 1:
    return fn

  def run(state, ids, mask):
    split = lambda x: x.reshape(-1, chunks, *x.shape[1:]).swapaxes(0, 1)
    out = jax.lax.map(lambda a: fn(state, *a), (split(ids), split(mask)))
    return out.swapaxes(0, 1).reshape(-1)

  return run


def build(parts, frozen, rewards, sc, tx, state, config) -> dict[str, Program]:
  """The run's programs for `state` and `frozen` (arrays or abstract), with the trainer's shardings."""
  mesh = jax.tree.leaves(state.params)[0].sharding.mesh
  state, frozen = abstract_of(state), abstract_of(frozen)
  state_sh, frozen_sh = _shardings(state), _shardings(frozen)
  b, p, k = config.rollout.prompts_per_step, config.data.max_prompt_tokens, sc.samples_per_prompt
  batch = Batch(_rows(mesh, (b, p), jnp.int32), _rows(mesh, (b, p), jnp.bool_),
                _rows(mesh, (b, len(rewards.names)), jnp.float32))
  batch_sh = _shardings(batch)
  rollout = _on(mesh, chunked(make_rollout(parts, rewards, sc), config.rollout.micro_batches))
  update = _on(mesh, make_update(parts, rewards, tx, sc))
  progs: dict[str, Program] = {}
  if not rewards.needs_host:
    fused = jax.jit(lambda st, fr, bt: update(st, fr, rollout(st, fr, bt), None),
                    in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, None),
                    donate_argnums=0)
    progs["iteration"] = Program(fused, (state, frozen, batch), (0, 1))
  else:
    ro = _rows_like(mesh, jax.eval_shape(rollout, state, frozen, batch))
    progs["rollout"] = Program(
        jax.jit(rollout, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=_shardings(ro)),
        (state, frozen, batch), (0, 1))
    host = {s.name: _rows(mesh, (b * k,), jnp.float32) for s in rewards.sources if rewards.on_host_source(s)}
    progs["update"] = Program(
        jax.jit(update, in_shardings=(state_sh, frozen_sh, _shardings(ro), _shardings(host)),
                out_shardings=(state_sh, None), donate_argnums=0),
        (state, frozen, ro, host), (0, 1))
  eval_sc = dataclasses.replace(sc, samples_per_prompt=config.eval.samples_per_prompt,
                                temperature=config.eval.temperature,
                                metrics_every=1,  # evaluation reports the KL: always the reference
                                tilt_proposal="policy")  # and samples the policy, whatever trains it
  if eval_sc == sc and "rollout" in progs:  # the training rollout samples as the evaluation does
    progs["eval_rollout"] = progs["rollout"]
  else:
    eval_rollout = _on(mesh, chunked(make_rollout(parts, rewards, eval_sc), config.rollout.micro_batches))
    eval_out = _rows_like(mesh, jax.eval_shape(eval_rollout, state, frozen, batch))
    progs["eval_rollout"] = Program(
        jax.jit(eval_rollout, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=_shardings(eval_out)),
        (state, frozen, batch), (0, 1))
  n, d = config.reward.demo_batch_size, config.data.demo_max_tokens
  demo = (_rows(mesh, (n, p), jnp.int32), _rows(mesh, (n, p), jnp.bool_), _rows(mesh, (n, d), jnp.int32),
          _rows(mesh, (n, d), jnp.bool_))
  scorer = _on(mesh, make_scorer(parts, rewards))
  demo_out = _rows_like(mesh, jax.eval_shape(scorer, state.params, frozen, *demo))
  progs["demo_scoring"] = Program(
      jax.jit(scorer, in_shardings=(state_sh.params, frozen_sh, *_shardings(demo)),
              out_shardings=_shardings(demo_out)),
      (state.params, frozen) + demo, (0, 1))
  classifier = rewards.classifier
  if classifier is not None and not classifier.in_graph:
    rm_state = abstract_of(classifier.state)
    chunks = config.rollout.micro_batches  # the RM scores in the rollout's chunks where its rows divide
    for name, rows in zip(REWARD_MODELS, (b * k, b * config.eval.samples_per_prompt, n)):
      if any(pr.args[1].shape[0] == rows for nm, pr in progs.items() if nm in REWARD_MODELS):
        continue  # the same program already serves this many rows
      ids = (_rows(mesh, (rows, classifier.max_tokens), jnp.int32),
             _rows(mesh, (rows, classifier.max_tokens), jnp.bool_))
      progs[name] = Program(
          jax.jit(_on(mesh, chunked_rows(classifier.logits_fn(), chunks if rows % chunks == 0 else 1)),
                  in_shardings=(_shardings(rm_state), *_shardings(ids)),
                  out_shardings=sharding.rows_sharding(mesh, (rows,))),
          (rm_state,) + ids, (0,))
  return progs


def host_rm(progs: dict[str, Program], classifier) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
  """rm(ids, mask) -> host scores [rows]: the reward-model program compiled for that many rows."""

  def rm(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    prog = next(p for name, p in progs.items() if name in REWARD_MODELS and p.args[1].shape == ids.shape)
    out = prog.fn(classifier.state, sharding.put_global(ids, prog.args[1].sharding),
                  sharding.put_global(mask, prog.args[2].sharding))
    return distributed.to_host(out)

  return rm


# ----------------------------------------------------------------------------- compile and fit

def advice(config) -> str:
  """What the config can change when a program does not fit."""
  levers = [] if config.model.remat else ["set config.model.remat=True"]
  levers.append("raise config.optim.grad_accum or config.rollout.micro_batches")
  return ", ".join(levers) + ", or use more devices"

_UNITS = {"K": "KiB", "M": "MiB", "G": "GiB", "T": "TiB"}


def resident_bytes(state, frozen, rewards) -> int:
  """Per-device bytes that stay on the devices for the whole run: train state, frozen weights, host RM."""
  rm = rewards.classifier.state if rewards.classifier is not None and not rewards.classifier.in_graph else None
  return memory.tree_bytes((state, frozen, rm))


def peak_bytes(prog: Program, compiled, resident: int) -> int | None:
  """Per-device bytes while `prog` runs: everything resident, plus its temporaries, its new outputs
  (those not written into donated arguments) and its other arguments. None without XLA's analysis."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  others = memory.tree_bytes([a for i, a in enumerate(prog.args) if i not in prog.resident])
  return resident + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + others


def device_memory(config_gib: float, device) -> int | None:
  """Bytes one device may use: config.mesh.device_memory_gib when set, else what the backend reports."""
  if config_gib > 0:
    return int(config_gib * memory.GiB)
  try:
    stats = device.memory_stats()
  except Exception:  # devices that are only compiled for (a TPU topology) have no stats
    stats = None
  return (stats or {}).get("bytes_limit")


def compile_checked(progs: dict[str, Program], resident: int, limit: int | None, where: str,
                    hint: str) -> tuple[dict[str, Any], dict[str, int | None]]:
  """(name -> compiled program, name -> peak bytes per device), compiling one program at a time.

  The first program that cannot fit `limit` bytes per device (None: no
  limit known) stops everything with one UserError line naming it and its
  bytes: too big for the compiler itself (a TPU compiler refuses temporaries
  beyond the chip's HBM) or, with what stays resident, for `limit`; `hint`
  (advice(config)) says what to change.
  """
  compiled, peaks = {}, {}
  for name, p in progs.items():
    same = next((other for other, q in progs.items() if q is p and other in compiled), None)
    if same is not None:  # one program serving two names (the rollout also evaluates)
      compiled[name], peaks[name] = compiled[same], peaks[same]
      continue
    try:
      c = p.fn.lower(*p.args).compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      found = re.search(r"temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])", str(e))
      need = f"{found[1]} {_UNITS[found[2]]} of temporaries" if found else "more memory than it has"
      raise UserError(f"program {name!r} needs {need} per device, more than {where} has; {hint}") from None
    peak = peak_bytes(p, c, resident)
    if limit is not None and peak is not None and peak > limit:
      raise UserError(f"program {name!r} needs {memory.fmt(peak)} per device but {where} has "
                      f"{memory.fmt(limit)}; {hint}")
    compiled[name], peaks[name] = c, peak
  if jax.process_index() == 0:
    logging.info("memory per device (%s): %s", where, ", ".join(
        f"{name} {memory.fmt(v)}" for name, v in peaks.items() if v is not None))
  return compiled, peaks
