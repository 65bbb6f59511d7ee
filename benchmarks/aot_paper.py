"""The paper configs compiled for TPU slices with libtpu: the smallest slice of each generation they fit.

    python benchmarks/aot_paper.py                                  # all; hours on 2 CPU cores
    python benchmarks/aot_paper.py --configs=tldr --generations=v5e
    python benchmarks/aot_paper.py --write_doc                      # also rewrites docs/tpu.md's table

For each config and TPU generation it runs `python -m rcfd_jax.aot` (one
process per slice, one at a time: a 7B program takes minutes and gigabytes
to compile) on the generation's slices from the smallest up, until one fits;
each result lands in benchmarks/results/aot/CONFIG_SLICE.json (a slice that
does not fit leaves CONFIG_SLICE.txt with aot's error line), and a rerun
reuses them. Then it prints docs/tpu.md's table, and last one line per
config and generation:

    aot_CONFIG_SLICE: ours=EXECUTED peer=MODEL ratio=MODEL/EXECUTED (PFLOP per iteration, compiled vs analytic)

Per iteration means the programs one RL step runs: "iteration" (fused), or
"rollout" + "reward_model" + "update"; the host bridge between them
(decoding and re-tokenizing on the CPU) is not in the estimate. Tokens/s
assume every completion runs to max_new_tokens, as the compiled loop
allows; MFU counts the model's FLOPs without rematerialisation
(rcfd_jax.flops) against the chips' peak as the compiler states it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "aot"
DOC = ROOT / "docs" / "tpu.md"
CONFIGS = ("tldr", "imdb", "wiki_seqll", "tldr_length")
SLICES = {  # smallest first; topology names as libtpu takes them (v4: one device per chip, megacore)
    "v5e": ("v5e:2x2", "v5e:2x4", "v5e:4x4"),
    "v4": ("v4:2x2x1", "v4:2x2x2", "v4:2x2x4"),
    "v5p": ("v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4"),
    "v6e": ("v6e:2x2", "v6e:2x4", "v6e:4x4"),
    "h100": ("h100:2", "h100:4", "h100:8"),  # needs the CUDA plugin in this Python (rcfd_jax.targets)
}
STEP = ("iteration", "rollout", "reward_model", "update")  # the programs one RL iteration runs

flags.DEFINE_list("configs", list(CONFIGS), "Paper configs to compile.")
flags.DEFINE_list("generations", ["v5e", "v4", "v5p", "v6e"], "TPU generations (or h100) to search.")
flags.DEFINE_bool("write_doc", False, "Rewrite the table between the markers of docs/tpu.md.")
FLAGS = flags.FLAGS


REFERENCE = "v5e:2x4"  # the slice whose per-program tables docs/tpu.md shows


def compile_on(config: str, topology: str) -> dict | None:
  """aot's result for one slice (cached on disk), or None when the config does not fit it."""
  stem = f"{config}_{topology.replace(':', '_')}"
  out, refused = RESULTS / f"{stem}.json", RESULTS / f"{stem}.txt"
  if out.exists():
    return json.loads(out.read_text())
  if refused.exists():
    return None
  RESULTS.mkdir(parents=True, exist_ok=True)
  print(f"compiling {config} for {topology} ...", flush=True)
  proc = subprocess.run([sys.executable, "-m", "rcfd_jax.aot", f"--config=configs/{config}.py",
                         f"--topology={topology}", f"--out={out}"], cwd=ROOT, capture_output=True, text=True)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  if proc.returncode == 0:
    print(proc.stdout, flush=True)
    return json.loads(out.read_text())
  if errors and "needs" in errors[0]:  # a program does not fit (aot's one line)
    refused.write_text(errors[0] + "\n")
    print(f"  does not fit: {errors[0]}", flush=True)
    return None
  raise RuntimeError(f"aot failed for {config} on {topology}:\n{proc.stderr[-3000:]}")


def summary(config: str, result: dict) -> dict:
  """One table row: peak, FLOPs ratio, seconds, tokens/s and MFU of one RL iteration on the slice."""
  progs = result["programs"]
  step = [progs[name] for name in STEP if name in progs]
  seconds = sum(p["estimated_seconds"] for p in step)
  executed, model = sum(p["flops"] for p in step), sum(p["model_flops"] for p in step)
  useful = sum(p["mfu"] * p["estimated_seconds"] for p in step) / seconds
  tokens = result["generated_tokens_per_iteration"]
  return {"config": config, "slice": result["topology"], "chips": result["chips"],
          "hbm": result["hbm_gib_per_chip"], "mesh": "x".join(str(v) for v in result["mesh"].values()),
          "peak": max(p["peak_gib_per_chip"] for p in progs.values()),
          "worst_ratio": max(p["flops"] / p["model_flops"] for p in progs.values()),
          "ratio": executed / model, "executed": executed, "model": model, "seconds": seconds,
          "tokens_per_s": tokens / seconds, "mfu": useful}


def table(rows: list[dict]) -> str:
  lines = ["| config | smallest slice | chips x HBM | mesh (data x fsdp x tensor) | peak GiB/chip (worst program) | "
           "FLOPs executed / model (iteration; worst program) | est. s / iteration | tokens/s | MFU |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['config']} | {r['slice']} | {r['chips']} x {r['hbm']:g} GiB | {r['mesh']} | {r['peak']:.2f} | "
                 f"{r['ratio']:.3f}; {r['worst_ratio']:.3f} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
                 f"{r['mfu']:.1%} |")
  return "\n".join(lines)


def main(argv):
  del argv
  rows = []
  for config in FLAGS.configs:
    for generation in FLAGS.generations:
      for topology in SLICES[generation]:
        result = compile_on(config, topology)
        if result is not None:
          rows.append(summary(config, result))
          break
      else:
        print(f"{config} fits no {generation} slice tried ({', '.join(SLICES[generation])})")
  text = table(rows)
  print(text)
  sys.path.insert(0, str(ROOT))
  from rcfd_jax.aot import table as program_table
  per_program = "\n\n".join(f"`{config}`, {program_table(compile_on(config, REFERENCE))}"
                              for config in FLAGS.configs)  # every paper config fits REFERENCE
  print("\n" + per_program)
  if FLAGS.write_doc:
    doc = DOC.read_text()
    for marker, body in (("aot_paper table", text), ("aot_paper programs", per_program)):
      doc = re.sub(rf"(<!-- {marker} -->\n).*?(\n<!-- end -->)", lambda m: m[1] + body + m[2], doc, flags=re.S)
    DOC.write_text(doc)
  print()
  for r in rows:
    print(f"aot_{r['config']}_{r['slice'].replace(':', '_')}: ours={r['executed'] / 1e15:.3f} "
          f"peer={r['model'] / 1e15:.3f} ratio={r['model'] / r['executed']:.3f} "
          "(PFLOP per iteration, compiled vs analytic)")


if __name__ == "__main__":
  app.run(main)
