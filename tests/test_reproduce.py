"""The CPU reproduction end to end, shortened (--quick): files and schema, not the targets."""

import json

import numpy as np

from rcfd_jax import reproduce


def test_quick_reproduction_writes_results_and_reuses_finished_runs(tmp_path):
  d = tmp_path / "rep"
  results = reproduce.reproduce(str(d), quick=True)

  on_disk = json.loads((d / "results.json").read_text())
  assert on_disk == results
  assert set(on_disk) == set(reproduce.TASKS)
  methods = [a.name for a in reproduce.arms(quick=True)]
  assert methods == ["sft", "max", "kl_0.1", "rcfd"]
  for task, by_method in on_disk.items():
    assert list(by_method) == methods, task
    for method, row in by_method.items():
      assert list(row) == list(reproduce.KEYS), (task, method)
      assert all(isinstance(v, float) for v in row.values()), (task, method, row)
      assert (d / "runs" / task / method / "config.json").exists()
    assert by_method["sft"]["distinct_2"] == by_method["max"]["sft_distinct_2"]
  # The paper's selection: each arm's evaluation of highest mean validation training reward.
  best = json.loads((d / "results_best.json").read_text())
  for task, by_method in best.items():
    assert list(by_method) == methods, task
    assert by_method["sft"]["step"] == 0
    for arm in reproduce.arms(quick=True)[1:]:
      evals = reproduce.arm_evals(d / "runs" / task / arm.name)
      assert [ev["step"] for ev in evals] == [2, 4]
      values = [reproduce.objective_value(ev, arm) for ev in evals]
      chosen = evals[int(np.argmax(values))]
      row = by_method[arm.name]
      assert row["step"] == chosen["step"] and row["alignment"] == chosen["alignment"], (task, arm)
    rcfd_last = json.loads((d / "runs" / task / "rcfd" / "eval" / "step_4.json").read_text())
    assert reproduce.objective_value(rcfd_last, reproduce.Arm("rcfd", "rcfd")) == rcfd_last["rcfd_reward_mean"] < 0
  md = (d / "results.md").read_text()
  assert "| rcfd |" in md and "## Targets" in md and "## Samples" in md
  assert "## The paper's checkpoint selection" in md
  assert "## How much of the demonstrations' reward the prompt predicts" in md
  for task in reproduce.TASKS:
    q = json.loads((d / "runs" / task / "sft" / "demos.json").read_text())
    assert -1 <= q["prompt_corr"] <= 1 and q["samples_per_prompt"] == reproduce.PREDICTABILITY_SAMPLES
    assert q["sft_within_prompt_std"] > 0 and q["demo_std"] > 0, q

  # SFT and RM never train on a review whose prompt an arm is evaluated on.
  corpus = [json.loads(line) for line in (d / "assets" / "reviews.jsonl").read_text().splitlines()]
  train = [json.loads(line) for line in (d / "splits" / "train.jsonl").read_text().splitlines()]
  positive = [json.loads(line) for line in (d / "splits" / "positive.jsonl").read_text().splitlines()]
  assert positive == [r for r in train if r["label"] == "positive"]
  tokenizer = reproduce.train.load_tokenizer(str(d / "assets" / "policy"))
  train_texts = [r["text"] for r in train]
  held = 0
  for task in reproduce.TASKS:
    val = reproduce.data.load(reproduce.rl_config(task, reproduce.Arm("sft", ""), d, True).data,
                              tokenizer).validation
    for prompt, demo in zip(val.prompt_texts, val.demo_texts):
      assert not any(t.startswith(prompt + demo) for t in train_texts), (task, prompt)
    held += len(val)
  assert len(corpus) - held <= len(train) < len(corpus)
  assert (d / "results.png").stat().st_size > 10_000

  # A rerun trains nothing: every stage and arm is reused, the reports are rewritten.
  mtimes = {p: p.stat().st_mtime for p in (d / "runs").rglob("step_*.json")}
  (d / "results.json").unlink()
  assert reproduce.reproduce(str(d), quick=True) == results
  assert {p: p.stat().st_mtime for p in (d / "runs").rglob("step_*.json")} == mtimes


def test_checkpoint_selection_maximizes_each_arms_own_training_reward():
  ev = {"reward_mean": 1.0, "kl": 4.0, "rcfd_reward_mean": -0.5}
  assert reproduce.objective_value(ev, reproduce.Arm("max", "max")) == 1.0
  assert reproduce.objective_value(ev, reproduce.Arm("kl_0.1", "kl", 0.1)) == 1.0 - 0.1 * 4.0
  assert reproduce.objective_value(ev, reproduce.Arm("rcfd", "rcfd")) == -0.5


def test_full_and_quick_runs_never_share_a_workdir(tmp_path):
  (tmp_path / "mode.txt").write_text("quick\n")
  try:
    reproduce.reproduce(str(tmp_path), quick=False)
  except reproduce.UserError as e:
    assert "quick reproduction" in str(e)
  else:
    raise AssertionError("a full run reused a quick workdir")
