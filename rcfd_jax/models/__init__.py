"""Flax NNX models that read and write Hugging Face checkpoints.

    from rcfd_jax import models
    model = models.load_pretrained(path_or_hub_id)     # safetensors only
    logits = model(input_ids, attention_mask=mask)     # [B, T, V] causal LM, [B, labels] classifier
    models.save_pretrained(model, out_dir)             # transformers loads out_dir
    abstract = models.load_abstract(path, mesh=mesh)   # config.json only: ShapeDtypeStruct leaves, sharded

Causal LMs also implement the decoding protocol the sampler uses:
    cache = model.init_cache(batch, max_len)
    logits, cache = model.decode(ids, positions, cache, key_valid, index)
and `model(ids, attention_mask, positions=..., return_hidden=True)` returns
(logits, hidden) for value heads.

A family module (gpt2, llama, bert, distilbert, deberta_v2) provides:
    MODEL_TYPES                    model_type strings of config.json it reads
    config_from_hf(dict) -> Config (frozen dataclass; .to_hf() gives config.json back)
    build(config, task, *, dtype, param_dtype, rngs) -> nnx.Module
    tensors(config, task) -> list[hf.Tensor]   our path <-> HF tensor name
    TASKS                          the tasks it builds: "causal_lm", "seq_cls"
Every built module keeps `.config` and `.task` so it can be saved again.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rcfd_jax import sharding
from rcfd_jax.errors import UserError
from rcfd_jax.models import hf

_FAMILIES: dict[str, str] = {}


def _register(module_name: str, model_types: tuple[str, ...]):
  for t in model_types:
    _FAMILIES[t] = module_name


_register("gpt2", ("gpt2",))
_register("llama", ("llama", "qwen2", "mistral"))
_register("bert", ("bert", "distilbert"))
_register("deberta_v2", ("deberta-v2",))


def family(model_type: str) -> ModuleType:
  """The family module that implements a config.json model_type."""
  import importlib
  if model_type not in _FAMILIES:
    raise UserError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(_FAMILIES))}")
  return importlib.import_module(f"rcfd_jax.models.{_FAMILIES[model_type]}")


def task_of(hf_config: dict[str, Any]) -> str:
  archs = hf_config.get("architectures") or []
  if any(a.endswith("ForSequenceClassification") for a in archs):
    return "seq_cls"
  return "causal_lm"


def build(hf_config: dict[str, Any], *, task: str | None = None, dtype=jnp.float32,
          param_dtype=jnp.float32, mesh: Mesh | None = None, seed: int = 0) -> nnx.Module:
  """A randomly initialised model for a Hugging Face config dict, created sharded."""
  fam = family(hf_config["model_type"])
  task = task or task_of(hf_config)
  config = fam.config_from_hf(hf_config)
  mesh = mesh or sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  make = lambda: fam.build(config, task, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
  return sharding.init_sharded(make, mesh)


def _read(path_or_hub_id: str, task: str | None) -> tuple[Path, ModuleType, str, Any]:
  """(directory, family module, task, family Config) of a model directory's config.json."""
  model_dir = hf.resolve_dir(path_or_hub_id)
  hf_config = hf.read_config(model_dir)
  fam = family(hf_config["model_type"])
  task = task or task_of(hf_config)
  if task not in fam.TASKS:
    raise UserError(f"{hf_config['model_type']} models support {fam.TASKS}, not {task!r}")
  try:
    config = fam.config_from_hf(hf_config)
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"{model_dir}/config.json is missing or has a bad field: {e}") from None
  return model_dir, fam, task, config


def load_abstract(path_or_hub_id: str, *, task: str | None = None, dtype=jnp.float32,
                  param_dtype=None, mesh: Mesh | None = None) -> nnx.Module:
  """The module load_pretrained would return, with jax.ShapeDtypeStruct leaves instead of weights.

  Reads only config.json. Each leaf carries the sharding load_pretrained
  would place it with, so programs can be lowered and compiled for `mesh`
  (even a TPU topology with no TPU attached, rcfd_jax.aot) without a byte of
  weights.
  """
  _, fam, task, config = _read(path_or_hub_id, task)
  mesh = mesh or sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  make = lambda: fam.build(config, task, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(sharding.abstract_module(make))
  return nnx.merge(graphdef, sharding.abstract(state, sharding.state_shardings(state, mesh)))


def _at(module: Any, path: tuple) -> Any:
  for p in path:
    module = module[p] if isinstance(p, int) else getattr(module, p)
  return module


def load_pretrained(path_or_hub_id: str, *, task: str | None = None, dtype=jnp.float32,
                    param_dtype=None, mesh: Mesh | None = None) -> nnx.Module:
  """Loads a Hugging Face safetensors checkpoint into a sharded NNX module.

  task: "causal_lm" or "seq_cls"; by default read from config.json's
  architectures. param_dtype defaults to dtype. Without a mesh the model
  lives on the first device.
  """
  model_dir, fam, task, config = _read(path_or_hub_id, task)
  param_dtype = param_dtype or dtype
  mesh = mesh or sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  make = lambda: fam.build(config, task, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  graphdef, abstract = nnx.split(sharding.abstract_module(make))
  flat = dict(nnx.to_flat_state(abstract))
  reader = hf.WeightReader(model_dir)
  stored = reader.names()
  placed: dict[tuple, nnx.Variable] = {}
  missing = []
  for path, entries in _by_path(fam.tensors(config, task)).items():
    if path not in flat:
      raise AssertionError(f"{fam.__name__} maps {entries[0].hf_name} to unknown path {path}")
    var = flat[path]
    want = var.get_value()
    stacked = entries[0].layer is not None
    if stacked and sorted(t.layer for t in entries) != list(range(want.shape[0])):
      raise AssertionError(f"{fam.__name__} does not map every layer of {path} exactly once")
    host = None  # one parameter on the host at a time: a stacked one is filled layer by layer
    for t in entries:
      name = _find_name(t.hf_name, stored, getattr(fam, "PREFIXES", ()))
      if name is None:
        missing.append(t.hf_name)
        continue
      array = t.to_ours(hf.bf16_to_float(reader.get(name)))
      shape = want.shape[1:] if stacked else want.shape
      if tuple(array.shape) != tuple(shape):
        raise UserError(
            f"tensor {name} in {model_dir} has shape {tuple(array.shape)} but config.json implies "
            f"{tuple(shape)}; the weights do not belong to this config")
      if not stacked:
        host = array
      else:
        host = np.empty(want.shape, array.dtype) if host is None else host
        host[t.layer] = array
    if not missing:
      placed[path] = var.replace(
          sharding.place(host, want.shape, want.dtype, sharding.variable_names(var), mesh))
  if missing:
    raise UserError(f"{model_dir} is missing {len(missing)} weight tensors (first: {missing[0]}); "
                    "the checkpoint is incomplete or of another architecture")
  unset = sorted(set(flat) - set(placed), key=str)
  if unset:
    raise AssertionError(f"{fam.__name__}.tensors() does not cover {unset[:3]}")
  model = nnx.merge(graphdef, nnx.from_flat_state(list(placed.items())))
  return model


def _by_path(tensors: list[hf.Tensor]) -> dict[tuple, list[hf.Tensor]]:
  """Tensor entries grouped by our parameter: one entry, or one per layer of a stacked parameter."""
  out: dict[tuple, list[hf.Tensor]] = {}
  for t in tensors:
    out.setdefault(t.path, []).append(t)
  return out


def _find_name(name: str, stored: set[str], prefixes: tuple[str, ...]) -> str | None:
  """The stored tensor name for a canonical one, allowing a missing or extra trunk prefix."""
  if name in stored:
    return name
  for p in prefixes:
    if name.startswith(p) and name[len(p):] in stored:
      return name[len(p):]
    if p + name in stored:
      return p + name
  return None


def _host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_pretrained(model: nnx.Module, out_dir: str | os.PathLike, *, dtype=np.float32,
                    tokenizer=None) -> Path:
  """Writes config.json + model.safetensors that transformers loads.

  LoRA adapters are merged into their kernels. The directory is written to a
  temporary sibling and renamed, so a crash never leaves half a model.
  Only process 0 writes when several processes run.
  """
  from safetensors.numpy import save_file
  fam = family(model.config.model_type)
  out_dir = Path(out_dir)
  tensors = {}
  for path, entries in _by_path(fam.tensors(model.config, model.task)).items():
    value = _host(_at(model, path)[...]).astype(np.float32)
    parent = _at(model, path[:-1])
    if path[-1] == "kernel" and getattr(parent, "lora_a", None) is not None:
      # Stacked adapters [L, in, r] @ [L, r, out] merge layer by layer in one batched matmul.
      value = value + (_host(parent.lora_a[...]).astype(np.float32)
                       @ _host(parent.lora_b[...]).astype(np.float32)) * parent.lora_scale
    for t in entries:
      one = value if t.layer is None else value[t.layer]
      tensors[t.hf_name] = np.ascontiguousarray(t.to_hf(one).astype(dtype))
  if jax.process_index() != 0:
    return out_dir
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
  cfg = model.config.to_hf(model.task)
  cfg["dtype"] = np.dtype(dtype).name
  (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(tmp))
  if out_dir.exists():
    import shutil
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
  else:
    tmp.rename(out_dir)
  return out_dir
