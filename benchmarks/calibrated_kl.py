"""The least-KL calibrations: the kl objective with a beta the demonstrations set, or rcfd_tilt (docs/reproduce.md).

    python -m rcfd_jax.reproduce --workdir=DIR --seeds=3     # first: assets, stages, the arms compared
    python -m rcfd_jax.reproduce.frontier --workdir=DIR      # the loglik frontier, read if present
    python benchmarks/calibrated_kl.py --workdir=DIR [--seeds=3] [--beta0=1] [--objective=rcfd_tilt [--proposal=reference]]

By default runs objective kl with rl.adaptive_kl=True and
rl.adaptive_kl_signal=demo_reward (beta starts at --beta0, 0.1 unless given,
and moves by at most 2% a step: kl_horizon 640 rollouts); with
--objective=rcfd_tilt, that objective instead (no beta), on the policy's
samples or, with --proposal=reference, on pi_0's (rl.tilt_proposal=reference,
rl.baseline=none). Everything else as the reproduction's arms, on the four
tasks for each seed below --seeds (DIR/runs/TASK/kl_demo_seedS,
kl_demo_bB_seedS for --beta0=B, tilt_seedS for rcfd_tilt, tilt_ref_seedS for
its reference proposal), two at a time, reusing DIR/jax_cache; finished arms are reused.
Then prints, per task and seed, its gap / A / distinct-2 share / KL / last
beta (kl) or lambda (rcfd_tilt) after the last step beside rcfd_group's
(when that seed of rcfd_group ran), the rcfd_group targets met, and on the
loglik tasks the frontier's distinct-2 share at its gap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rcfd_jax import config as config_lib  # noqa: E402
from rcfd_jax.reproduce import frontier, run as reproduce, runner  # noqa: E402

BETA0 = 0.1        # the stronger kl arm's beta
HORIZON = 640.0    # rollouts: 64 a step, so beta moves by at most 0.2 * 64 / 640 = 2% a step
TASKS = tuple(reproduce.TASKS)  # the reproduction's four tasks, in its order


OURS = ("kl_demo", "tilt")  # the arms this script runs, by name prefix


def method_name(objective: str, beta0: float, proposal: str = "policy") -> str:
  """The arm's name: kl_demo for the first design's start, kl_demo_bB for another, tilt (tilt_ref) for rcfd_tilt."""
  if objective == "rcfd_tilt":
    return "tilt_ref" if proposal == "reference" else "tilt"
  return "kl_demo" if beta0 == BETA0 else f"kl_demo_b{beta0:g}"


def arm_dir(d: Path, task: str, seed: int, method: str) -> Path:
  if method.startswith(OURS):
    return d / "runs" / task / f"{method}_seed{seed}"
  return d / "runs" / task / (method if seed == 0 else f"{method}_seed{seed}")


def command(d: Path, task: str, seed: int, objective: str, beta0: float, proposal: str = "policy") -> list[str]:
  if objective == "rcfd_tilt":
    arm = ["--config.rl.objective=rcfd_tilt"]
    if proposal == "reference":
      arm += ["--config.rl.tilt_proposal=reference", "--config.rl.baseline=none"]
  else:
    arm = ["--config.rl.objective=kl", f"--config.rl.beta={beta0}", "--config.rl.adaptive_kl=True",
           "--config.rl.adaptive_kl_signal=demo_reward", f"--config.rl.kl_horizon={HORIZON}"]
  return [sys.executable, "-m", "rcfd_jax.main", f"--config={config_lib.experiment_file('reproduce')}:{task},{d}",
          *arm, f"--config.seed={seed}", f"--workdir={arm_dir(d, task, seed, method_name(objective, beta0, proposal))}"]


def run_all(d: Path, runs: list[tuple[str, int]], objective: str, beta0: float, parallel: int,
            proposal: str = "policy") -> None:
  m = method_name(objective, beta0, proposal)
  runner.run_commands(d, {f"{t}/{m}_seed{s}": (command(d, t, s, objective, beta0, proposal),
                                               arm_dir(d, t, s, m) / "eval" / "step_200.json") for t, s in runs},
                      parallel)


def row(d: Path, task: str, seed: int, method: str) -> dict | None:
  """The arm's last evaluation (reproduce.last_row), with the beta or lambda of its last logged step."""
  wd = arm_dir(d, task, seed, method)
  r = reproduce.last_row(d, task, wd)
  if r is not None:
    last = json.loads((wd / "metrics.jsonl").read_text().splitlines()[-1])
    r["coef"] = last.get("tilt_lambda" if method.startswith("tilt") else "beta", float("nan"))
  return r


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="The reproduction's DIR, after `rcfd_jax.reproduce`.")
  ap.add_argument("--seeds", type=int, default=1, help="Seeds 0 .. S-1 of every task.")
  ap.add_argument("--beta0", type=float, default=BETA0, help="beta at the start (docs/reproduce.md: 0.1, then 1).")
  ap.add_argument("--objective", choices=("kl", "rcfd_tilt"), default="kl",
                  help="kl: the demonstration-steered beta; rcfd_tilt: the tilt, which has none.")
  ap.add_argument("--proposal", choices=("policy", "reference"), default="policy",
                  help="rcfd_tilt's samples: the policy's (default) or pi_0's (rl.tilt_proposal=reference).")
  ap.add_argument("--parallel", type=int, default=2)
  args = ap.parse_args()
  d = Path(args.workdir)
  if not (d / "runs").exists():
    sys.exit(f"{d} holds no reproduction: run `python -m rcfd_jax.reproduce --workdir={d}` first")
  runs = [(t, s) for s in range(args.seeds) for t in TASKS]
  if args.objective == "rcfd_tilt" and args.beta0 != BETA0:
    sys.exit("--beta0 sets the kl objective's start; rcfd_tilt has no beta: drop --beta0")
  if args.proposal != "policy" and args.objective != "rcfd_tilt":
    sys.exit("--proposal sets where rcfd_tilt's samples come from: add --objective=rcfd_tilt or drop --proposal")
  run_all(d, runs, args.objective, args.beta0, args.parallel, args.proposal)
  edges = json.loads((d / "frontier.json").read_text()) if (d / "frontier.json").exists() else {}
  print("| task | seed | method | gap | A (SFT) | distinct-2 vs SFT | frontier at gap | KL | beta or lambda "
        "| targets met |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for task, seed in sorted(runs, key=lambda ts: (TASKS.index(ts[0]), ts[1])):
    for method in (method_name(args.objective, args.beta0, args.proposal), "rcfd_group"):
      r = row(d, task, seed, method)
      if r is None:
        print(f"| {task} | {seed} | {method} | (no run) |||||||")
        continue
      met = (abs(r["gap"]) <= 0.1) + (r["alignment"] <= r["sft_alignment"]) + (r["distinct_share"] >= 0.8)
      curve = [(p["gap"], p["distinct_share"]) for p in edges.get(task, {}).get("points", [])]
      edge = frontier.interpolate(curve, r["gap"]) if curve else None
      coef = f"{r['coef']:.3f}" if method.startswith(OURS) else "-"
      print(f"| {task} | {seed} | {method} | {r['gap']:+.2f} | {r['alignment']:.3f} ({r['sft_alignment']:.3f}) "
            f"| {r['distinct_share']:.0%} | {'-' if edge is None else f'{edge:.0%}'} | {r['kl']:.1f} | {coef} "
            f"| {met} of 3 |")


if __name__ == "__main__":
  main()
