"""The reports of rcfd_jax.reproduce: results.md and one plot per corpus regime."""

from __future__ import annotations

from pathlib import Path


def gap(m: dict) -> float:
  """How far a results row's mean reward is from the demonstrations': (reward - demo mean) / demo std."""
  return (m["reward_mean"] - m["demo_reward_mean"]) / m["demo_reward_std"]


def _table(task: str, r: dict, demo_length: float, with_step: bool) -> list[str]:
  demo = next(iter(r.values()))
  step_head, step_rule = (" step |", "---|") if with_step else ("", "")
  lines = [f"| {task} |{step_head} reward | (reward - demo) / demo std | A | distinct-2 | length | KL |",
           f"|---|{step_rule}---|---|---|---|---|---|",
           f"| demonstrations |{' - |' if with_step else ''} {demo['demo_reward_mean']:.3f} ± "
           f"{demo['demo_reward_std']:.3f} | 0 | - | {demo['demo_distinct_2']:.3f} | {demo_length:.1f} | - |"]
  for name, m in r.items():
    step = f" {m['step']} |" if with_step else ""
    lines.append(f"| {name} |{step} {m['reward_mean']:.3f} | {gap(m):+.2f} | {m['alignment']:.3f} | "
                 f"{m['distinct_2']:.3f} | {m['length_mean']:.1f} | {m['kl']:.2f} |")
  return lines + [""]


def _targets(targets) -> list[str]:
  return (["| target | met | measured |", "|---|---|---|"]
          + [f"| {t} | {'met' if ok else 'NOT met'} | {v} |" for t, ok, v in targets] + [""])


REGIME_NOTES = {
    "plain": "prompts are the first 8 tokens of a review, which say little of what follows",
    "voiced": "reviews open with a rating and a title in the reviewer's voice, so the first 8 tokens "
              "carry the verdict and the voice",
}


def markdown(results: dict, best: dict, extras: dict, targets, best_targets, timing: dict,
             regime_of: dict) -> str:
  """results.md: tables by regime (regime_of: task -> regime), targets, selection, predictability, time."""
  lines = ["# RCfD reproduction on one CPU", "",
           "Produced by `python -m rcfd_jax.reproduce`. Rewards, A, distinct-2, length and KL(pi || pi_SFT)",
           "are measured on the validation prompts at temperature 1, after the last step.",
           "A = KL(demo reward histogram || policy reward histogram), 0 is perfect.", ""]
  for regime in dict.fromkeys(regime_of.values()):
    lines += [f"## Regime {regime}: {REGIME_NOTES[regime]}", ""]
    for task, r in results.items():
      if regime_of[task] == regime:
        lines += _table(task, r, extras[task]["demo_length_mean"], with_step=False)
    lines += [f"![{regime}](results_{regime}.png)", ""]
  lines += ["## Targets", "", *_targets(targets)]
  lines += ["## The paper's checkpoint selection", "",
            "The paper keeps, of each run, the checkpoint with the highest mean validation reward. Here each",
            "arm is evaluated every `eval.every_steps` and the evaluation with the highest mean value of the",
            "arm's own training reward is kept: R for max, R - beta * KL for kl, -(R - R_d)^2 for rcfd,",
            "-(E[R | x] - R_d)^2 for rcfd_group (estimated from eval.samples_per_prompt samples per prompt)",
            "(results_best.json). The validation prompts choose the checkpoint and score it, as in the paper.", ""]
  for task, r in best.items():
    lines += _table(task, r, extras[task]["demo_length_mean"], with_step=True)
  lines += _targets(best_targets)
  lines += ["## How much of the demonstrations' reward the prompt predicts", "",
            "RCfD's expected loss on a prompt is (E[R | x] - R_d)^2 + Var(R | x): the policy can match",
            "each demonstration's reward only as far as the prompt predicts it, and meets the rest best",
            "with no spread in its own reward. Measured on the SFT policy, with several completions",
            "per validation prompt (prompt_predictability is the correlation):", "",
            "| task | corr(mean reward of the prompt's completions, R_d) | SFT reward std within prompts |"
            " SFT std of per-prompt means | demo reward std |", "|---|---|---|---|---|"]
  for task in results:
    q = extras[task]["predictability"]
    lines.append(f"| {task} | {q['prompt_corr']:+.3f} ({q['samples_per_prompt']} completions per prompt) | "
                 f"{q['sft_within_prompt_std']:.3f} | {q['sft_between_prompt_std']:.3f} | {q['demo_std']:.3f} |")
  lines += _paths(results, extras)
  jobs_s = {k: v for k, v in timing.items() if "/" in k}
  lines += ["", "## Time", ""]
  for total, load in (("total", "load"), ("total with extra seeds", "load with extra seeds")):
    if total in timing:
      lines += [f"- {'whole command' if total == 'total' else 'the --seeds arms'}, wall clock: "
                f"{timing[total] / 60:.1f} min, with {timing['parallel']} stages or arms at once; CPU load "
                f"average (1 min) when they started / ended: {timing[load]}"]
  lines += [f"- stages and arms in all: {sum(jobs_s.values()) / 60:.1f} min",
            f"- assets and splits: {timing['assets + splits'] / 60:.1f} min",
            *[f"- {k}: {v / 60:.1f} min" for k, v in jobs_s.items()],
            "  (the timings are wall clock: other jobs on the same cores slow them down)"]
  lines += ["", "## Samples", ""]
  for task in results:
    for name, samples in extras[task]["samples"].items():
      lines.append(f"**{task} / {name}**")
      lines.append("")
      lines += [f"- _{s['prompt']}_ {s['completion']}".replace("\n", " ") for s in samples[:3]]
      lines.append("")
  return "\n".join(lines) + "\n"


def _paths(results: dict, extras: dict) -> list[str]:
  """Every evaluation of each trained arm: how far it has calibrated, and what that cost so far."""
  lines = ["", "## Every evaluation: calibration against what it cost", "",
           "Per arm and evaluation step: (reward - demo mean) / demo std, distinct-2 as a share of the SFT",
           "policy's, KL(pi || pi_SFT) in nats. Arms that pass the same gap can be compared there.", ""]
  for task in results:
    evals = extras[task]["evals"]
    steps = sorted({ev["step"] for rows in evals.values() for ev in rows})
    lines += [f"| {task} | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, rows in evals.items():
      by_step = {ev["step"]: ev for ev in rows}
      cells = [f"{gap(m):+.2f} / {100 * m['distinct_2'] / m['sft_distinct_2']:.0f}% / {m['kl']:.1f}"
               if (m := by_step.get(s))
               else "-" for s in steps]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
  return lines


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


def seeds_markdown(by_seed: dict) -> str:
  """results.md's table of SEED_METHODS over seeds: gap in demo std / A / distinct-2 vs SFT."""
  tasks = list(by_seed)
  n = len(next(iter(next(iter(by_seed.values())).values())))
  lines = ["", "## Seeds", "",
           "After the last step, per seed: (reward - demo mean) / demo std, A (the SFT policy's A in the",
           "sft row of the tables above), distinct-2 as a share of the SFT policy's.", "",
           "| task | method | " + " | ".join(f"seed {s}" for s in range(n)) + " |",
           "|---|---|" + "---|" * n]
  for task in tasks:
    for method, rows in by_seed[task].items():
      cells = [f"{gap(m):+.2f} / {m['alignment']:.3f} / {100 * m['distinct_2'] / m['sft_distinct_2']:.0f}%"
               for m in rows]
      lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
