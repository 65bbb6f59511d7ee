"""The paper's finding on one CPU: reward over-optimization, and RCfD curing it untuned.

    python -m rcfd_jax.reproduce --workdir=runs/reproduce [--quick]

builds everything from a seed, in one process, under DIR:
  DIR/assets/             corpus, tokenizer, random GPT-2s (rcfd_jax.prepare)
  DIR/sft/model           SFT policy (configs/sft_tiny.py settings)
  DIR/rm/model            sentiment classifier from the SFT trunk (configs/rm_tiny.py)
  DIR/runs/TASK/METHOD/   one trainer workdir per arm (configs/reproduce.py:TASK,DIR):
                          METHOD = sft (the SFT policy itself, evaluated), max,
                          kl_BETA (one per beta in BETAS), rcfd
  DIR/results.json        {task: {method: {reward_mean, demo_reward_mean, demo_reward_std, alignment,
                          distinct_2, sft_distinct_2, demo_distinct_2, length_mean, kl}}}
  DIR/results.md          the same as tables, the check of the targets, sample completions
  DIR/results.png         reward during training vs the demonstrations; A, length, distinct-2, KL
Every arm differs from the others only in rl.objective and rl.beta. A
finished stage or arm is reused, an interrupted one resumes from its
checkpoint, so rerunning the command finishes what is missing and rewrites
the reports. --quick shrinks everything (tiny corpus, few steps, one beta):
it checks the plumbing in about a minute and its numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from rcfd_jax import evaluation, prepare, supervised, train, validate
from rcfd_jax.errors import UserError, exit_on_user_error

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TASKS = ("loglik", "sentiment")
BETAS = (0.01, 0.1)        # KL arms; 0.01 is too weak on both tasks, 0.1 too strong on loglik
QUICK_BETAS = (0.1,)
TIME_BUDGET_S = 20 * 60    # the target for the whole comparison on 2 CPU cores
KEYS = ("reward_mean", "demo_reward_mean", "demo_reward_std", "alignment", "distinct_2",
        "sft_distinct_2", "demo_distinct_2", "length_mean", "kl")


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  objective: str   # "" for the SFT policy, evaluated without training
  beta: float = 0.0


def arms(quick: bool) -> list[Arm]:
  kl = [Arm(f"kl_{b:g}", "kl", b) for b in (QUICK_BETAS if quick else BETAS)]
  return [Arm("sft", ""), Arm("max", "max"), *kl, Arm("rcfd", "rcfd")]


def load_config(name: str, arg: str):
  """get_config(arg) of configs/NAME.py: the same files `main --config=` reads."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ----------------------------------------------------------------------------- stages


def stage_config(stage: str, d: Path, quick: bool):
  c = load_config("sft_tiny" if stage == "sft" else "rm_tiny", str(d / "assets"))
  if stage == "rm":
    c.model.path = str(d / "sft" / "model")
  if quick:
    c.total_steps, c.batch_size, c.seq_len, c.data.validation_size = 6, 8, 64, 16
    c.optim.warmup_steps, c.log_every_steps = 2, 3
  return c


def build_stages(d: Path, quick: bool) -> bool:
  """Assets, SFT policy, reward model; each is skipped when its output exists. True if any ran."""
  if quick:
    prepare.build(d / "assets", n_reviews=400, width=32)
  else:
    prepare.build(d / "assets")
  ran = False
  for stage in ("sft", "rm"):
    if (d / stage / "eval.json").exists() and (d / stage / "model" / "config.json").exists():
      logging.info("reusing %s", d / stage)
      continue
    supervised.run(stage_config(stage, d, quick), str(d / stage))
    ran = True
  return ran


# ----------------------------------------------------------------------------- RL arms


def rl_config(task: str, arm: Arm, d: Path, quick: bool):
  c = load_config("reproduce", f"{task},{d}")
  c.rl.objective = arm.objective or "max"
  c.rl.beta = arm.beta
  if quick:
    c.total_steps, c.data.validation_size, c.eval.num_prompts = 4, 16, 16
    c.rollout.prompts_per_step, c.rollout.samples_per_prompt = 8, 2
    c.rollout.max_new_tokens = c.data.demo_max_tokens = 16
    c.reward.classifier.max_tokens = 24
    c.checkpoint.every_steps = c.eval.every_steps = c.log_every_steps = 2
    c.mesh.devices = 1  # one device compiles faster than a mesh over the test suite's 8 forced ones
  return c


def evaluate_sft(config, wd: Path) -> dict:
  """The SFT policy itself, evaluated like a trained arm at step 0; plus the demos' diversity."""
  s, state = train.build(config, wd)
  wd = train.prepare_workdir(str(wd))
  (wd / "config.json").write_text(config.to_json_best_effort(indent=2))
  steps = train.compile_steps(s)
  result = validate.run(s, steps.eval_rollout, state, wd, 0)
  n = min(config.eval.num_prompts, len(s.val))
  demos = {"demo_distinct_2": evaluation.distinct_n(s.val.demo_ids[:n], 2),
           "demo_length_mean": float(np.mean([len(x) for x in s.val.demo_ids[:n]]))}
  (wd / "demos.json").write_text(json.dumps(demos, indent=2) + "\n")
  return result


def final_eval(config, wd: Path) -> Path:
  return wd / "eval" / f"step_{config.total_steps}.json"


def run_arm(task: str, arm: Arm, d: Path, quick: bool) -> float:
  """Trains (or evaluates) one arm unless its final evaluation exists; returns seconds spent."""
  config = rl_config(task, arm, d, quick)
  wd = d / "runs" / task / arm.name
  done = wd / "eval" / "step_0.json" if not arm.objective else final_eval(config, wd)
  if done.exists():
    logging.info("reusing %s", wd)
    return 0.0
  t0 = time.perf_counter()
  logging.info("running %s/%s", task, arm.name)
  if arm.objective:
    train.run(config, str(wd))
  else:
    evaluate_sft(config, wd)
  return time.perf_counter() - t0


# ----------------------------------------------------------------------------- results


def collect(d: Path, quick: bool) -> tuple[dict, dict]:
  """(results.json content, extras: samples, demo lengths, training curves) from the arms' files."""
  results, extras = {}, {}
  for task in TASKS:
    sft_dir = d / "runs" / task / "sft"
    demos = json.loads((sft_dir / "demos.json").read_text())
    sft = json.loads((sft_dir / "eval" / "step_0.json").read_text())
    results[task], extras[task] = {}, {"demo_length_mean": demos["demo_length_mean"], "samples": {},
                                       "curves": {}}
    for arm in arms(quick):
      wd = d / "runs" / task / arm.name
      path = wd / "eval" / "step_0.json" if not arm.objective else final_eval(rl_config(task, arm, d, quick), wd)
      ev = json.loads(path.read_text())
      row = {k: ev[k] for k in KEYS if k in ev}
      row.update(sft_distinct_2=sft["distinct_2"], demo_distinct_2=demos["demo_distinct_2"])
      results[task][arm.name] = {k: row[k] for k in KEYS}
      extras[task]["samples"][arm.name] = ev.get("samples", [])
      if arm.objective:
        extras[task]["curves"][arm.name] = _curve(wd / "metrics.jsonl")
  return results, extras


def _curve(path: Path) -> tuple[list[int], list[float]]:
  steps, rewards = [], []
  for line in path.read_text().splitlines():
    rec = json.loads(line)
    if rec.get("reward_mean") is not None:
      steps.append(rec["step"])
      rewards.append(rec["reward_mean"])
  return steps, rewards


def check_targets(results: dict, seconds: float | None) -> list[tuple[str, bool, str]]:
  """The issue's targets, as (target, met, measured) rows."""
  rows = []
  for task, r in results.items():
    mx, cfd = r["max"], r["rcfd"]
    mean, std = mx["demo_reward_mean"], mx["demo_reward_std"]
    over = (mx["reward_mean"] - mean) / std
    rows.append((f"{task}: max ends above the demos by > 1 demo std", over > 1.0,
                 f"({mx['reward_mean']:.3f} - {mean:.3f}) / {std:.3f} = {over:+.2f} std"))
    change = mx["distinct_2"] / mx["sft_distinct_2"] - 1.0
    rows.append((f"{task}: max distinct-2 falls >= 40% vs SFT", change <= -0.4,
                 f"{mx['distinct_2']:.3f} vs {mx['sft_distinct_2']:.3f}: {100 * change:+.0f}%"))
    gap = (cfd["reward_mean"] - mean) / std
    rows.append((f"{task}: rcfd reward within 0.1 demo std", abs(gap) <= 0.1,
                 f"({cfd['reward_mean']:.3f} - {mean:.3f}) / {std:.3f} = {gap:+.2f} std"))
    rows.append((f"{task}: rcfd Alignment A <= 0.1", cfd["alignment"] <= 0.1, f"A = {cfd['alignment']:.3f}"))
    rel = cfd["distinct_2"] / cfd["demo_distinct_2"] - 1.0
    rows.append((f"{task}: rcfd distinct-2 within 20% of the demos'", abs(rel) <= 0.2,
                 f"{cfd['distinct_2']:.3f} vs {cfd['demo_distinct_2']:.3f}: {100 * rel:+.0f}%"))
  if seconds is not None:
    rows.append(("whole comparison under 20 min on 2 CPU cores", seconds < TIME_BUDGET_S,
                 f"{seconds / 60:.1f} min"))
  return rows


def markdown(results: dict, extras: dict, targets, timing: dict) -> str:
  lines = ["# RCfD reproduction on one CPU", "",
           "Produced by `python -m rcfd_jax.reproduce`. Rewards, A, distinct-2, length and KL(pi || pi_SFT)",
           "are measured on the validation prompts, one sample each at temperature 1, after the last step.",
           "A = KL(demo reward histogram || policy reward histogram), 0 is perfect.", ""]
  for task, r in results.items():
    demo = next(iter(r.values()))
    lines += [f"## {task}", "", "| method | reward | (reward - demo) / demo std | A | distinct-2 | length | KL |",
              "|---|---|---|---|---|---|---|",
              f"| demonstrations | {demo['demo_reward_mean']:.3f} ± {demo['demo_reward_std']:.3f} | 0 | - | "
              f"{demo['demo_distinct_2']:.3f} | {extras[task]['demo_length_mean']:.1f} | - |"]
    for name, m in r.items():
      gap = (m["reward_mean"] - m["demo_reward_mean"]) / m["demo_reward_std"]
      lines.append(f"| {name} | {m['reward_mean']:.3f} | {gap:+.2f} | {m['alignment']:.3f} | "
                   f"{m['distinct_2']:.3f} | {m['length_mean']:.1f} | {m['kl']:.2f} |")
    lines.append("")
  lines += ["## Targets", "", "| target | met | measured |", "|---|---|---|"]
  lines += [f"| {t} | {'met' if ok else 'NOT met'} | {v} |" for t, ok, v in targets]
  lines += ["", "## Time", ""]
  lines += [f"- {k}: {v / 60:.1f} min" for k, v in timing.items() if k != "load"]
  lines += [f"- CPU load average (1 min) when the runs started / the reports were written: {timing['load']}",
            "  (the timings are wall clock: other jobs on the same cores slow them down)"]
  lines += ["", "![results](results.png)", "", "## Samples", ""]
  for task in results:
    for name, samples in extras[task]["samples"].items():
      lines.append(f"**{task} / {name}**")
      lines.append("")
      lines += [f"- _{s['prompt']}_ {s['completion']}".replace("\n", " ") for s in samples[:3]]
      lines.append("")
  return "\n".join(lines) + "\n"


def plot(results: dict, extras: dict, path: Path) -> None:
  """One row per task: training reward vs the demos, then A, length, distinct-2, KL per method."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(20, 4 * len(results)))
  axes = fig.subplots(len(results), 5, squeeze=False)
  for row, (task, r) in zip(axes, results.items()):
    demo = next(iter(r.values()))
    mean, std = demo["demo_reward_mean"], demo["demo_reward_std"]
    names = list(r)  # one colour per method in every panel
    for name, (steps, rewards) in extras[task]["curves"].items():
      row[0].plot(steps, rewards, label=name, color=f"C{names.index(name)}")
    row[0].axhline(mean, color="k", ls="--", label="demonstrations")
    row[0].axhspan(mean - std, mean + std, color="k", alpha=0.08)
    row[0].axhline(r["sft"]["reward_mean"], color="gray", ls=":", label="SFT")
    row[0].set(title=f"{task}: training reward", xlabel="step", ylabel="mean reward")
    row[0].legend(fontsize=8)
    for ax, key, ref, title in ((row[1], "alignment", None, "Alignment A (lower is better)"),
                                (row[2], "length_mean", extras[task]["demo_length_mean"], "length (tokens)"),
                                (row[3], "distinct_2", demo["demo_distinct_2"], "distinct-2"),
                                (row[4], "kl", None, "KL(pi || pi_SFT), nats")):
      ax.bar(names, [r[n][key] for n in names], color=[f"C{i}" for i in range(len(names))])
      if ref is not None:
        ax.axhline(ref, color="k", ls="--", label="demonstrations")
        ax.legend(fontsize=8)
      ax.set_title(f"{task}: {title}")
      ax.tick_params(axis="x", labelsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)


def reproduce(workdir: str, quick: bool = False) -> dict:
  """Runs (or reuses) every stage and arm, then writes results.json, results.md and results.png."""
  d = Path(workdir).expanduser().absolute()
  train.check_workdir(str(d))
  d.mkdir(parents=True, exist_ok=True)
  mode = d / "mode.txt"
  if mode.exists() and mode.read_text().strip() != ("quick" if quick else "full"):
    raise UserError(f"{d} holds a {mode.read_text().strip()} reproduction; pick another --workdir")
  mode.write_text("quick\n" if quick else "full\n")
  # Arms of one task compile the same evaluation rollout, and kl arms the same step (beta is
  # state): the persistent cache compiles each once, which matters when compiling is half the time.
  jax.config.update("jax_compilation_cache_dir", str(d / "jax_cache"))
  timing_file = d / "timing.json"
  timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
  t0 = time.perf_counter()
  load_at_start = os.getloadavg()[0]
  ran = build_stages(d, quick)
  timing["assets + SFT + RM"] = timing.get("assets + SFT + RM", 0.0) + time.perf_counter() - t0
  for task in TASKS:
    for arm in arms(quick):
      key = f"{task}/{arm.name}"
      seconds = run_arm(task, arm, d, quick)
      ran = ran or seconds > 0
      timing[key] = timing.get(key, 0.0) + seconds
      timing_file.write_text(json.dumps(timing, indent=2) + "\n")
  timing["total"] = sum(v for k, v in timing.items() if k not in ("total", "load"))
  if ran or "load" not in timing:  # the load while this invocation trained something
    timing["load"] = f"{load_at_start:.1f} / {os.getloadavg()[0]:.1f}"
  timing_file.write_text(json.dumps(timing, indent=2) + "\n")
  results, extras = collect(d, quick)
  targets = check_targets(results, None if quick else timing["total"])
  (d / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  plot(results, extras, d / "results.png")
  (d / "results.md").write_text(markdown(results, extras, targets, timing))
  for t, ok, v in targets:
    logging.info("target %s: %s (%s)", t, "met" if ok else "NOT met", v)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  exit_on_user_error(reproduce)(flags.FLAGS.workdir, flags.FLAGS.quick)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Directory for assets, runs and results.")
  flags.DEFINE_bool("quick", False, "Tiny corpus and few steps: checks the plumbing, numbers mean nothing.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
