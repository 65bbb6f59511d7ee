"""Compile every program of a config for a TPU slice (or GPUs), with no accelerator and no weights.

    python -m rcfd_jax.aot --config=configs/tldr.py --topology=v5e:2x4 --out=tldr_v5e.json
    python -m rcfd_jax.aot --config=configs/tiny.py:build/tiny --topology=v5e:2x2 --config.model.remat=False
    python -m rcfd_jax.aot --config=configs/imdb.py --topology=h100:2        # needs the CUDA plugin

libtpu (pip install "jax[tpu]==0.10.2") compiles for a named TPU slice on a
CPU-only machine, the CUDA plugin for described GPUs (rcfd_jax.targets).
The trainer is built exactly as rcfd_jax.main builds it
(train.make_trainer, programs.build), over the target's devices and with
every model abstract: models.load_abstract reads only config.json, from a
local directory or, for the paper's hub ids, from rcfd_jax/model_configs.
Each program is compiled with the trainer's shardings and donation, then
  peak_gib_per_chip   what a chip holds while it runs (programs.peak_bytes)
  flops               matmul FLOPs it executes, all chips together, loops counted by their trips (hlo_cost)
  model_flops         the analytic count it must do (rcfd_jax.flops; docs/tpu.md has the formulas)
  bytes_accessed      HBM bytes it moves, all chips, loops counted by their trips
  estimated_seconds   its run time under the compiler's cost model (a roofline per instruction
                      at the chip's peak FLOP/s and HBM bandwidth), loops counted by their trips
  mfu                 model_flops without rematerialisation / (estimated_seconds x chips x peak)
are printed as a table and written to --out as JSON. A program that cannot
fit the chips' memory is one error line and nothing is written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The TPU is only compiled for: no backend of its own, and libtpu may be loaded by other
# processes on this machine (its lock file only guards a real chip).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rcfd_jax import cli, config as config_lib, files, flops as flops_lib, hlo_cost, memory, models, programs  # noqa: E402
from rcfd_jax import policy, rewards, sharding, targets, train  # noqa: E402
from rcfd_jax.errors import UserError, exit_on_user_error  # noqa: E402
from rcfd_jax.models import hf  # noqa: E402

SHIPPED = Path(__file__).resolve().parent / "model_configs"


def local_dir(path: str, field: str) -> str:
  """A directory holding config.json for `path`: itself if local, else the shipped config of that hub id."""
  p = Path(path).expanduser()
  if p.is_dir():
    return str(p)
  shipped = SHIPPED / path.replace("/", "--")
  if shipped.is_dir():
    return str(shipped)
  known = ", ".join(sorted(d.name.replace("--", "/") for d in SHIPPED.iterdir() if d.is_dir()))
  raise UserError(f"config.{field}={path!r} is neither a local directory nor a model whose config.json ships "
                  f"with rcfd_jax ({known}); pass a directory holding its config.json")


def _tokenizer(model_dir: str):
  """The directory's tokenizer, or None where it holds only config.json."""
  names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
  if not any((Path(model_dir) / n).exists() for n in names):
    return None
  return policy.load_tokenizer(model_dir)


def _rm_tokenizer(model_dir):
  return None if _tokenizer(str(model_dir)) is None else rewards.load_rm_tokenizer(model_dir)


def _token_ids(tokenizer, policy_dir: str) -> tuple[int, int]:
  """(eos, pad) from the tokenizer, else from config.json (pad = eos where it has none)."""
  if tokenizer is not None:
    return tokenizer.eos_token_id, tokenizer.pad_token_id
  c = hf.read_config(Path(policy_dir))
  eos = c.get("eos_token_id")
  eos = (eos[0] if isinstance(eos, list) else eos) or 0
  pad = c.get("pad_token_id")
  return eos, pad if isinstance(pad, int) and pad >= 0 else eos


def compile_config(config, topology: str) -> dict:
  """Builds the trainer of `config` on `topology` abstractly, compiles every program, measures each."""
  config_lib.check(config)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.policy.path = local_dir(config.policy.path, "policy.path")
    if "classifier" in {s.split(":")[0] for s in config.reward.sources}:
      config.reward.classifier.path = local_dir(config.reward.classifier.path, "reward.classifier.path")
  target = targets.describe(topology)
  limit = int(config.mesh.device_memory_gib * memory.GiB) if config.mesh.device_memory_gib > 0 else target.hbm_bytes
  mesh = sharding.make_mesh(tuple(config.mesh.shape), target.devices[:config.mesh.devices or len(target.devices)])
  tokenizer = _tokenizer(config.policy.path)
  eos, pad = _token_ids(tokenizer, config.policy.path)
  t = train.make_trainer(config, mesh, tokenizer, eos, pad, load=models.load_abstract, load_rm_tokenizer=_rm_tokenizer)
  progs = programs.build(t.parts, t.frozen, t.rewards, t.sc, t.tx, t.state, config)
  compiled, peaks = programs.compile_checked(progs, programs.resident_bytes(t.state, t.frozen, t.rewards), limit,
                                             target.where, programs.advice(config))
  analytic = flops_lib.program_flops(config, t, progs)
  useful = flops_lib.program_flops(config, t, progs, remat=False)
  chips = len(mesh.devices.flat)
  out = {"topology": topology, "chips": chips, "hbm_gib_per_chip": round(limit / memory.GiB, 3), "fits": True,
         "mesh": dict(mesh.shape), "peak_tflops_per_chip": round(target.peak_flops / 1e12, 1),
         "hbm_gb_per_s_per_chip": round(target.hbm_bandwidth / 1e9, 1),
         "generated_tokens_per_iteration": config.rollout.prompts_per_step * t.sc.samples_per_prompt * t.sc.max_new_tokens,
         "programs": {}}
  for name, c in compiled.items():
    cost = hlo_cost.executed(c, target.peak_flops, target.hbm_bandwidth)
    out["programs"][name] = {
        "peak_gib_per_chip": round(peaks[name] / memory.GiB, 6),
        "flops": cost.flops * chips, "model_flops": analytic[name],
        "bytes_accessed": cost.bytes_accessed * chips, "estimated_seconds": cost.seconds,
        "mfu": useful[name] / (cost.seconds * chips * target.peak_flops)}
  return out


def table(result: dict) -> str:
  """The result as a markdown table, one row per program."""
  lines = [f"{result['topology']}: {result['chips']} chips x {result['hbm_gib_per_chip']} GiB, mesh {result['mesh']}",
           "| program | peak GiB/chip | executed TFLOP | model TFLOP | ratio | TB accessed | est. seconds | MFU |",
           "|---|---|---|---|---|---|---|---|"]
  for name, p in result["programs"].items():
    lines.append(f"| {name} | {p['peak_gib_per_chip']:.2f} | {p['flops'] / 1e12:.2f} | {p['model_flops'] / 1e12:.2f} | "
                 f"{p['flops'] / max(p['model_flops'], 1):.3f} | {p['bytes_accessed'] / 1e12:.3f} | "
                 f"{p['estimated_seconds']:.3f} | {p['mfu']:.1%} |")
  return "\n".join(lines)


def write_json(path: str, result: dict) -> None:
  """Atomic: the file is complete or absent."""
  out = Path(path).expanduser()
  out.parent.mkdir(parents=True, exist_ok=True)

  def write(f):
    json.dump(result, f, indent=2)
    f.write("\n")

  files.write_atomically(out, write)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_logging()

  def run(config, topology, out):
    result = compile_config(config, topology)
    print(table(result), flush=True)
    if out:
      write_json(out, result)

  exit_on_user_error(run)(flags.FLAGS.config, flags.FLAGS.topology, flags.FLAGS.out)


def define_flags() -> None:
  """The command's flags; defined only when it runs, so importing this module defines none."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("topology", None, "What to compile for: a TPU slice (v5e:2x4, v4:2x2x1, v5p:2x2x1, v6e:2x2, "
                      "...) or N GPUs (h100:8); see rcfd_jax.targets.")
  flags.DEFINE_string("out", None, "JSON file to write; nothing is written when a program cannot fit.")
  flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
  define_flags()
  parsed = cli.parse_flags(sys.argv)
  app.run(main, flags_parser=lambda _: parsed)
