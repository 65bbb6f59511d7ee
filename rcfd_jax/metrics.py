"""Per-step metrics: DIR/metrics.jsonl, TensorBoard under DIR/tb, a console line.

metrics.jsonl is the contract other tools read (one JSON object per logged
step, `step` first), so it must stay consistent across crashes and resumes:

- each line is written and flushed whole, so a kill leaves at most one
  partial last line, which opening the writer drops;
- on resume, `truncate_after(restored_step)` drops lines logged after the
  checkpoint, so replayed steps never appear twice and no step is missing;
- only process 0 writes; other processes' writers are inert, which lets every
  process run the same loop code.

Non-finite values are written as JSON null: NaN is not valid JSON and strict
readers (jq, JavaScript) reject it. TensorBoard still gets the raw float.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from rcfd_jax import files

METRICS_FILE = "metrics.jsonl"
TB_SUBDIR = "tb"

# Seconds from a monotonic clock; a module global so tests can substitute it.
_clock = time.monotonic

# Keys shown on the console line, in this order, when present.
_CONSOLE_KEYS = ("reward_mean", "demo_reward_mean", "kl", "length_mean", "tokens_per_second")


def _to_scalar(name: str, value: Any) -> float | int:
  """Python number for a numpy/jax scalar (or size-1 array)."""
  if isinstance(value, (bool, np.bool_)):
    return int(value)
  if isinstance(value, int):
    return value
  array = np.asarray(value)
  if array.size != 1:
    raise TypeError(f"metric {name!r} must be a scalar, got shape {array.shape}")
  return float(array.reshape(()))


def _json_value(value: float | int) -> float | int | None:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


def _read_complete_lines(path: str) -> tuple[list[str], bool]:
  """Lines of `path` that end in a newline and parse as JSON, and whether
  that was the whole file.

  A line without its newline is a write that a kill interrupted; it may even
  parse (cut after a digit), so the newline, not parsing, decides.
  """
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = text.split("\n")
  if lines and lines[-1]:
    logging.warning("dropping a partial last line in %s (the previous run stopped mid-write)", path)
  complete = []
  for line in lines[:-1]:
    if not line.strip():
      continue
    try:
      ok = isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
      ok = False
    if not ok:
      logging.warning("dropping an unreadable line in %s: %.80s", path, line)
      continue
    complete.append(line)
  return complete, text == "".join(line + "\n" for line in complete)


def _rewrite(path: str, lines: list[str]) -> None:
  """Replaces `path` with `lines` atomically (a kill leaves old or new file)."""
  files.write_atomically(path, lambda f: f.writelines(line + "\n" for line in lines))


class MetricsWriter:
  """Appends one record per logged step to every metrics sink.

  Not thread-safe; the training loop calls it from one thread.
  """

  def __init__(self, workdir: str | os.PathLike, total_steps: int, is_main: bool | None = None,
               step_time_decay: float = 0.9):
    """Opens DIR/metrics.jsonl for appending (on the main process only).

    Args:
      workdir: the run directory DIR.
      total_steps: the step the run ends at, for the ETA.
      is_main: whether this process writes; default jax.process_index() == 0.
      step_time_decay: weight of the past in the moving average of seconds
        per step that the ETA uses; 0.9 averages about the last 10 logs.
    """
    self.workdir = os.fspath(workdir)
    self.total_steps = total_steps
    self.is_main = jax.process_index() == 0 if is_main is None else is_main
    self.path = os.path.join(self.workdir, METRICS_FILE)
    self._decay = step_time_decay
    self._seconds_per_step: float | None = None
    self._last: tuple[int, float] | None = None  # (step, time) of the last write
    self._tb = None
    self._tb_purge_step: int | None = None
    self._file = None
    if not self.is_main:
      return
    os.makedirs(self.workdir, exist_ok=True)
    if os.path.exists(self.path):
      lines, clean = _read_complete_lines(self.path)
      if not clean:
        _rewrite(self.path, lines)
    self._file = open(self.path, "a", encoding="utf-8")

  def truncate_after(self, step: int) -> None:
    """Drops records with step > `step`: call it after restoring `step`.

    The steps after the checkpoint will be trained and logged again. The
    TensorBoard writer is told to purge them too (tensorboardX purge_step).
    """
    if not self.is_main:
      return
    self._file.close()
    lines, _ = _read_complete_lines(self.path)
    lines = [line for line in lines if json.loads(line).get("step", -1) <= step]
    _rewrite(self.path, lines)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb_purge_step = step + 1
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._last = None

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs `scalars` (python, numpy or jax scalars) for `step` everywhere.

    Device values are fetched here, so call it only on logging steps.
    """
    if not self.is_main:
      return
    values = {name: _to_scalar(name, value) for name, value in scalars.items() if name != "step"}
    record = {"step": int(step), **{name: _json_value(v) for name, v in values.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

    tb = self._tensorboard()
    for name, value in values.items():
      tb.add_scalar(name, value, global_step=int(step))
    tb.flush()

    self._update_step_time(int(step))
    logging.info("%s", self._console_line(int(step), values))

  def _tensorboard(self):
    if self._tb is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

      # purge_step makes TensorBoard hide events at or after that step that
      # an earlier, interrupted run wrote.
      self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TB_SUBDIR), purge_step=self._tb_purge_step)
    return self._tb

  def _update_step_time(self, step: int) -> None:
    now = _clock()
    if self._last is not None and step > self._last[0]:
      seconds = (now - self._last[1]) / (step - self._last[0])
      if self._seconds_per_step is None:
        self._seconds_per_step = seconds
      else:
        self._seconds_per_step = self._decay * self._seconds_per_step + (1 - self._decay) * seconds
    self._last = (step, now)

  def _console_line(self, step: int, values: Mapping[str, float | int]) -> str:
    parts = [f"step {step}/{self.total_steps}"]
    for name in _CONSOLE_KEYS:
      if name in values:
        parts.append(f"{name}={values[name]:.4g}")
    if self._seconds_per_step is not None:
      remaining = max(self.total_steps - step, 0) * self._seconds_per_step
      parts.append(f"eta={_format_duration(remaining)}")
    return " ".join(parts)

  def close(self) -> None:
    """Flushes and closes the sinks."""
    tb, self._tb = self._tb, None
    f, self._file = self._file, None
    try:
      if tb is not None:
        tb.close()
    except OSError:
      # A failed final flush (full disk) leaves tensorboardX's writer threads running and its
      # atexit hook flushing again, each a traceback after ours: stop them, mark them closed.
      for w in tb.all_writers.values():
        worker, w.event_writer._closed = getattr(w.event_writer, "_worker", None), True
        if worker is not None:
          worker.stop()
      raise
    finally:
      if f is not None:
        f.close()  # may raise when the disk is full; the writer is closed either way

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
