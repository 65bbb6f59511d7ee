"""The CPU reproduction end to end, shortened (--quick): files and schema, not the targets.

The quick run holds one task per corpus regime (loglik on the plain one, sentiment_voiced on the
voiced one), so it builds every kind of stage and arm, rcfd_group included, two at a time.
"""

import json
import shutil

import numpy as np
import pytest

from rcfd_jax.errors import UserError
from rcfd_jax.policy import load_tokenizer
from rcfd_jax.reproduce import frontier, report, run


def test_quick_reproduction_writes_results_and_reuses_finished_runs(tmp_path):
  d = tmp_path / "rep"
  results = run.reproduce(str(d), quick=True)

  on_disk = json.loads((d / "results.json").read_text())
  assert on_disk == results
  assert list(on_disk) == list(run.QUICK_TASKS) == ["loglik", "sentiment_voiced"]
  methods = [a.name for a in run.arms(quick=True)]
  assert methods == ["sft", "max", "kl_0.1", "rcfd", "rcfd_group"]
  for task, by_method in on_disk.items():
    assert list(by_method) == methods, task
    for method, row in by_method.items():
      extra = ["prompt_predictability"] if method == "sft" else []
      assert list(row) == list(run.KEYS) + extra, (task, method)
      assert all(isinstance(v, float) for v in row.values()), (task, method, row)
      assert (d / "runs" / task / method / "config.json").exists()
    assert by_method["sft"]["distinct_2"] == by_method["max"]["sft_distinct_2"]
  # The paper's selection: each arm's evaluation of highest mean validation training reward.
  best = json.loads((d / "results_best.json").read_text())
  for task, by_method in best.items():
    assert list(by_method) == methods, task
    assert by_method["sft"]["step"] == 0
    for arm in run.arms(quick=True)[1:]:
      evals = run.arm_evals(d / "runs" / task / arm.name)
      assert [ev["step"] for ev in evals] == [2, 4]
      values = [run.objective_value(ev, arm) for ev in evals]
      chosen = evals[int(np.argmax(values))]
      row = by_method[arm.name]
      assert row["step"] == chosen["step"] and row["alignment"] == chosen["alignment"], (task, arm)
    rcfd_last = json.loads((d / "runs" / task / "rcfd" / "eval" / "step_4.json").read_text())
    assert run.objective_value(rcfd_last, run.Arm("rcfd", "rcfd")) == rcfd_last["rcfd_reward_mean"] < 0
    group_last = json.loads((d / "runs" / task / "rcfd_group" / "eval" / "step_4.json").read_text())
    assert run.objective_value(group_last, run.Arm("rcfd_group", "rcfd_group")) == (
        group_last["rcfd_group_reward_mean"])
  md = (d / "results.md").read_text()
  assert "| rcfd |" in md and "## Targets" in md and "## Samples" in md
  assert "## The paper's checkpoint selection" in md
  assert "## How much of the demonstrations' reward the prompt predicts" in md
  assert "## Regime plain" in md and "## Regime voiced" in md and "prompt predictability" in md
  paths = md.split("## Every evaluation: calibration against what it cost")[1].split("## Time")[0]
  for task in run.QUICK_TASKS:  # one row per trained arm, a cell per evaluation step
    assert f"| {task} | step 2 | step 4 |" in paths
  group = run.arm_evals(d / "runs" / "loglik" / "rcfd_group")[0]
  gap = (group["reward_mean"] - group["demo_reward_mean"]) / group["demo_reward_std"]
  assert f"| rcfd_group | {gap:+.2f} / {100 * group['distinct_2'] / on_disk['loglik']['sft']['distinct_2']:.0f}%" in (
      paths.split("| sentiment_voiced |")[0])
  for task in run.QUICK_TASKS:
    q = json.loads((d / "runs" / task / "sft" / "demos.json").read_text())
    assert -1 <= q["prompt_corr"] <= 1 and q["samples_per_prompt"] == run.PREDICTABILITY_SAMPLES
    assert q["sft_within_prompt_std"] > 0 and q["demo_std"] > 0, q
    assert on_disk[task]["sft"]["prompt_predictability"] == q["prompt_corr"]
  assert json.loads((d / "voiced" / "assets" / "reviews.jsonl").read_text().splitlines()[0])["text"][:6] != (
      json.loads((d / "plain" / "assets" / "reviews.jsonl").read_text().splitlines()[0])["text"][:6])

  # SFT and RM never train on a review whose prompt an arm of its regime is evaluated on.
  for regime in run.REGIMES:
    root = d / regime
    corpus = [json.loads(line) for line in (root / "assets" / "reviews.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (root / "splits" / "train.jsonl").read_text().splitlines()]
    positive = [json.loads(line) for line in (root / "splits" / "positive.jsonl").read_text().splitlines()]
    assert positive == [r for r in train if r["label"] == "positive"]
    tokenizer = load_tokenizer(str(root / "assets" / "policy"))
    train_texts = [r["text"] for r in train]
    held = 0
    for task in (t for t, (r, _) in run.TASKS.items() if r == regime):
      val = run.prompts.load(run.rl_config(task, run.Arm("sft", ""), d, True).data, tokenizer).validation
      for prompt, demo in zip(val.prompt_texts, val.demo_texts):
        assert not any(t.startswith(prompt + demo) for t in train_texts), (task, prompt)
      held += len(val)
    assert len(corpus) - held <= len(train) < len(corpus)
    assert (d / f"results_{regime}.png").stat().st_size > 10_000

  # A rerun trains nothing: every stage and arm is reused, the reports are rewritten.
  mtimes = {p: p.stat().st_mtime for p in (d / "runs").rglob("step_*.json")}
  (d / "results.json").unlink()
  assert run.reproduce(str(d), quick=True) == results
  assert {p: p.stat().st_mtime for p in (d / "runs").rglob("step_*.json")} == mtimes

  # The loglik frontier: the SFT policy sharpened, evaluated like the arms, every arm placed against it.
  fr = frontier.main(str(d), quick=True)
  assert list(fr) == ["loglik"]
  f = fr["loglik"]
  assert [p["temperature"] for p in f["points"]] == list(frontier.QUICK_TEMPERATURES) == [1.0, 0.5]
  assert f["sft_matches_results"] and f["points"][0]["distinct_2"] == on_disk["loglik"]["sft"]["distinct_2"]
  assert f["points"][1]["reward_mean"] > f["points"][0]["reward_mean"]  # sharper: likelier under pi_0
  assert list(f["arms"]) == methods[1:]
  assert all([e["step"] for e in evals] == [2, 4] for evals in f["arms"].values())
  assert f["entropy_ceiling"] == -on_disk["loglik"]["sft"]["demo_reward_mean"]
  assert json.loads((d / "frontier.json").read_text()) == fr
  assert "| max | " in (d / "frontier.md").read_text()
  # An extra seed's arm, however high the seed --seeds ran to, is placed too.
  shutil.copytree(d / "runs" / "loglik" / "rcfd_group", d / "runs" / "loglik" / "rcfd_group_seed4")
  assert frontier.seeds_run(d, "loglik") == 5
  placed = frontier.main(str(d), quick=True)["loglik"]["arms"]
  assert list(placed) == methods[1:] + ["rcfd_group_seed4"] and placed["rcfd_group_seed4"] == placed["rcfd_group"]


def test_frontier_interpolates_between_the_points_that_bracket_a_gap():
  points = [(-1.0, 1.0), (0.5, 0.7), (-0.2, 0.9)]  # any order
  assert frontier.interpolate(points, -0.6) == pytest.approx(0.95)
  assert frontier.interpolate(points, 0.0) == pytest.approx(0.9 - 0.2 * 0.2 / 0.7)
  assert frontier.interpolate(points, 0.5) == pytest.approx(0.7)
  assert frontier.interpolate(points, 0.6) is None and frontier.interpolate(points, -1.1) is None


def test_checkpoint_selection_maximizes_each_arms_own_training_reward():
  ev = {"reward_mean": 1.0, "kl": 4.0, "rcfd_reward_mean": -0.5, "rcfd_group_reward_mean": -0.25}
  assert run.objective_value(ev, run.Arm("max", "max")) == 1.0
  assert run.objective_value(ev, run.Arm("kl_0.1", "kl", 0.1)) == 1.0 - 0.1 * 4.0
  assert run.objective_value(ev, run.Arm("rcfd", "rcfd")) == -0.5
  assert run.objective_value(ev, run.Arm("rcfd_group", "rcfd_group")) == -0.25


def test_full_and_quick_runs_never_share_a_workdir(tmp_path):
  (tmp_path / "mode.txt").write_text("quick\n")
  try:
    run.reproduce(str(tmp_path), quick=False)
  except UserError as e:
    assert "quick reproduction" in str(e)
  else:
    raise AssertionError("a full run reused a quick workdir")


def test_extra_seeds_rerun_the_calibrated_arms_and_report_each_seed(tmp_path):
  """--seeds=3 adds METHOD_seed1/2 arms with config.seed set; seed_rows reads their last evaluation."""
  names = [a.name for a in run.arms(False, seeds=3)]
  assert names[:len(run.arms(False))] == [a.name for a in run.arms(False)]
  extra = run.arms(False, seeds=3)[len(run.arms(False)):]
  assert [(a.name, a.seed) for a in extra] == [
      ("rcfd_seed1", 1), ("rcfd_group_seed1", 1), ("rcfd_seed2", 2), ("rcfd_group_seed2", 2)]
  assert run.rl_config("loglik", extra[1], tmp_path, False).seed == 1
  assert run.rl_config("loglik", extra[1], tmp_path, False).rl.objective == "rcfd_group"
  row = {k: 1.0 for k in run.KEYS}
  results = {"loglik": {"sft": dict(row, sft_distinct_2=0.5), "rcfd": row, "rcfd_group": row}}
  for arm in extra:
    ev_dir = tmp_path / "runs" / "loglik" / arm.name / "eval"
    ev_dir.mkdir(parents=True)
    for step in (50, 200):
      ev = {k: float(step + arm.seed) for k in run.KEYS}
      (ev_dir / f"step_{step}.json").write_text(json.dumps(dict(ev, step=step)))
  by_seed = run.seed_rows(tmp_path, False, 3, results)
  assert [r["reward_mean"] for r in by_seed["loglik"]["rcfd_group"]] == [1.0, 201.0, 202.0]
  assert by_seed["loglik"]["rcfd"][2]["sft_distinct_2"] == 0.5
  md = report.seeds_markdown(by_seed)
  assert "| loglik | rcfd_group |" in md and "seed 2" in md


def test_an_unknown_job_name_is_one_clear_error(tmp_path):
  with pytest.raises(UserError, match="no job 'loglik/nope' in this reproduction; pick one of plain/sft, "):
    run.run_job("loglik/nope", tmp_path, quick=True)
