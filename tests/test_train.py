"""The trainer users run: end to end, exact resume, SIGTERM, damaged checkpoints, bad input.

One in-process run of configs/tiny.py (shrunk for speed) is the reference;
the subprocess runs (killed, resumed, preempted, bad input) go through the
real command line, `python -m rcfd_jax.main`, and share a persistent XLA
compilation cache so only the first of them compiles.
"""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import load_config
from rcfd_jax import checkpoint, train

REPO = Path(__file__).resolve().parents[1]
TOTAL = 4
# configs/tiny.py shrunk: 4 steps of 16 rollouts x 8 tokens, checkpoints at 2 and 4, one eval at 4.
FAST = {
    "total_steps": TOTAL, "checkpoint.every_steps": 2, "eval.every_steps": TOTAL, "eval.num_prompts": 8,
    "rollout.max_new_tokens": 8, "data.demo_max_tokens": 8, "data.max_examples": 64,
    "data.validation_size": 8,
}
METRIC_KEYS = {"step", "loss", "reward_mean", "demo_reward_mean", "kl", "length_mean", "tokens_per_second",
               "entropy"}
EVAL_KEYS = {"reward_mean", "demo_reward_mean", "alignment", "distinct_2", "length_mean", "kl", "entropy",
             "prompt_corr"}
TIMING_KEYS = {"tokens_per_second", "bridge_seconds"}


def tiny_config(assets, cache_dir, **overrides):
  """configs/tiny.py on `assets`, shrunk by FAST, caching demonstration rewards in cache_dir."""
  return load_config(f"tiny:{assets}", {"reward.cache_dir": str(cache_dir), **FAST, **overrides})


def cli_args(assets, cache_dir, workdir, **overrides):
  flags = [f"--config={REPO / 'configs' / 'tiny.py'}:{assets}", f"--workdir={workdir}",
           f"--config.reward.cache_dir={cache_dir}"]
  return flags + [f"--config.{k}={v}" for k, v in {**FAST, **overrides}.items()]


def main_cmd(args):
  return [sys.executable, "-m", "rcfd_jax.main", *args]


def read_metrics(workdir):
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows):
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def restore(workdir, like):
  """(step, state) of the latest checkpoint in workdir, restored onto `like`'s shardings."""
  ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints")
  try:
    step, state, _ = ckpt.restore_latest(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like))
  finally:
    ckpt.close()
  return step, state


def assert_same_state(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
  """An uninterrupted in-process run: (workdir, final state, demo cache dir)."""
  cache = tmp_path_factory.mktemp("demo_cache")
  wd = tmp_path_factory.mktemp("reference") / "run"
  state = train.run(tiny_config(tiny_assets, cache), str(wd))
  return wd, state, cache


def test_end_to_end_writes_metrics_eval_and_checkpoints(reference):
  wd, state, _ = reference
  rows = read_metrics(wd)
  assert [r["step"] for r in rows] == list(range(1, TOTAL + 1))
  for r in rows:
    assert METRIC_KEYS <= set(r), METRIC_KEYS - set(r)
    assert all(np.isfinite(r[k]) for k in METRIC_KEYS)
    assert r["length_mean"] > 0 and r["tokens_per_second"] > 0
  result = json.loads((wd / "eval" / f"step_{TOTAL}.json").read_text())
  assert EVAL_KEYS <= set(result), EVAL_KEYS - set(result)
  assert list((wd / "eval").glob("*.png"))
  assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [2, TOTAL]
  assert int(state.step) == TOTAL
  step, saved = restore(wd, state)
  assert step == TOTAL
  assert_same_state(saved, state)


def test_training_batches_carry_the_calibration_target(reference, tiny_assets, tmp_path, monkeypatch):
  """rl.rcfd_target=mean: every batch the loop feeds holds the training demonstrations' mean R_d."""
  _, _, cache = reference  # the demonstration rewards are already cached
  scored, fed = [], []
  targets, device_batch = train.demos.calibration_targets, train.bridge.device_batch

  def record_targets(demo_nk, target):
    scored.append(demo_nk)
    return targets(demo_nk, target)

  def record_batch(s, batcher, indices, demo):
    fed.append(np.asarray(demo))
    return device_batch(s, batcher, indices, demo)

  monkeypatch.setattr(train.demos, "calibration_targets", record_targets)
  monkeypatch.setattr(train.bridge, "device_batch", record_batch)
  train.run(tiny_config(tiny_assets, cache, **{"total_steps": 1, "rl.rcfd_target": "mean"}), str(tmp_path / "run"))
  (demo_nk,) = scored
  assert np.ptp(demo_nk, axis=0).max() > 0  # the prompts' own rewards differ
  assert fed[0].shape == demo_nk.shape  # the step's batch; evaluation batches (validation demos) follow
  np.testing.assert_allclose(fed[0], np.broadcast_to(demo_nk.mean(axis=0), demo_nk.shape), rtol=1e-6)


# Runs main, and SIGKILLs the process itself right after metrics.jsonl gets step 3,
# once checkpoint 2 is on disk: a crash at a known point, with no hook in the trainer.
_KILL_AT_STEP_3 = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from rcfd_jax import main, metrics
    ckpt = Path(os.environ["KILL_WORKDIR"]) / "checkpoints" / "2"
    write = metrics.MetricsWriter.write
    def write_then_die(self, step, m):
      write(self, step, m)
      if step == 3:
        deadline = time.time() + 300
        while not ckpt.is_dir() and time.time() < deadline:
          time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    metrics.MetricsWriter.write = write_then_die
    sys.argv = ["rcfd_jax.main"] + sys.argv[1:]
    main.run()
""")


def test_sigkill_then_resume_matches_uninterrupted_run(reference, tiny_assets, env, tmp_path):
  ref_wd, ref_state, cache = reference
  wd = tmp_path / "run"
  args = cli_args(tiny_assets, cache, wd)
  killed = subprocess.run([sys.executable, "-c", _KILL_AT_STEP_3, *args], env=dict(env, KILL_WORKDIR=str(wd)),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert [r["step"] for r in read_metrics(wd)] == [1, 2, 3]
  assert (wd / "checkpoints" / "2").is_dir() and not (wd / "checkpoints" / "4").exists()

  resumed = subprocess.run(main_cmd(args), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 2" in resumed.stderr
  assert without_timing(read_metrics(wd)) == without_timing(read_metrics(ref_wd))
  step, state = restore(wd, ref_state)
  assert step == TOTAL
  assert_same_state(state, ref_state)
  ref_eval = json.loads((ref_wd / "eval" / f"step_{TOTAL}.json").read_text())
  eval_ = json.loads((wd / "eval" / f"step_{TOTAL}.json").read_text())
  assert {k: eval_[k] for k in EVAL_KEYS} == {k: ref_eval[k] for k in EVAL_KEYS}


def test_damaged_latest_checkpoint_falls_back_to_previous(reference, tiny_assets, env, tmp_path):
  ref_wd, ref_state, cache = reference
  wd = tmp_path / "run"
  shutil.copytree(ref_wd, wd)
  # The array chunks only (metadata intact): Orbax would start every read and abandon the others at the
  # first failure, and tensorstore would print a traceback for each; the recorded sizes catch it first.
  damaged = [f for f in (wd / "checkpoints" / str(TOTAL) / "state").rglob("*")
             if f.is_file() and f.parent.name == "d"]
  assert damaged
  for f in damaged:
    with open(f, "r+b") as fh:
      fh.truncate(max(f.stat().st_size // 2, 1) - 1)
  # One more step than the reference: resumes at 2, replays 3 and 4, then trains step 5.
  proc = subprocess.run(main_cmd(cli_args(tiny_assets, cache, wd, total_steps=TOTAL + 1)), env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"checkpoint step {TOTAL} in" in proc.stderr and "is damaged" in proc.stderr
  assert "when saved" in proc.stderr
  assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
  assert "resumed from step 2" in proc.stderr
  rows = read_metrics(wd)
  assert [r["step"] for r in rows] == list(range(1, TOTAL + 2))
  assert without_timing(rows[:TOTAL]) == without_timing(read_metrics(ref_wd))
  assert list((wd / "checkpoints" / checkpoint.DAMAGED_SUBDIR).glob(f"{TOTAL}.*"))


def test_sigterm_saves_a_checkpoint_and_exits_zero(tiny_assets, env, tmp_path):
  wd = tmp_path / "run"
  args = cli_args(tiny_assets, tmp_path / "cache", wd, total_steps=100000, **{"checkpoint.every_steps": 100000,
                                                                             "eval.every_steps": 100000})
  proc = subprocess.Popen(main_cmd(args), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
      f = wd / "metrics.jsonl"
      if f.exists() and f.read_text().count("\n") >= 2:
        break
      time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, err[-3000:]
  last = read_metrics(wd)[-1]["step"]
  assert f"SIGTERM received: saved step {last} and stopping" in err
  assert (wd / "checkpoints" / str(last)).is_dir()
  assert not (wd / "eval").exists()


def _error_lines(stderr):
  assert "Traceback" not in stderr, stderr[-3000:]
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("override,expect", [
    ("--config.rl.betaa=1", "betaa"),
    ("--config.total_steps=abc", "abc"),
    ("--config.data.text_column=nope", "'nope'"),
    ("--config.data.label_value=nothing_matches", "no examples"),
    ("--config.policy.path=/nonexistent/policy", "/nonexistent/policy"),
    ("--config.mesh.device_memory_gib=0.00001", "program 'iteration' needs "),  # checked before anything is written
])
def test_bad_input_is_one_error_line_and_no_new_files(override, expect, tiny_assets, env, tmp_path):
  wd = tmp_path / "never_created"
  cache = tmp_path / "cache"
  proc = subprocess.run(main_cmd([*cli_args(tiny_assets, cache, wd), override]), env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  errors = _error_lines(proc.stderr)
  assert len(errors) == 1 and expect in errors[0], proc.stderr[-3000:]
  assert not wd.exists() and not cache.exists()


def test_unwritable_workdir_is_one_error_line(tiny_assets, env, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  proc = subprocess.run(main_cmd(cli_args(tiny_assets, tmp_path / "cache", blocker / "run")), env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  errors = _error_lines(proc.stderr)
  assert len(errors) == 1 and "workdir" in errors[0] and "not a directory" in errors[0], proc.stderr[-3000:]
  assert blocker.read_text() == "not a directory"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_main_on_a_fresh_clone_builds_the_tiny_assets_first(env, tmp_path):
  """The README's first command, in a directory without build/tiny: the config builds it."""
  fast = {**FAST, "total_steps": 1, "eval.every_steps": 1, "checkpoint.every_steps": 1}
  args = [f"--config={REPO / 'configs' / 'tiny.py'}", "--workdir=runs/tiny",
          f"--config.reward.cache_dir={tmp_path / 'cache'}"] + [f"--config.{k}={v}" for k, v in fast.items()]
  proc = subprocess.run(main_cmd(args), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "build" / "tiny" / "policy" / "model.safetensors").is_file()
  assert [r["step"] for r in read_metrics(tmp_path / "runs" / "tiny")] == [1]
