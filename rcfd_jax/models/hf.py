"""Reading and writing Hugging Face model directories (safetensors only).

A family module (gpt2, llama, bert, ...) says how its parameters map to
Hugging Face tensor names with a list of `Tensor` entries; this module does
the file work for all of them: find the directory (local or hub), read and
check config.json, read safetensors (single file or sharded index), refuse
pickle checkpoints, place each tensor on the mesh with its sharding, and
write a directory transformers loads back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rcfd_jax.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Any one of these makes a directory hold a tokenizer (fast JSON, BPE, WordPiece, SentencePiece);
# without one transformers builds an empty tokenizer that turns every text into no ids.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spm.model",
                   "sentencepiece.bpe.model")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One parameter: our module path <-> a Hugging Face tensor name.

  to_ours maps the stored array to our layout (e.g. transpose a torch
  nn.Linear [out, in] weight to an [in, out] kernel); to_hf is its inverse.
  With `layer` set, the Hugging Face tensor is slice `layer` of our
  parameter at `path`, whose leading axis stacks the transformer layers (the
  blocks are scanned, see layers.stacked); to_ours / to_hf act on one slice.
  """
  path: tuple[str | int, ...]
  hf_name: str
  to_ours: Callable[[np.ndarray], np.ndarray] = lambda x: x
  to_hf: Callable[[np.ndarray], np.ndarray] = lambda x: x
  layer: int | None = None


def linear(path, hf_name, layer: int | None = None) -> Tensor:
  """A torch nn.Linear weight [out, in] stored as our [in, out] kernel."""
  return Tensor(path, hf_name, lambda x: x.T, lambda x: x.T, layer)


# config.json fields every family's to_hf rebuilds (or that mean nothing here).
DERIVED_FIELDS = frozenset({"architectures", "id2label", "label2id", "num_labels", "dtype", "torch_dtype",
                            "transformers_version"})


def extra_fields(c: dict[str, Any], handled) -> tuple:
  """config.json's other scalar fields, as sorted (key, value) pairs that to_hf writes back unchanged.

  `handled` names the fields the family's config_from_hf reads itself.
  """
  return tuple(sorted((k, v) for k, v in c.items() if k not in handled and k not in DERIVED_FIELDS
                      and isinstance(v, (int, float, str, bool, type(None)))))


def dense(path: tuple, name: str, layer: int | None = None) -> list[Tensor]:
  """A torch nn.Linear with bias: NAME.weight -> PATH/kernel, NAME.bias -> PATH/bias (slice `layer`)."""
  return [linear(path + ("kernel",), name + ".weight", layer),
          Tensor(path + ("bias",), name + ".bias", layer=layer)]


def layer_norm(path: tuple, name: str, layer: int | None = None) -> list[Tensor]:
  """A torch LayerNorm: NAME.weight -> PATH/scale, NAME.bias -> PATH/bias (slice `layer`)."""
  return [Tensor(path + ("scale",), name + ".weight", layer=layer),
          Tensor(path + ("bias",), name + ".bias", layer=layer)]


def resolve_dir(path_or_id: str, allow_patterns=("*.json", "*.safetensors", "*.txt", "*.model")) -> Path:
  """A local model directory, or a hub id downloaded when online.

  Offline (no network, or HF_HUB_OFFLINE=1) a hub id that is not already in
  the local cache fails at once with a message naming the fix.
  """
  p = Path(os.path.expanduser(str(path_or_id)))
  if p.is_dir():
    return p
  if p.exists():
    raise UserError(f"{path_or_id} is a file; pass the model directory that holds config.json")
  if not HUB_ID.match(str(path_or_id)):
    raise UserError(f"model directory {path_or_id} does not exist")
  try:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(path_or_id), allow_patterns=list(allow_patterns),
                                  etag_timeout=5))
  except Exception as e:  # offline, unknown repo, gated repo: all end here
    raise UserError(
        f"cannot fetch {path_or_id!r} from the Hugging Face hub ({type(e).__name__}); "
        "download it on a machine with internet access and pass the local directory instead") from None


def read_config(model_dir: Path) -> dict[str, Any]:
  """config.json as a dict, with one clear error when missing or broken."""
  f = Path(model_dir) / "config.json"
  if not f.is_file():
    raise UserError(f"{model_dir} has no config.json; pass a Hugging Face model directory")
  try:
    cfg = json.loads(f.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{f} is not valid JSON ({e}); re-export the model") from None
  if not isinstance(cfg, dict) or "model_type" not in cfg:
    raise UserError(f"{f} has no model_type field; it is not a transformers config")
  if cfg.get("auto_map"):
    # Custom modeling code is never executed; the architecture must be one we implement.
    cfg = {k: v for k, v in cfg.items() if k != "auto_map"}
  return cfg


def open_tokenizer(path: str, what: str = "a tokenizer"):
  """The tokenizer of a model directory (or hub id), or one error line naming `what` and the directory."""
  from transformers import AutoTokenizer
  model_dir = resolve_dir(path)
  try:
    return AutoTokenizer.from_pretrained(str(model_dir))
  except Exception as e:  # transformers raises many types for a missing or broken tokenizer
    raise UserError(f"cannot load {what} from {model_dir} ({type(e).__name__}: {e}); save the tokenizer "
                    "into the model directory (tokenizer.save_pretrained(dir))") from None


def load_tokenizer(path: str):
  """The tokenizer of a model directory (or hub id); it must know its EOS token.

  The trainers append EOS to every text and stop generation at it.
  """
  model_dir = resolve_dir(path)
  tok = open_tokenizer(str(model_dir))
  if tok.eos_token_id is None:
    raise UserError(f"the tokenizer in {model_dir} has no eos token; set eos_token in its tokenizer_config.json")
  return tok


def _weights_problem(model_dir: Path) -> str | None:
  """What keeps the directory's weights from loading, or None when safetensors are there."""
  others = sorted(p.name for p in model_dir.glob("*.safetensors"))
  if (model_dir / "model.safetensors.index.json").is_file() or "model.safetensors" in others \
      or len(others) == 1:
    return None
  if others:
    return (f"holds {len(others)} safetensors files but no model.safetensors.index.json that says "
            "which tensor is in which")
  pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
  if pickles:
    return (f"holds only pickle checkpoints ({', '.join(pickles)}), which are never loaded because "
            "unpickling runs code: convert them to safetensors (model.save_pretrained(dir, "
            "safe_serialization=True) in transformers)")
  return "has no model.safetensors or model.safetensors.index.json"


def check_dir(model_dir: Path, *, tokenizer: bool) -> None:
  """Refuses a model directory that cannot load, in one error naming everything wrong with it.

  Run before any data is read, so a bad directory is not reported as a data
  problem (an empty tokenizer makes every text too short to use).
  """
  model_dir = Path(model_dir)
  read_config(model_dir)
  problems = [_weights_problem(model_dir)]
  if tokenizer and not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
    problems.append(f"has no tokenizer files ({', '.join(TOKENIZER_FILES)}): save its tokenizer "
                    "into it (tokenizer.save_pretrained(dir))")
  problems = [p for p in problems if p]
  if problems:
    raise UserError(f"{model_dir} " + "; and it ".join(problems))


class WeightReader:
  """Reads tensors by name from the safetensors files of a directory."""

  def __init__(self, model_dir: Path):
    model_dir = Path(model_dir)
    problem = _weights_problem(model_dir)
    if problem:
      raise UserError(f"{model_dir} {problem}")
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      self.files = {name: model_dir / f for name, f in weight_map.items()}
    else:  # model.safetensors, or the one safetensors file there is
      self.files = None
      self.single = single if single.is_file() else next(model_dir.glob("*.safetensors"))
    self._handles: dict[Path, Any] = {}

  def _open(self, f: Path):
    from safetensors import safe_open
    if f not in self._handles:
      try:
        self._handles[f] = safe_open(str(f), framework="numpy")
      except Exception as e:
        raise UserError(f"cannot read {f}: {e}") from None
    return self._handles[f]

  def names(self) -> set[str]:
    if self.files is not None:
      return set(self.files)
    return set(self._open(self.single).keys())

  def get(self, name: str) -> np.ndarray:
    f = self.files.get(name) if self.files is not None else self.single
    if f is None:
      raise KeyError(name)
    h = self._open(f)
    if name not in h.keys():
      raise KeyError(name)
    try:
      return h.get_tensor(name)
    except Exception as e:
      raise UserError(f"cannot read tensor {name} from {f}: {e}") from None


def strip_prefix(names: set[str], prefixes: tuple[str, ...]) -> str:
  """The prefix (one of `prefixes`, or '') under which a checkpoint stores its trunk."""
  for p in prefixes:
    if any(n.startswith(p) for n in names):
      return p
  return ""


def bf16_to_float(x: np.ndarray) -> np.ndarray:
  """safetensors returns bfloat16 as ml_dtypes.bfloat16; widen for host transforms."""
  return x.astype(np.float32) if x.dtype.name == "bfloat16" else x
