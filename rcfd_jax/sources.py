"""Where prompt data comes from: local files and directories, save_to_disk dirs, hub ids.

`read(config)` gives the rows as a datasets.Dataset and a hash of what was
read (file bytes, or the datasets fingerprint), which the prompt dataset's
fingerprint includes.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from absl import logging

from rcfd_jax.errors import UserError

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SPLIT_NAMES = ("train", "validation", "valid", "dev", "test")
PARQUET_REVISION = "refs/convert/parquet"  # the hub's automatic parquet export of every dataset
_SCRIPT_REFUSED = "Dataset scripts are no longer supported"  # datasets >= 4 on a loading script


def _is_local(path: str) -> bool:
  """Hub ids are "name" or "org/name"; anything else that looks like a path is local."""
  return (os.path.exists(path) or os.path.isabs(path) or path.startswith((".", "~"))
          or Path(path).suffix in _BUILDERS or path.count("/") > 1)


def _hash_and_check_utf8(path: Path, text: bool) -> str:
  """sha256 of the file; text files must decode as UTF-8, which this checks on the way."""
  digest, decoder = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")()
  lines = 1
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
      if text:
        try:
          decoder.decode(chunk)
        except UnicodeDecodeError as e:
          line = lines + e.object[:e.start].count(b"\n")
          raise UserError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} on line "
                          f"{line}); re-encode it as UTF-8 (iconv -f latin1 -t utf-8)") from None
        lines += chunk.count(b"\n")
  if text:
    try:
      decoder.decode(b"", final=True)
    except UnicodeDecodeError:
      raise UserError(f"{path} is not UTF-8 text (it ends inside a character); "
                      "re-encode it as UTF-8") from None
  return digest.hexdigest()


def _data_files(root: Path, split_name: str) -> list[Path]:
  """The files of `split_name` under a directory: named after it, or all files if none is."""
  files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _BUILDERS)
  if not files:
    raise UserError(f"{root} holds no {'/'.join(_BUILDERS)} files")

  def split_of(p: Path) -> str | None:
    parts = [q.lower() for q in p.relative_to(root).parent.parts] + [p.stem.lower()]
    for part in parts:
      for name in _SPLIT_NAMES:
        if part == name or part.startswith((name + "-", name + "_", name + ".")):
          return name
    return None

  named = {p: split_of(p) for p in files}
  if not any(named.values()):
    if split_name != "train":
      raise UserError(f"{root} has no file named after split '{split_name}'; "
                      "its files form the 'train' split")
    return files
  chosen = [p for p, s in named.items() if s == split_name]
  if not chosen:
    found = sorted({s for s in named.values() if s})
    raise UserError(f"{root} has no split '{split_name}'; splits found: {', '.join(found)}")
  return chosen


def read(config) -> tuple[Any, str]:
  """The rows of config.path as a datasets.Dataset, and a hash of what was read."""
  import datasets

  path = str(config.path)
  if not path:
    raise UserError("data.path is empty; set it to a local data file/directory or a hub id")
  bars = datasets.is_progress_bar_enabled()
  datasets.disable_progress_bars()
  try:
    if not _is_local(path):
      return _read_hub(datasets, path, config)
    root = Path(path).expanduser()
    if not root.exists():
      raise UserError(f"data file {root} does not exist; check data.path")
    if root.is_dir() and ((root / "state.json").exists() or (root / "dataset_dict.json").exists()):
      ds = datasets.load_from_disk(str(root))
      if isinstance(ds, datasets.DatasetDict):
        if config.split not in ds:
          raise UserError(f"{root} has no split '{config.split}'; splits: {', '.join(ds)}")
        ds = ds[config.split]
      return ds, ds._fingerprint
    files = [root] if root.is_file() else _data_files(root, config.split)
    suffixes = {p.suffix for p in files}
    if len(suffixes) > 1 or files[0].suffix not in _BUILDERS:
      raise UserError(f"data files must share one of the suffixes {', '.join(_BUILDERS)}; "
                      f"got {', '.join(sorted(suffixes))} under {root}")
    builder = _BUILDERS[files[0].suffix]
    hashes = [_hash_and_check_utf8(p, text=builder != "parquet") for p in files]
    try:
      ds = datasets.load_dataset(builder, data_files={"rows": [str(p) for p in files]},
                                 split="rows")
    except Exception as e:  # datasets wraps parser errors in several types
      cause = e
      while cause is not None and not isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
      detail = (str(e).splitlines() or [""])[0]
      what = ("is not UTF-8 text" if cause is not None
              else f"could not be read as {builder} ({type(e).__name__}: {detail})")
      raise UserError(f"{root} {what}; check the file format") from None
    return ds, hashlib.sha256(json.dumps(hashes).encode()).hexdigest()
  finally:
    if bars:
      datasets.enable_progress_bars()


def _read_hub(datasets, path: str, config) -> tuple[Any, str]:
  offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
  try:
    ds = datasets.load_dataset(path, config.hub_config or None, split=config.split)
  except Exception as e:  # offline, unknown id, missing config: all fixed the same way
    if _SCRIPT_REFUSED in str(e):
      ds = _read_parquet_conversion(datasets, path, config)
      return ds, ds._fingerprint
    why = "the hub is offline here" if offline else f"loading it failed ({type(e).__name__})"
    raise UserError(f"data.path '{path}' looks like a hub dataset id and {why}; download it "
                    "where there is network (datasets.load_dataset(...).to_parquet(FILE)) and "
                    "set data.path to the local file") from None
  return ds, ds._fingerprint


def _read_parquet_conversion(datasets, path: str, config) -> Any:
  """The hub's parquet export of a dataset published with a loading script.

  datasets >= 4 runs no loading scripts (openai/summarize_from_feedback, the
  TL;DR comparisons, is one); the hub keeps an automatic conversion to
  parquet under the revision refs/convert/parquet, one directory per config.
  Its config names can differ from the script's: data.hub_config is used
  when the conversion has it, else the conversion's only config.
  """
  def fail(why: str):
    raise UserError(f"data.path '{path}' ships a loading script, which datasets {datasets.__version__} "
                    f"no longer runs, and its parquet conversion (revision {PARQUET_REVISION}) {why}") from None

  try:
    names = list(datasets.get_dataset_config_names(path, revision=PARQUET_REVISION))
  except Exception as e:  # the hub's API: network, permissions, no conversion
    fail(f"could not be listed ({type(e).__name__}); download the data where it can be read and "
         "set data.path to a local file")
  if config.hub_config in names:
    name = config.hub_config
  elif len(names) == 1:
    name = names[0]
  else:
    fail(f"has no config {config.hub_config!r} but {', '.join(names) or 'none'}; set data.hub_config "
         "to one of them")
  try:
    ds = datasets.load_dataset(path, name, split=config.split, revision=PARQUET_REVISION)
  except Exception as e:
    fail(f"could not be read ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); download "
         "the data where it can be read and set data.path to a local file")
  logging.warning("%s ships a loading script, which datasets %s no longer runs: reading its parquet "
                  "conversion instead (revision %s, config %s)", path, datasets.__version__,
                  PARQUET_REVISION, name)
  return ds
