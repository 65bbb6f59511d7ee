"""The loglik frontier: how much diversity any policy can keep at a given likelihood.

    python -m rcfd_jax.reproduce.frontier --workdir=DIR [--quick]

after `python -m rcfd_jax.reproduce --workdir=DIR` (with the same --quick).
The loglik reward is a completion's mean per-token log-likelihood under the
frozen SFT policy pi_0, and at every position E_pi[log pi_0] = -H(pi) -
KL(pi || pi_0): at a given likelihood, the policy of most entropy is the one
of least KL, pi_0 sharpened (pi ~ pi_0^(1/T); per token exactly, over a
sequence approximately when sampled token by token at temperature T). So
the SFT policy sampled at temperatures below 1, untrained, traces the most
diverse policies the reward allows at each likelihood.

On every loglik task this evaluates the SFT policy as the reproduction
evaluates every arm, at each of TEMPERATURES (DIR/frontier/TASK/tT, reused
when present), reads the frontier's distinct-2 share at the demonstrations'
level (gap 0), and places every evaluation of every trained arm above or
below the frontier at its own gap (the extra seeds' arms too, when
`--seeds` ran them). Writes DIR/frontier.json and
DIR/frontier.md, and prints the latter. Temperature 1 is the SFT row of
results.json, to the last digit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rcfd_jax.errors import UserError
from rcfd_jax.reproduce import report, run

TEMPERATURES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
QUICK_TEMPERATURES = (1.0, 0.5)
KEEP = 0.8  # the share of the SFT policy's distinct-2 that the targets ask of rcfd_group


def loglik_tasks(quick: bool) -> tuple[str, ...]:
  return tuple(t for t in run.tasks(quick) if run.TASKS[t][1] == "loglik")


def measure(d: Path, task: str, temperature: float, quick: bool) -> dict:
  """The task's SFT policy, untrained, evaluated like every arm but sampling at `temperature`."""
  wd = d / "frontier" / task / f"t{temperature:g}"
  done = wd / "eval" / "step_0.json"
  if done.exists():
    return json.loads(done.read_text())
  config = run.rl_config(task, run.Arm("sft", ""), d, quick)
  config.eval.temperature = temperature
  return run.evaluate(config, wd)[2]


def seeds_run(d: Path, task: str) -> int:
  """1 + the highest extra seed whose arm `rcfd_jax.reproduce --seeds` ran on `task` (1 if none)."""
  seeds = [0]
  for p in (d / "runs" / task).glob("*_seed*"):
    method, _, seed = p.name.rpartition("_seed")
    if method in run.SEED_METHODS and seed.isdigit():
      seeds.append(int(seed))
  return max(seeds) + 1


def interpolate(points: list[tuple[float, float]], at: float) -> float | None:
  """The frontier's share at gap `at`: linear between the neighbouring (gap, share) points; None outside."""
  pts = sorted(points)
  for (g0, s0), (g1, s1) in zip(pts, pts[1:]):
    if g0 <= at <= g1:
      return s0 if g1 == g0 else s0 + (s1 - s0) * (at - g0) / (g1 - g0)
  return None


def frontier(d: Path, quick: bool) -> dict:
  """{task: frontier points, its share at gap 0, entropies, and every trained arm's evaluations against it}."""
  out = {}
  for task in loglik_tasks(quick):
    if not run.sft_eval_path(d, task).exists():
      raise UserError(f"{run.sft_eval_path(d, task)} is missing: run `python -m rcfd_jax.reproduce --workdir={d}"
                      f"{' --quick' if quick else ''}` first")
    sft = run.sft_eval(d, task)
    points = []
    for t in QUICK_TEMPERATURES if quick else TEMPERATURES:
      ev = measure(d, task, t, quick)
      points.append({"temperature": t, "gap": report.gap(ev), "distinct_share": ev["distinct_2"] / sft["distinct_2"],
                     "alignment": ev["alignment"], "length_mean": ev["length_mean"],
                     "reward_mean": ev["reward_mean"], "distinct_2": ev["distinct_2"]})
    curve = [(p["gap"], p["distinct_share"]) for p in points]
    arms = {}
    for arm in run.arms(quick, seeds_run(d, task)):  # the extra seeds' arms too, where --seeds ran them
      if not arm.objective or not (d / "runs" / task / arm.name / "eval").exists():
        continue
      arms[arm.name] = []
      for ev in run.arm_evals(d / "runs" / task / arm.name):
        at = report.gap(ev)
        arms[arm.name].append({"step": ev["step"], "gap": at, "distinct_share": ev["distinct_2"] / sft["distinct_2"],
                               "frontier_share": interpolate(curve, at), "entropy": ev["entropy"]})
    out[task] = {"points": points, "at_gap_zero": interpolate(curve, 0.0),
                 "sft_matches_results": (  # both temperature lists start at 1
                     points[0]["reward_mean"] == sft["reward_mean"] and points[0]["distinct_2"] == sft["distinct_2"]),
                 "sft_entropy": sft["entropy"], "entropy_ceiling": -sft["demo_reward_mean"], "arms": arms}
  return out


def _pct(x: float | None) -> str:
  return "-" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


def markdown(fr: dict) -> str:
  lines = ["# The loglik frontier: the SFT policy sharpened, untrained", ""]
  for task, f in fr.items():
    steps = sorted({e["step"] for evals in f["arms"].values() for e in evals})
    lines += [f"## {task}", "",
              "| temperature | gap (demo std) | distinct-2 vs SFT | A | length |", "|---|---|---|---|---|"]
    lines += [f"| {p['temperature']:g} | {p['gap']:+.2f} | {_pct(p['distinct_share'])} | {p['alignment']:.3f} "
              f"| {p['length_mean']:.1f} |" for p in f["points"]]
    zero = f["at_gap_zero"]
    if zero is None:
      reading = "the temperatures do not bracket the demonstrations' level: no reading"
    elif zero < KEEP:
      reading = (f"below {_pct(KEEP)}: the most diverse policies at the demonstrations' likelihood keep less "
                 f"than the target asks, so on this task the target, not the estimator, fails")
    else:
      reading = (f"{_pct(KEEP)} or more: policies that meet the target exist, and the trained arms' "
                 f"shortfall below is the method's")
    lines += ["", f"Frontier at gap 0: {_pct(zero)} of the SFT policy's distinct-2; {reading}.",
              f"Temperature 1 reproduces the SFT row of results.json: {'yes' if f['sft_matches_results'] else 'NO'}.",
              f"Token entropy: the SFT policy's {f['sft_entropy']:.2f} nats; at the demonstrations' level any "
              f"policy's is at most -L_d = {f['entropy_ceiling']:.2f}.", "",
              "Every evaluation of each trained arm: gap / distinct-2 share / the frontier's share at that gap "
              "(- outside the temperatures' range) / token entropy.", "",
              "| arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, evals in f["arms"].items():
      by_step = {e["step"]: e for e in evals}
      lines.append(f"| {name} | " + " | ".join(
          f"{e['gap']:+.2f} / {_pct(e['distinct_share'])} / {_pct(e['frontier_share'])} / {e['entropy']:.2f}"
          if (e := by_step.get(s)) else "-" for s in steps) + " |")
    lines.append("")
  return "\n".join(lines)


def main(workdir: str, quick: bool) -> dict:
  d = Path(workdir)
  fr = frontier(d, quick)
  (d / "frontier.json").write_text(json.dumps(fr, indent=2) + "\n")
  md = markdown(fr)
  (d / "frontier.md").write_text(md)
  print(md)
  return fr


if __name__ == "__main__":
  from absl import app, flags

  from rcfd_jax.errors import exit_on_user_error

  flags.DEFINE_string("workdir", None, "The reproduction's directory, after `python -m rcfd_jax.reproduce`.")
  flags.DEFINE_bool("quick", False, "The --quick reproduction's directory: two temperatures.")
  flags.mark_flags_as_required(["workdir"])

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    jax.config.update("jax_compilation_cache_dir", str(Path(flags.FLAGS.workdir) / "jax_cache"))
    exit_on_user_error(main)(flags.FLAGS.workdir, flags.FLAGS.quick)

  app.run(_main)
