"""MetricsWriter: jsonl content, resume truncation, partial lines, non-main processes."""

import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rcfd_jax import metrics


def _records(workdir):
  with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def test_writes_one_json_line_per_step_with_python_floats(tmp_path, caplog):
  with caplog.at_level(logging.INFO):
    with metrics.MetricsWriter(tmp_path, total_steps=10, is_main=True) as writer:
      writer.write(1, {"loss": jnp.float32(0.5), "reward_mean": np.float64(1.25), "kl": 0.0,
                       "length_mean": jnp.array([12.0]), "tokens_per_second": 100, "flag": np.bool_(True)})
      writer.write(2, {"loss": 0.25, "reward_mean": float("nan"), "demo_reward_mean": 2.0})
  records = _records(tmp_path)
  assert records[0] == {"step": 1, "loss": 0.5, "reward_mean": 1.25, "kl": 0.0, "length_mean": 12.0,
                        "tokens_per_second": 100, "flag": 1}
  assert list(records[0])[0] == "step"
  assert records[1] == {"step": 2, "loss": 0.25, "reward_mean": None, "demo_reward_mean": 2.0}
  assert os.listdir(tmp_path / metrics.TB_SUBDIR)  # TensorBoard event file
  console = [r.getMessage() for r in caplog.records if "step 2/10" in r.getMessage()]
  assert console and "demo_reward_mean=2" in console[0] and "eta=" in console[0]


def test_rejects_non_scalars(tmp_path):
  with metrics.MetricsWriter(tmp_path, total_steps=10, is_main=True) as writer:
    with pytest.raises(TypeError, match="scalar"):
      writer.write(1, {"reward": np.ones(3)})


def test_truncate_after_drops_later_steps_then_appends(tmp_path):
  with metrics.MetricsWriter(tmp_path, total_steps=10, is_main=True) as writer:
    for step in range(1, 6):
      writer.write(step, {"loss": step})
  # A resumed run restored the checkpoint of step 3.
  with metrics.MetricsWriter(tmp_path, total_steps=10, is_main=True) as writer:
    writer.truncate_after(3)
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3]
    writer.write(4, {"loss": 40})
  assert [(r["step"], r["loss"]) for r in _records(tmp_path)] == [(1, 1), (2, 2), (3, 3), (4, 40)]


def test_partial_last_line_is_dropped_on_open(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  # Killed mid-write: the cut line even parses as JSON, but has no newline.
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "loss": 3')
  with metrics.MetricsWriter(tmp_path, total_steps=10, is_main=True) as writer:
    writer.truncate_after(2)
    writer.write(3, {"loss": 3.5})
  assert _records(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.5}]


def test_partial_line_dropped_even_without_truncate(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  with metrics.MetricsWriter(tmp_path, total_steps=10, is_main=True) as writer:
    writer.write(2, {"loss": 2.0})
  assert _records(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_non_main_process_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricsWriter(workdir, total_steps=10, is_main=False) as writer:
    writer.truncate_after(0)
    writer.write(1, {"loss": 1.0})
  assert not workdir.exists()


def test_eta_uses_moving_average_of_step_time(tmp_path, monkeypatch):
  clock = iter([0.0, 10.0, 20.0])
  monkeypatch.setattr(metrics, "_clock", lambda: next(clock))
  with metrics.MetricsWriter(tmp_path, total_steps=100, is_main=True) as writer:
    writer.write(0, {})
    writer.write(10, {})  # 1 s/step
    writer.write(15, {})  # 2 s/step -> 0.9 * 1 + 0.1 * 2 = 1.1 s/step
    assert writer._seconds_per_step == pytest.approx(1.1)
    assert writer._console_line(15, {}).endswith("eta=0:01:34")  # 85 steps * 1.1 s
