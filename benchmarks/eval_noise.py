"""How much one evaluation of an unchanged policy moves: the reproduction's targets beside their own noise.

    python -m rcfd_jax.reproduce --workdir=DIR                    # first: assets, stages, the SFT rows
    python benchmarks/eval_noise.py --workdir=DIR [--tasks=loglik,sentiment]

Per task, runs the reproduction's arm at learning rate 0 (DIR/runs/TASK/
sft_lr0: objective max, every other setting the arms share, so the policy
stays the SFT policy) and reads its four evaluations (steps 50-200), each of
which samples the validation prompts afresh. Prints, beside the SFT row the
reproduction reports (its evaluation at step 0): the four gaps (reward minus
the demonstrations' mean, in their std), their mean and standard deviation,
the A and distinct-2 ranges, and the chance that an evaluation of a policy
exactly at the demonstrations' mean lands within 0.1 std, were its gap
normal with that standard deviation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from rcfd_jax import config as config_lib  # noqa: E402
from rcfd_jax.reproduce import report, run, runner  # noqa: E402

TASKS = tuple(run.TASKS)
STEPS = (50, 100, 150, 200)


def arm_dir(d: Path, task: str) -> Path:
  return d / "runs" / task / "sft_lr0"


def command(d: Path, task: str) -> list[str]:
  return [sys.executable, "-m", "rcfd_jax.main", f"--config={config_lib.experiment_file('reproduce')}:{task},{d}",
          "--config.rl.objective=max", "--config.optim.learning_rate=0.0", f"--workdir={arm_dir(d, task)}"]


def summary(d: Path, task: str) -> dict:
  """The SFT row's evaluation beside the lr-0 arm's four."""
  sft = run.sft_eval(d, task)
  evals = [json.loads((arm_dir(d, task) / "eval" / f"step_{s}.json").read_text()) for s in STEPS]
  gaps = np.array([report.gap(e) for e in evals])
  sd = float(gaps.std(ddof=1))
  return {"sft_gap": report.gap(sft), "sft_alignment": sft["alignment"], "gaps": gaps.tolist(), "mean": float(gaps.mean()),
          "sd": sd, "within": math.erf(0.1 / (sd * math.sqrt(2))) if sd > 0 else 1.0,
          "alignment": (min(e["alignment"] for e in evals), max(e["alignment"] for e in evals)),
          "distinct": (min(e["distinct_2"] for e in evals) / sft["distinct_2"],
                       max(e["distinct_2"] for e in evals) / sft["distinct_2"]),
          "kl": max(abs(e["kl"]) for e in evals)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="The reproduction's DIR, after `rcfd_jax.reproduce`.")
  ap.add_argument("--tasks", default=",".join(TASKS), help=f"Comma-separated, of {TASKS}.")
  ap.add_argument("--parallel", type=int, default=2)
  args = ap.parse_args()
  d = Path(args.workdir)
  tasks = common.reproduction_tasks(d, args.tasks, TASKS, "sft/eval/step_0.json", "SFT evaluation")
  runner.run_commands(d, {f"{t}/sft_lr0": (command(d, t), arm_dir(d, t) / "eval" / f"step_{STEPS[-1]}.json")
                          for t in tasks}, args.parallel)
  rows = []
  for task in tasks:
    r = summary(d, task)
    rows.append([task, f"{r['sft_gap']:+.2f}, {r['sft_alignment']:.3f}", ", ".join(f"{g:+.2f}" for g in r["gaps"]),
                 f"{r['mean']:+.2f} ± {r['sd']:.2f}", f"{r['within']:.0%}",
                 f"{r['alignment'][0]:.3f}-{r['alignment'][1]:.3f}", f"{r['distinct'][0]:.0%}-{r['distinct'][1]:.0%}",
                 f"{r['kl']:.1e}"])
  common.print_table(["task", "SFT row: gap, A", "the same policy, four evaluations: gap", "mean ± sd",
                      "within 0.1 std", "A", "distinct-2 vs the SFT row", "largest KL"], rows)


if __name__ == "__main__":
  main()
