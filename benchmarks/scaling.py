"""How the cost of one RL iteration grows: batch, generation length and model width doubled.

    python benchmarks/scaling.py                  # about 8 minutes on 2 CPU cores
    python benchmarks/scaling.py --only=base,w512l8

Setup as in benchmarks/rl_step.py (the TRL venv). Each row changes one
thing from the tiny base (8 prompts x 4 samples, 32 new tokens, GPT-2 with 2
layers of width 128): prompts per step x2 and x4, new tokens x2 and x3.5
(context 128 = 16 prompt + 112 new), width 256, width 512 with 8 layers.
Ours: the fused step with the in-graph word count (REINFORCE, leave-one-out);
peer: TRL GRPOTrainer with the same word count as a Python reward, settings
as printed by rl_step.py. Two warm workers per row alternate A B A B. The
table gives median seconds per iteration and the ratio peer/ours of
generated tokens per second; the last lines follow the benchmark contract.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, rl_step  # noqa: E402

_ROUNDS = flags.DEFINE_integer("rounds_scaling", 2, "Alternating rounds per row.")
_ONLY = flags.DEFINE_list("only", [], "Rows to run (names from ROWS); empty = all.")

BASE = dict(width=128, layers=2, batch=8, k=4, new=32)
ROWS = {
    "base": {},
    "batch16": dict(batch=16),
    "batch32": dict(batch=32),
    "new64": dict(new=64),
    "new112": dict(new=112),
    "w256": dict(width=256),
    "w512l8": dict(width=512, layers=8),
}


def main(argv):
  del argv
  table, lines = [], []
  for name, change in ROWS.items():
    if _ONLY.value and name not in _ONLY.value:
      continue
    c = dict(BASE, **change)
    assets = common.build_assets(Path(rl_step._WORK.value) / f"w{c['width']}l{c['layers']}",
                                 width=c["width"], layers=c["layers"])
    shape = dict(batch=c["batch"], k=c["k"], new=c["new"])
    workers = []
    try:
      workers.append(rl_step.ours("ours", assets, shape, reward="words"))
      workers.append(rl_step.trl("trl_grpo", assets, shape, "grpo"))
      res = common.alternate(workers, _ROUNDS.value, 1)
    finally:
      for w in workers:
        w.close()
    so, sp = common.summary(res["ours"]), common.summary(res["trl_grpo"])
    row = (f"| {name} | {c['batch']}x{c['k']} | {c['new']} | {c['width']} | {c['layers']} | "
           f"{so['s_per_iter']:.3f} | {sp['s_per_iter']:.3f} | {so['tokens_per_s']:.0f} | "
           f"{sp['tokens_per_s']:.0f} | {so['tokens_per_s'] / sp['tokens_per_s']:.1f} | "
           f"{so['first_step_s']:.1f} | {so['maxrss_mb']:.0f} | {sp['maxrss_mb']:.0f} |")
    print(row, flush=True)
    table.append(row)
    lines.append(common.line(f"scaling_tokens_per_s_{name}", so["tokens_per_s"], sp["tokens_per_s"],
                             "generated tokens/s, ours fused vs GRPOTrainer"))
  print("| row | prompts x k | new tokens | width | layers | ours s/iter | TRL s/iter | ours tok/s | "
        "TRL tok/s | ratio | ours first step s | ours RSS MiB | TRL RSS MiB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  print("\n".join(table))
  print(f"threads per side={common.cores()}, load average at end={os.getloadavg()[0]:.1f}")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
