"""rcfd_group calibrated to the demonstrations' mean instead of each prompt's own R_d (docs/reproduce.md).

    python -m rcfd_jax.reproduce --workdir=DIR --seeds=3   # first: the assets, stages and the per-prompt arms
    python benchmarks/rcfd_target.py --workdir=DIR

runs rcfd_group with `rl.rcfd_target=mean`, everything else as the
reproduction's rcfd_group arms, on the plain tasks with seeds 0, 1, 2 and on
the voiced tasks with seed 0 (DIR/runs/TASK/rcfd_group_mean_seedS, two at a
time, reusing DIR/jax_cache; finished arms are reused), then prints, per task
and seed, both targets' gap / A / distinct-2 share / KL / prompt_corr after
the last step, the reading the design fixed for each plain task, and one
line per task and seed:

    rcfd_target_TASK_seedS: ours=KL(mean target) peer=KL(per-prompt target) ratio=peer/ours
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rcfd_jax import config as config_lib  # noqa: E402
from rcfd_jax.reproduce import run as reproduce, runner  # noqa: E402

RUNS = [("loglik", s) for s in range(3)] + [("sentiment", s) for s in range(3)] + [
    ("loglik_voiced", 0), ("sentiment_voiced", 0)]


def arm_dir(d: Path, task: str, seed: int, target: str) -> Path:
  if target == "mean":
    return d / "runs" / task / f"rcfd_group_mean_seed{seed}"
  return d / "runs" / task / ("rcfd_group" if seed == 0 else f"rcfd_group_seed{seed}")


def command(d: Path, task: str, seed: int) -> list[str]:
  return [sys.executable, "-m", "rcfd_jax.main", f"--config={config_lib.experiment_file('reproduce')}:{task},{d}",
          "--config.rl.objective=rcfd_group", "--config.rl.rcfd_target=mean", f"--config.seed={seed}",
          f"--workdir={arm_dir(d, task, seed, 'mean')}"]


def run_all(d: Path, parallel: int) -> None:
  """The mean-target arms, `parallel` at a time, with the reproduction's own job runner."""
  runner.run_commands(d, {f"{t}/rcfd_group_mean_seed{s}": (command(d, t, s), arm_dir(d, t, s, "mean") / "eval" /
                                                            "step_200.json") for t, s in RUNS}, parallel)


def row(d: Path, task: str, seed: int, target: str) -> dict | None:
  return reproduce.last_row(d, task, arm_dir(d, task, seed, target))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="The reproduction's DIR, after `rcfd_jax.reproduce --seeds=3`.")
  ap.add_argument("--parallel", type=int, default=2)
  args = ap.parse_args()
  d = Path(args.workdir)
  if not (d / "runs").exists():
    sys.exit(f"{d} holds no reproduction: run `python -m rcfd_jax.reproduce --workdir={d} --seeds=3` first")
  run_all(d, args.parallel)
  print("| task | seed | target | gap | A (SFT) | distinct-2 vs SFT | KL | prompt_corr | targets met |")
  print("|---|---|---|---|---|---|---|---|---|")
  rows, lines = {}, []
  for task, seed in RUNS:
    for target in ("demo", "mean"):
      r = row(d, task, seed, target)
      rows[task, seed, target] = r
      if r is None:
        print(f"| {task} | {seed} | {target} | (no run) |||||")
        continue
      met = (abs(r["gap"]) <= 0.1) + (r["alignment"] <= r["sft_alignment"]) + (r["distinct_share"] >= 0.8)
      print(f"| {task} | {seed} | {target} | {r['gap']:+.2f} | {r['alignment']:.3f} ({r['sft_alignment']:.3f}) "
            f"| {r['distinct_share']:.0%} | {r['kl']:.1f} | {r['prompt_corr']:+.2f} | {met} of 3 |")
    ours, peer = rows[task, seed, "mean"], rows[task, seed, "demo"]
    if ours and peer:
      lines.append(f"rcfd_target_{task}_seed{seed}: ours={ours['kl']:.2f} peer={peer['kl']:.2f} "
                   f"ratio={peer['kl'] / ours['kl']:.3f}")
  for task in ("loglik", "sentiment"):
    pairs = [(rows[task, s, "mean"], rows[task, s, "demo"]) for s in range(3)]
    if not all(m and p for m, p in pairs):
      print(f"{task}: a seed is missing, no reading")
      continue
    lower_kl = [m["kl"] < p["kl"] for m, p in pairs]
    more_d2 = [m["distinct_share"] > p["distinct_share"] for m, p in pairs]
    if all(lower_kl) and all(more_d2):
      verdict = "holds (lower KL and higher distinct-2 on all three seeds)"
    elif not any(lower_kl) and not any(more_d2):
      verdict = "refuted (neither lower KL nor higher distinct-2 on any seed)"
    else:
      verdict = f"mixed (lower KL on {sum(lower_kl)} of 3 seeds, higher distinct-2 on {sum(more_d2)} of 3)"
    print(f"{task}: the noise explanation {verdict}")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
