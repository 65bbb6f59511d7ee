"""The paper's finding on one CPU: reward over-optimization, RCfD, and when a prompt lets it calibrate.

    python -m rcfd_jax.reproduce --workdir=runs/reproduce [--quick] [--parallel=2] [--seeds=3]

builds everything from a seed under DIR, --parallel stages and arms at once,
in as many worker processes that run one job after another (runner.Workers;
`--job=NAME` runs one alone):
  DIR/REGIME/assets/        corpus (rcfd_jax.reproduce.corpus.REGIMES[REGIME]), tokenizer, random
                            GPT-2s (rcfd_jax.reproduce.prepare)
  DIR/REGIME/splits/        the reviews SFT and RM train on: the corpus less every review
                            whose prompt a task of the regime holds out for validation (and
                            its positive reviews, for the sentiment policy)
  DIR/REGIME/sft/model      SFT policy (configs/sft_tiny.py settings); the loglik task's
  DIR/REGIME/sft_positive/model  the SFT policy fine-tuned on the positive reviews, i.e. on the
                            demonstrations of the sentiment task; that task's policy
  DIR/REGIME/rm/model       sentiment classifier from the SFT trunk (configs/rm_tiny.py)
  DIR/runs/TASK/METHOD/     one trainer workdir per arm (configs/reproduce.py:TASK,DIR):
                            METHOD = sft (the SFT policy itself, evaluated), max,
                            kl_BETA (one per beta in BETAS), rcfd, rcfd_group
  DIR/logs/NAME.log         what each stage or arm printed (workerN.log: each worker, between jobs)
  DIR/results.json          {task: {method: {reward_mean, demo_reward_mean, demo_reward_std, alignment,
                            distinct_2, sft_distinct_2, demo_distinct_2, length_mean, kl}}}; each
                            sft entry also carries prompt_predictability
  DIR/results_best.json     the same at each arm's checkpoint of highest mean validation value of
                            its own training reward (the paper's selection), plus its step
  DIR/results.md            the same as tables by regime, the check of the targets, how much the
                            prompt predicts the demonstrations' reward, sample completions
  DIR/results_REGIME.png    reward during training vs the demonstrations; A, length, distinct-2, KL
  DIR/results_seeds.json    with --seeds=S > 1: {task: {method: [row of seed 0, 1, ...]}} for the
                            methods in SEED_METHODS, rerun with config.seed = 1 .. S-1 (arms
                            METHOD_seedN); results.md gets a table of them
REGIME is "plain" (tasks loglik and sentiment: a review's opening says little of
what follows) or "voiced" (loglik_voiced and sentiment_voiced: reviews open
with a rating and a title in the reviewer's voice; docs/reproduce.md).
Every arm differs from the others only in rl.objective and rl.beta. A
finished stage or arm is reused, an interrupted one resumes from its
checkpoint, so rerunning the command finishes what is missing and rewrites
the reports. Workers share compiled programs through DIR/jax_cache (every
task has the same shapes). --quick shrinks everything (tiny corpora, few
steps, one beta, one task per regime): it checks the plumbing and its
numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from absl import logging

from rcfd_jax import config as config_lib, evaluation, files, policy, prompts, supervised, train, validate
from rcfd_jax.errors import UserError
from rcfd_jax.reproduce import prepare, report
from rcfd_jax.reproduce.runner import Job, Workers, run_jobs


def load_config(name: str, arg: str):
  """get_config(arg) of configs/NAME.py: the same files `main --config=` reads."""
  return config_lib.load_file(config_lib.experiment_file(name)).get_config(arg)


TASKS = config_lib.load_file(config_lib.experiment_file("reproduce")).TASKS  # task -> (corpus regime, reward)
REGIMES = ("plain", "voiced")
QUICK_TASKS = ("loglik", "sentiment_voiced")  # one per regime and per reward: every stage and arm kind
BETAS = (0.01, 0.1)        # KL arms; 0.01 is too weak on both plain tasks, 0.1 too strong on loglik
QUICK_BETAS = (0.1,)
PREDICTABILITY_SAMPLES = 4  # SFT completions per validation prompt for predictability()
PREDICTABILITY_KEYS = ("prompt_corr", "samples_per_prompt", "sft_within_prompt_std", "sft_between_prompt_std",
                      "demo_std")
PREDICTABILITY_TARGET = 0.5  # the voiced regime's prompts must predict R_d at least this well
TIME_BUDGET_S = 20 * 60    # the target for the whole comparison on 2 CPU cores
KEYS = ("reward_mean", "demo_reward_mean", "demo_reward_std", "alignment", "distinct_2",
        "sft_distinct_2", "demo_distinct_2", "length_mean", "kl")


def tasks(quick: bool) -> tuple[str, ...]:
  return QUICK_TASKS if quick else tuple(TASKS)


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  objective: str   # "" for the SFT policy, evaluated without training
  beta: float = 0.0
  seed: int = 0    # config.seed: sampling and data order (the SFT policy and RM stay the same)


SEED_METHODS = ("rcfd", "rcfd_group")  # rerun on the extra seeds of --seeds


def arms(quick: bool, seeds: int = 1) -> list[Arm]:
  """The arms of every task: seed 0's, then SEED_METHODS again for seeds 1 .. seeds - 1."""
  kl = [Arm(f"kl_{b:g}", "kl", b) for b in (QUICK_BETAS if quick else BETAS)]
  main = [Arm("sft", ""), Arm("max", "max"), *kl, Arm("rcfd", "rcfd"), Arm("rcfd_group", "rcfd_group")]
  extra = [dataclasses.replace(a, name=f"{a.name}_seed{seed}", seed=seed)
           for seed in range(1, seeds) for a in main if a.name in SEED_METHODS]
  return main + extra


# ----------------------------------------------------------------------------- stages


STAGES = ("sft", "sft_positive", "rm")
POSITIVE_SFT_STEPS = 150   # ~2.5 epochs of the positive training reviews, from the SFT policy


def stage_config(regime: str, stage: str, d: Path, quick: bool):
  root = d / regime
  c = load_config("rm_tiny" if stage == "rm" else "sft_tiny", str(root / "assets"))
  c.data.path = str(root / "splits" / ("positive.jsonl" if stage == "sft_positive" else "train.jsonl"))
  if stage != "sft":
    c.model.path = str(root / "sft" / "model")
  if stage == "sft_positive":  # SFT on the sentiment task's demonstrations: a short fine-tune
    c.total_steps, c.optim.learning_rate, c.optim.warmup_steps = POSITIVE_SFT_STEPS, 1e-3, 10
  if quick:
    c.total_steps, c.batch_size, c.seq_len, c.data.validation_size = 6, 8, 64, 16
    c.optim.warmup_steps, c.log_every_steps = 2, 3
  return c


def write_training_reviews(d: Path, regime: str, quick: bool) -> None:
  """DIR/REGIME/splits/{train,positive}.jsonl: the corpus less the reviews its tasks validate on.

  The RL validation prompts are drawn by prompts.load from each task's config; a
  review is held out when its text starts with a validation prompt followed by
  its demonstration (the continuation format cuts the review there), so SFT
  and RM never see the text the arms are evaluated on.
  """
  root = d / regime
  out = root / "splits"
  if (out / "positive.jsonl").exists():
    return
  tokenizer = policy.load_tokenizer(str(root / "assets" / "policy"))
  held = set()
  for task in (t for t, (r, _) in TASKS.items() if r == regime):
    val = prompts.load(rl_config(task, Arm("sft", ""), d, quick).data, tokenizer).validation
    held.update(p + y for p, y in zip(val.prompt_texts, val.demo_texts))
  lines = (root / "assets" / "reviews.jsonl").read_text(encoding="utf-8").splitlines()
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
  logging.info("%s: SFT and RM train on %d of %d reviews (%d positive); %d held out for validation",
               regime, len(keep), len(lines), len(positive), len(lines) - len(keep))


def build_assets(d: Path, quick: bool) -> None:
  """Corpus, tokenizer, random models and training splits of every regime the tasks use."""
  for regime in dict.fromkeys(TASKS[t][0] for t in tasks(quick)):
    if quick:
      prepare.build(d / regime / "assets", n_reviews=400, width=32, regime=regime)
    else:
      prepare.build(d / regime / "assets", regime=regime)
    write_training_reviews(d, regime, quick)


def rl_config(task: str, arm: Arm, d: Path, quick: bool):
  c = load_config("reproduce", f"{task},{d}")
  c.rl.objective = arm.objective or "max"
  c.rl.beta = arm.beta
  c.seed = arm.seed
  if quick:
    c.total_steps, c.data.validation_size, c.eval.num_prompts = 4, 16, 16
    c.rollout.prompts_per_step, c.rollout.samples_per_prompt = 8, 2
    c.rollout.max_new_tokens = c.data.demo_max_tokens = 16
    c.reward.classifier.max_tokens = 24
    c.checkpoint.every_steps = c.eval.every_steps = c.log_every_steps = 2
    c.mesh.devices = 1  # one device compiles faster than a mesh over the test suite's 8 forced ones
  return c


def evaluate(config, wd: Path):
  """The untrained policy of `config`, evaluated like a trained arm at step 0: (Setup, state, metrics)."""
  s, state = train.build(config, wd)
  wd = files.prepare_workdir(str(wd))
  (wd / "config.json").write_text(config.to_json_best_effort(indent=2))
  return s, state, validate.run(s, s.steps, state, wd, 0)


def evaluate_sft(config, wd: Path) -> dict:
  """The SFT policy itself, evaluated like a trained arm at step 0; plus the demos' diversity."""
  s, state, result = evaluate(config, wd)
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
  rewards, passes = [], -(-samples // s.config.eval.samples_per_prompt)
  for k in range(passes):  # a new sampling key per pass: the step folds into the key
    g = validate.generate(s, steps, state.replace(step=state.step + k), s.val, s.demo_val, n)
    rewards.append(g["rewards"][:, :, 0])  # [n, eval.samples_per_prompt] of the first reward
  r, demo = np.concatenate(rewards, axis=1)[:, :samples], g["demo"][:, 0]
  mean = r.mean(axis=1)
  return {"prompt_corr": float(np.corrcoef(mean, demo)[0, 1]),
          "samples_per_prompt": samples,
          "sft_within_prompt_std": float(np.sqrt(r.var(axis=1, ddof=1).mean())),
          "sft_between_prompt_std": float(mean.std()),
          "demo_std": float(demo.std())}


def final_eval(config, wd: Path) -> Path:
  return wd / "eval" / f"step_{config.total_steps}.json"


def run_arm(task: str, arm: Arm, d: Path, quick: bool) -> None:
  """Trains one arm (resuming from its checkpoint), or evaluates the SFT policy for arm "sft"."""
  config = rl_config(task, arm, d, quick)
  wd = d / "runs" / task / arm.name
  if arm.objective:
    train.run(config, str(wd))
  else:
    evaluate_sft(config, wd)


# ----------------------------------------------------------------------------- jobs


def jobs(d: Path, quick: bool, seeds: int = 1) -> list[Job]:
  """Every stage and arm of the tasks, in the order they start once their inputs are ready.

  Stages come first (they feed everything), then the RL arms, the longest
  jobs, then the short SFT evaluations that fill the gaps at the end.
  """
  stages, trained, sft = {}, [], []
  for task in tasks(quick):
    regime, reward = TASKS[task]
    policy = [f"{regime}/sft"] if reward == "loglik" else [f"{regime}/sft_positive", f"{regime}/rm"]
    for name in [f"{regime}/sft", *policy]:
      stage = name.partition("/")[2]
      stages[name] = Job(name, () if stage == "sft" else (f"{regime}/sft",), d / name / "eval.json")
    for arm in arms(quick, seeds):
      config = rl_config(task, arm, d, quick)
      wd = d / "runs" / task / arm.name
      done = final_eval(config, wd) if arm.objective else wd / "demos.json"
      (trained if arm.objective else sft).append(Job(f"{task}/{arm.name}", tuple(policy), done))
  order = sorted(stages.values(), key=lambda j: STAGES.index(j.name.partition("/")[2]))
  names = [a.name for a in arms(quick, seeds)]
  return order + sorted(trained, key=lambda j: names.index(j.name.partition("/")[2])) + sft


def run_job(name: str, d: Path, quick: bool, seeds: int = 1) -> None:
  """One stage or arm, in this process (a worker or `--job=NAME`)."""
  names = [j.name for j in jobs(d, quick, seeds)]
  if name not in names:
    raise UserError(f"no job {name!r} in this reproduction; pick one of {', '.join(names)}")
  head, _, tail = name.partition("/")
  if head in REGIMES:
    supervised.run(stage_config(head, tail, d, quick), str(d / head / tail))
  else:
    run_arm(head, next(a for a in arms(quick, seeds) if a.name == tail), d, quick)


# ----------------------------------------------------------------------------- results


def objective_value(ev: dict, arm: Arm) -> float:
  """Mean validation value of the reward the arm trains on: what the paper's selection maximizes."""
  if arm.objective == "rcfd":
    return ev["rcfd_reward_mean"]
  if arm.objective == "rcfd_group":  # -(E[R | x] - R_d)^2, unbiased from eval.samples_per_prompt >= 2
    return ev["rcfd_group_reward_mean"]
  if arm.objective == "kl":
    return ev["reward_mean"] - arm.beta * ev["kl"]
  return ev["reward_mean"]


def arm_evals(wd: Path) -> list[dict]:
  """Every evaluation of one arm, by step."""
  evs = [json.loads(p.read_text()) for p in (wd / "eval").glob("step_*.json")]
  return sorted(evs, key=lambda ev: ev["step"])


def collect(d: Path, quick: bool) -> tuple[dict, dict, dict]:
  """(results.json: after the last step, results_best.json: the paper's selected checkpoint, extras).

  extras holds the samples, demo lengths, training curves, every evaluation of each trained arm
  (as results rows with their step) and the predictability figures.
  """
  results, best, extras = {}, {}, {}
  for task in tasks(quick):
    sft_dir = d / "runs" / task / "sft"
    demos = json.loads((sft_dir / "demos.json").read_text())
    sft = sft_eval(d, task)
    results[task], best[task] = {}, {}
    extras[task] = {"demo_length_mean": demos["demo_length_mean"], "samples": {}, "curves": {}, "evals": {},
                    "predictability": {k: demos[k] for k in PREDICTABILITY_KEYS}}
    extra = {"sft_distinct_2": sft["distinct_2"], "demo_distinct_2": demos["demo_distinct_2"]}

    def row(ev: dict) -> dict:
      merged = {**ev, **extra}
      return {k: merged[k] for k in KEYS}

    for arm in arms(quick):  # seed 0's arms; seed_rows reads the others
      wd = d / "runs" / task / arm.name
      evals = arm_evals(wd)  # the SFT arm's one evaluation at step 0, or an arm's up to its last step
      last = evals[-1]
      chosen = max(evals, key=lambda ev, arm=arm: objective_value(ev, arm))
      results[task][arm.name] = row(last)
      best[task][arm.name] = {**row(chosen), "step": chosen["step"]}
      if not arm.objective:  # predictability(), measured on the SFT policy
        results[task][arm.name]["prompt_predictability"] = demos["prompt_corr"]
        best[task][arm.name]["prompt_predictability"] = demos["prompt_corr"]
      extras[task]["samples"][arm.name] = last.get("samples", [])
      if arm.objective:
        extras[task]["curves"][arm.name] = _curve(wd / "metrics.jsonl")
        extras[task]["evals"][arm.name] = [row(ev) | {"step": ev["step"]} for ev in evals]
  return results, best, extras


def sft_eval_path(d: Path, task: str) -> Path:
  """Where the task's SFT policy is evaluated: its arm's one evaluation, at step 0."""
  return d / "runs" / task / "sft" / "eval" / "step_0.json"


def sft_eval(d: Path, task: str) -> dict:
  return json.loads(sft_eval_path(d, task).read_text())


def last_row(d: Path, task: str, wd: Path) -> dict | None:
  """An arm's last evaluation against the task's SFT policy: gap (in demo std), A, distinct-2 share, KL."""
  if not (wd / "eval").exists():
    return None
  last = arm_evals(wd)[-1]
  sft = sft_eval(d, task)
  return {"step": last["step"], "gap": report.gap(last),
          "alignment": last["alignment"], "sft_alignment": sft["alignment"],
          "distinct_share": last["distinct_2"] / sft["distinct_2"], "kl": last["kl"],
          "prompt_corr": last.get("prompt_corr", float("nan"))}


def seed_rows(d: Path, quick: bool, seeds: int, results: dict) -> dict:
  """{task: {method: [results row of seed 0, 1, ...]}} for SEED_METHODS, after the last step."""
  out = {}
  for task, by_method in results.items():
    extra = {k: by_method["sft"][k] for k in ("sft_distinct_2", "demo_distinct_2")}
    out[task] = {m: [by_method[m]] for m in SEED_METHODS}
    for arm in arms(quick, seeds)[len(arms(quick)):]:
      last = {**arm_evals(d / "runs" / task / arm.name)[-1], **extra}
      out[task][arm.name.rpartition("_seed")[0]].append({k: last[k] for k in KEYS})
  return out


def _curve(path: Path) -> tuple[list[int], list[float]]:
  steps, rewards = [], []
  for line in path.read_text().splitlines():
    rec = json.loads(line)
    if rec.get("reward_mean") is not None:
      steps.append(rec["step"])
      rewards.append(rec["reward_mean"])
  return steps, rewards


def check_targets(results: dict, seconds: float | None) -> list[tuple[str, bool, str]]:
  """The targets, as (target, met, measured) rows."""
  rows = []

  def within(task: str, name: str, m: dict, std_gap: float, a_max: float, a_what: str) -> None:
    gap = report.gap(m)
    rows.append((f"{task}: {name} reward within {std_gap} demo std", abs(gap) <= std_gap,
                 f"({m['reward_mean']:.3f} - {m['demo_reward_mean']:.3f}) / {m['demo_reward_std']:.3f} = "
                 f"{gap:+.2f} std"))
    rows.append((f"{task}: {name} Alignment A <= {a_what}", m["alignment"] <= a_max,
                 f"A = {m['alignment']:.3f} vs {a_max:.3f}"))

  for task, r in results.items():
    sft, mx, group = r["sft"], r["max"], r["rcfd_group"]
    over = report.gap(mx)
    rows.append((f"{task}: max ends above the demos by > 1 demo std", over > 1.0, f"{over:+.2f} std"))
    change = mx["distinct_2"] / mx["sft_distinct_2"] - 1.0
    rows.append((f"{task}: max distinct-2 falls >= 40% vs SFT", change <= -0.4,
                 f"{mx['distinct_2']:.3f} vs {mx['sft_distinct_2']:.3f}: {100 * change:+.0f}%"))
    within(task, "rcfd_group", group, 0.1, sft["alignment"], "the SFT policy's")
    keep = group["distinct_2"] / group["sft_distinct_2"]
    rows.append((f"{task}: rcfd_group distinct-2 >= 80% of the SFT policy's", keep >= 0.8,
                 f"{group['distinct_2']:.3f} vs {group['sft_distinct_2']:.3f}: {100 * keep:.0f}%"))
    if TASKS[task][0] == "voiced":  # where the prompt predicts R_d, the paper's RCfD should calibrate
      q = sft["prompt_predictability"]
      rows.append((f"{task}: prompt predictability >= {PREDICTABILITY_TARGET}", q >= PREDICTABILITY_TARGET,
                   f"corr = {q:+.3f}"))
      within(task, "rcfd", r["rcfd"], 0.1, max(0.1, sft["alignment"]), "max(0.1, the SFT policy's)")
  if seconds is not None:
    rows.append(("whole comparison under 20 min on 2 CPU cores", seconds < TIME_BUDGET_S,
                 f"{seconds / 60:.1f} min"))
  return rows


def reproduce(workdir: str, quick: bool = False, parallel: int = 2, seeds: int = 1) -> dict:
  """Runs (or reuses) every stage and arm, then writes results.json, results.md and the plots."""
  d = Path(workdir).expanduser().absolute()
  files.check_workdir(str(d))
  d.mkdir(parents=True, exist_ok=True)
  mode = d / "mode.txt"
  if mode.exists() and mode.read_text().strip() != ("quick" if quick else "full"):
    raise UserError(f"{d} holds a {mode.read_text().strip()} reproduction; pick another --workdir")
  mode.write_text("quick\n" if quick else "full\n")
  timing_file = d / "timing.json"
  timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
  t0 = time.perf_counter()
  load_at_start = os.getloadavg()[0]
  build_assets(d, quick)
  timing["assets + splits"] = timing.get("assets + splits", 0.0) + time.perf_counter() - t0
  if seeds < 1:
    raise UserError(f"--seeds={seeds}; use 1 (seed 0 only) or more")
  serve = [sys.executable, "-m", "rcfd_jax.reproduce", f"--workdir={d}", "--serve", f"--seeds={seeds}"]
  with Workers(d, serve + (["--quick"] if quick else [])) as workers:
    seconds = run_jobs(jobs(d, quick, seeds), d, parallel, workers.start)
  for name, sec in seconds.items():
    timing[name] = timing.get(name, 0.0) + sec
  # Wall clock of the invocations that ran something; arms of extra seeds are counted apart, so
  # "total" stays the time of the comparison itself.
  total = "total" if seeds == 1 else "total with extra seeds"
  if seconds or total not in timing:
    timing[total] = timing.get(total, 0.0) + time.perf_counter() - t0
    timing["load" if seeds == 1 else "load with extra seeds"] = f"{load_at_start:.1f} / {os.getloadavg()[0]:.1f}"
    timing["parallel"] = parallel
  timing_file.write_text(json.dumps(timing, indent=2) + "\n")
  results, best, extras = collect(d, quick)
  targets = check_targets(results, None if quick or "total" not in timing else timing["total"])
  best_targets = check_targets(best, None)
  (d / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  (d / "results_best.json").write_text(json.dumps(best, indent=2) + "\n")
  for regime in REGIMES:
    of_regime = {t: r for t, r in results.items() if TASKS[t][0] == regime}
    if of_regime:
      report.plot(of_regime, extras, d / f"results_{regime}.png")
  regime_of = {t: TASKS[t][0] for t in results}
  md = report.markdown(results, best, extras, targets, best_targets, timing, regime_of)
  if seeds > 1:
    by_seed = seed_rows(d, quick, seeds, results)
    (d / "results_seeds.json").write_text(json.dumps(by_seed, indent=2) + "\n")
    md += report.seeds_markdown(by_seed)
  (d / "results.md").write_text(md)
  for t, ok, v in targets:
    logging.info("target %s: %s (%s)", t, "met" if ok else "NOT met", v)
  for t, ok, v in best_targets:
    logging.info("target at the selected checkpoint, %s: %s (%s)", t, "met" if ok else "NOT met", v)
  return results

