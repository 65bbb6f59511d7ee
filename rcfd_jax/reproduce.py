"""The paper's finding on one CPU: reward over-optimization, and RCfD curing it untuned.

    python -m rcfd_jax.reproduce --workdir=runs/reproduce [--quick]

builds everything from a seed, in one process, under DIR:
  DIR/assets/             corpus, tokenizer, random GPT-2s (rcfd_jax.prepare)
  DIR/splits/             the reviews SFT and RM train on: the corpus less every review
                          whose prompt either task holds out for validation (and its
                          positive reviews, for the sentiment policy)
  DIR/sft/model           SFT policy (configs/sft_tiny.py settings); the loglik task's
  DIR/sft_positive/model  the SFT policy fine-tuned on the positive reviews, i.e. on the
                          demonstrations of the sentiment task; that task's policy
  DIR/rm/model            sentiment classifier from the SFT trunk (configs/rm_tiny.py)
  DIR/runs/TASK/METHOD/   one trainer workdir per arm (configs/reproduce.py:TASK,DIR):
                          METHOD = sft (the SFT policy itself, evaluated), max,
                          kl_BETA (one per beta in BETAS), rcfd
  DIR/results.json        {task: {method: {reward_mean, demo_reward_mean, demo_reward_std, alignment,
                          distinct_2, sft_distinct_2, demo_distinct_2, length_mean, kl}}}
  DIR/results_best.json   the same at each arm's checkpoint of highest mean validation value of
                          its own training reward (the paper's selection), plus its step
  DIR/results.md          the same as tables, the check of the targets, how much the prompt
                          predicts the demonstrations' reward (predictability), sample completions
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

from rcfd_jax import data, evaluation, prepare, supervised, train, validate
from rcfd_jax.errors import UserError, exit_on_user_error

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TASKS = ("loglik", "sentiment")
BETAS = (0.01, 0.1)        # KL arms; 0.01 is too weak on both tasks, 0.1 too strong on loglik
QUICK_BETAS = (0.1,)
PREDICTABILITY_SAMPLES = 4  # SFT completions per validation prompt for reproduce.predictability
PREDICTABILITY_KEYS = ("prompt_corr", "samples_per_prompt", "sft_within_prompt_std", "sft_between_prompt_std",
                      "demo_std")
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


STAGES = ("sft", "sft_positive", "rm")
POSITIVE_SFT_STEPS = 150   # ~2.5 epochs of the positive training reviews, from the SFT policy


def stage_config(stage: str, d: Path, quick: bool):
  c = load_config("rm_tiny" if stage == "rm" else "sft_tiny", str(d / "assets"))
  c.data.path = str(d / "splits" / ("positive.jsonl" if stage == "sft_positive" else "train.jsonl"))
  if stage != "sft":
    c.model.path = str(d / "sft" / "model")
  if stage == "sft_positive":  # SFT on the sentiment task's demonstrations: a short fine-tune
    c.total_steps, c.optim.learning_rate, c.optim.warmup_steps = POSITIVE_SFT_STEPS, 1e-3, 10
  if quick:
    c.total_steps, c.batch_size, c.seq_len, c.data.validation_size = 6, 8, 64, 16
    c.optim.warmup_steps, c.log_every_steps = 2, 3
  return c


def write_training_reviews(d: Path, quick: bool) -> None:
  """DIR/splits/{train,positive}.jsonl: the corpus less the reviews either task validates on.

  The RL validation prompts are drawn by data.load from each task's config; a
  review is held out when its text starts with a validation prompt followed by
  its demonstration (the continuation format cuts the review there), so SFT
  and RM never see the text the arms are evaluated on.
  """
  out = d / "splits"
  if (out / "positive.jsonl").exists():
    return
  tokenizer = train.load_tokenizer(str(d / "assets" / "policy"))
  held = set()
  for task in TASKS:
    val = data.load(rl_config(task, Arm("sft", ""), d, quick).data, tokenizer).validation
    held.update(p + y for p, y in zip(val.prompt_texts, val.demo_texts))
  lines = (d / "assets" / "reviews.jsonl").read_text(encoding="utf-8").splitlines()
  rows = [json.loads(line) for line in lines]
  keep = [i for i, r in enumerate(rows) if not any(r["text"].startswith(h) for h in held)]
  if len(lines) - len(keep) < len(held):
    raise RuntimeError(f"matched {len(lines) - len(keep)} reviews to {len(held)} validation prompts")
  out.mkdir(parents=True, exist_ok=True)
  positive = [i for i in keep if rows[i]["label"] == "positive"]
  for name, idx in (("train.jsonl", keep), ("positive.jsonl", positive)):
    tmp = out / f"{name}.tmp"
    tmp.write_text("".join(lines[i] + "\n" for i in idx), encoding="utf-8")
    tmp.replace(out / name)
  logging.info("SFT and RM train on %d of %d reviews (%d positive); %d held out for validation",
               len(keep), len(lines), len(positive), len(lines) - len(keep))


def build_stages(d: Path, quick: bool) -> bool:
  """Assets, training reviews, SFT policies, reward model; each is skipped when its output exists.

  Returns True if any stage ran.
  """
  if quick:
    prepare.build(d / "assets", n_reviews=400, width=32)
  else:
    prepare.build(d / "assets")
  write_training_reviews(d, quick)
  ran = False
  for stage in STAGES:
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
  result = validate.run(s, s.steps, state, wd, 0)
  n = min(config.eval.num_prompts, len(s.val))
  demos = {"demo_distinct_2": evaluation.distinct_n(s.val.demo_ids[:n], 2),
           "demo_length_mean": float(np.mean([len(x) for x in s.val.demo_ids[:n]])),
           **predictability(s, s.steps, state, n)}
  (wd / "demos.json").write_text(json.dumps(demos, indent=2) + "\n")
  return result


def predictability(s, steps, state, n: int, samples: int = PREDICTABILITY_SAMPLES) -> dict:
  """How much of the demonstration's reward R_d the prompt x predicts, seen from the SFT policy.

  RCfD's expected loss on a prompt is (E[R | x] - R_d)^2 + Var(R | x). Over
  the demonstrations a prompt like x could have, the first term is least at
  E[R | x] = E[R_d | x], and the second rewards no spread at all: a policy
  follows each demonstration's reward only as far as x predicts it. Measured
  with `samples` completions per prompt: corr(mean reward of the prompt's
  completions, R_d), and the spreads of the SFT policy's rewards within and
  between prompts.
  """
  rewards = []
  for k in range(samples):  # a new sampling key per pass: the step folds into the key
    g = validate.generate(s, steps, state.replace(step=state.step + k), s.val, s.demo_val, n)
    rewards.append(g["rewards"][:, 0])
  r, demo = np.stack(rewards, axis=1), g["demo"][:, 0]
  mean = r.mean(axis=1)
  return {"prompt_corr": float(np.corrcoef(mean, demo)[0, 1]),
          "samples_per_prompt": samples,
          "sft_within_prompt_std": float(np.sqrt(r.var(axis=1, ddof=1).mean())),
          "sft_between_prompt_std": float(mean.std()),
          "demo_std": float(demo.std())}


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


def objective_value(ev: dict, arm: Arm) -> float:
  """Mean validation value of the reward the arm trains on: what the paper's selection maximizes."""
  if arm.objective == "rcfd":
    return ev["rcfd_reward_mean"]
  if arm.objective == "kl":
    return ev["reward_mean"] - arm.beta * ev["kl"]
  return ev["reward_mean"]


def arm_evals(wd: Path) -> list[dict]:
  """Every evaluation of one arm, by step."""
  evs = [json.loads(p.read_text()) for p in (wd / "eval").glob("step_*.json")]
  return sorted(evs, key=lambda ev: ev["step"])


def collect(d: Path, quick: bool) -> tuple[dict, dict, dict]:
  """(results.json: after the last step, results_best.json: the paper's selected checkpoint, extras).

  extras holds the samples, demo lengths, training curves and predictability figures.
  """
  results, best, extras = {}, {}, {}
  for task in TASKS:
    sft_dir = d / "runs" / task / "sft"
    demos = json.loads((sft_dir / "demos.json").read_text())
    sft = json.loads((sft_dir / "eval" / "step_0.json").read_text())
    results[task], best[task] = {}, {}
    extras[task] = {"demo_length_mean": demos["demo_length_mean"], "samples": {}, "curves": {},
                    "predictability": {k: demos[k] for k in PREDICTABILITY_KEYS}}
    extra = {"sft_distinct_2": sft["distinct_2"], "demo_distinct_2": demos["demo_distinct_2"]}

    def row(ev: dict) -> dict:
      merged = {**ev, **extra}
      return {k: merged[k] for k in KEYS}

    for arm in arms(quick):
      wd = d / "runs" / task / arm.name
      evals = arm_evals(wd)  # the SFT arm's one evaluation at step 0, or an arm's up to its last step
      last = evals[-1]
      chosen = max(evals, key=lambda ev, arm=arm: objective_value(ev, arm))
      results[task][arm.name] = row(last)
      best[task][arm.name] = {**row(chosen), "step": chosen["step"]}
      extras[task]["samples"][arm.name] = last.get("samples", [])
      if arm.objective:
        extras[task]["curves"][arm.name] = _curve(wd / "metrics.jsonl")
  return results, best, extras


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


def _table(task: str, r: dict, demo_length: float, with_step: bool) -> list[str]:
  demo = next(iter(r.values()))
  step_head, step_rule = (" step |", "---|") if with_step else ("", "")
  lines = [f"| {task} |{step_head} reward | (reward - demo) / demo std | A | distinct-2 | length | KL |",
           f"|---|{step_rule}---|---|---|---|---|---|",
           f"| demonstrations |{' - |' if with_step else ''} {demo['demo_reward_mean']:.3f} ± "
           f"{demo['demo_reward_std']:.3f} | 0 | - | {demo['demo_distinct_2']:.3f} | {demo_length:.1f} | - |"]
  for name, m in r.items():
    gap = (m["reward_mean"] - m["demo_reward_mean"]) / m["demo_reward_std"]
    step = f" {m['step']} |" if with_step else ""
    lines.append(f"| {name} |{step} {m['reward_mean']:.3f} | {gap:+.2f} | {m['alignment']:.3f} | "
                 f"{m['distinct_2']:.3f} | {m['length_mean']:.1f} | {m['kl']:.2f} |")
  return lines + [""]


def _targets(targets) -> list[str]:
  return (["| target | met | measured |", "|---|---|---|"]
          + [f"| {t} | {'met' if ok else 'NOT met'} | {v} |" for t, ok, v in targets] + [""])


def markdown(results: dict, best: dict, extras: dict, targets, best_targets, timing: dict) -> str:
  lines = ["# RCfD reproduction on one CPU", "",
           "Produced by `python -m rcfd_jax.reproduce`. Rewards, A, distinct-2, length and KL(pi || pi_SFT)",
           "are measured on the validation prompts, one sample each at temperature 1, after the last step.",
           "A = KL(demo reward histogram || policy reward histogram), 0 is perfect.", ""]
  for task, r in results.items():
    lines += [f"## {task}", "", *_table(task, r, extras[task]["demo_length_mean"], with_step=False)]
  lines += ["## Targets", "", *_targets(targets)]
  lines += ["## The paper's checkpoint selection", "",
            "The paper keeps, of each run, the checkpoint with the highest mean validation reward. Here each",
            "arm is evaluated every `eval.every_steps` and the evaluation with the highest mean value of the",
            "arm's own training reward is kept: R for max, R - beta * KL for kl, -(R - R_d)^2 for rcfd",
            "(results_best.json). The validation prompts choose the checkpoint and score it, as in the paper.", ""]
  for task, r in best.items():
    lines += _table(task, r, extras[task]["demo_length_mean"], with_step=True)
  lines += _targets(best_targets)
  lines += ["## How much of the demonstrations' reward the prompt predicts", "",
            "RCfD's expected loss on a prompt is (E[R | x] - R_d)^2 + Var(R | x): the policy can match",
            "each demonstration's reward only as far as the prompt predicts it, and meets the rest best",
            "with no spread in its own reward. Measured on the SFT policy, with several completions",
            "per validation prompt:", "",
            "| task | corr(mean reward of the prompt's completions, R_d) | SFT reward std within prompts |"
            " SFT std of per-prompt means | demo reward std |", "|---|---|---|---|---|"]
  for task in results:
    q = extras[task]["predictability"]
    lines.append(f"| {task} | {q['prompt_corr']:+.3f} ({q['samples_per_prompt']} completions per prompt) | "
                 f"{q['sft_within_prompt_std']:.3f} | {q['sft_between_prompt_std']:.3f} | {q['demo_std']:.3f} |")
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
  results, best, extras = collect(d, quick)
  targets = check_targets(results, None if quick else timing["total"])
  best_targets = check_targets(best, None)
  (d / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  (d / "results_best.json").write_text(json.dumps(best, indent=2) + "\n")
  plot(results, extras, d / "results.png")
  (d / "results.md").write_text(markdown(results, best, extras, targets, best_targets, timing))
  for t, ok, v in targets:
    logging.info("target %s: %s (%s)", t, "met" if ok else "NOT met", v)
  for t, ok, v in best_targets:
    logging.info("target at the selected checkpoint, %s: %s (%s)", t, "met" if ok else "NOT met", v)
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
