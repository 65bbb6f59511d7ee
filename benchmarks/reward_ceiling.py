"""The max arm's overshoot bar beside the highest rewards the task's texts and the max arm reach.

    python -m rcfd_jax.reproduce --workdir=DIR                    # first: assets, stages, the arms
    python benchmarks/reward_ceiling.py --workdir=DIR [--tasks=sentiment_voiced,loglik_voiced]

The reproduction asks max to end more than one demonstration std above the
demonstrations' mean reward. Per task this prints that bar (as the max
arm's last evaluation reads the demonstrations), the highest demonstration
reward over the training and validation sets with its 99th percentile, and
the max arm's training-batch reward over its last five logged steps (mean of
their batch means, and the mean within-batch std). Where the max arm has
settled on near-identical completions whose reward sits below both the bar
and the best demonstrations, the reward model leaves nothing above them to
reach. The demonstration rewards come from the run's cache (rcfd_jax.demos),
so nothing is scored again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from rcfd_jax import train  # noqa: E402
from rcfd_jax.reproduce import run as reproduce  # noqa: E402

TASKS = tuple(reproduce.TASKS)


def ceiling(d: Path, task: str) -> dict:
  """The bar, the demonstrations' highest rewards and the max arm's last training rewards for `task`."""
  arm = d / "runs" / task / "max"
  s, _ = train.build(reproduce.load_config("reproduce", f"{task},{d}"), arm)
  both = np.concatenate([s.demo_train[:, 0], s.demo_val[:, 0]])
  ev = json.loads((arm / "eval" / f"step_{s.config.total_steps}.json").read_text())
  last = [json.loads(line) for line in (arm / "metrics.jsonl").read_text().splitlines()][-5:]
  mean, std = ev["demo_reward_mean"], ev["demo_reward_std"]
  return {"demo_mean": mean, "demo_std": std, "bar": mean + std,
          "demo_max": float(both.max()), "demo_p99": float(np.percentile(both, 99)), "demos": int(both.size),
          "max_steps": (last[0]["step"], last[-1]["step"]),
          "max_reward": float(np.mean([r["reward_mean"] for r in last])),
          "max_batch_std": float(np.mean([r["reward_std"] for r in last]))}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="The reproduction's DIR, after `rcfd_jax.reproduce`.")
  ap.add_argument("--tasks", default=",".join(TASKS), help=f"Comma-separated, of {TASKS}.")
  args = ap.parse_args()
  d = Path(args.workdir)
  tasks = common.reproduction_tasks(d, args.tasks, TASKS, "max/metrics.jsonl", "max arm")
  rows = []
  for task in tasks:
    c = ceiling(d, task)
    rows.append([task, f"{c['demo_mean']:.3f} ± {c['demo_std']:.3f}", f"{c['bar']:.3f}",
                 f"{c['demo_max']:.3f} ({c['demos']})", f"{c['demo_p99']:.3f}",
                 f"{c['max_reward']:.3f} (steps {c['max_steps'][0]}-{c['max_steps'][1]})", f"{c['max_batch_std']:.3f}"])
  common.print_table(["task", "demonstrations", "bar (+1 std)", "best demonstration (of n)", "99th percentile",
                      "max arm, training batches", "within-batch std"], rows)


if __name__ == "__main__":
  main()
