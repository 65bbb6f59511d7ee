"""Runs the reproduction's jobs side by side, each in a child process, and reports their failures.

A job is a stage or an arm of `python -m rcfd_jax.reproduce` (rcfd_jax.reproduce.run
names and runs them). run_jobs starts each as soon as the jobs it needs are
done, `parallel` at once; Workers runs them in long-lived child processes,
start_child runs any command in a fresh one. Every job's output goes to
DIR/logs/NAME.log, and every child shares the compiled programs in
DIR/jax_cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

from absl import logging

from rcfd_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Job:
  name: str                # "REGIME/STAGE" or "TASK/ARM": what `--job=NAME` runs
  needs: tuple[str, ...]   # jobs that must have finished first
  done: Path               # exists once the job has finished


def log_path(d: Path, name: str) -> Path:
  return d / "logs" / f"{name.replace('/', '.')}.log"


def child_env(d: Path) -> dict[str, str]:
  """The environment of a child process: the shared DIR/jax_cache, and this package importable."""
  package_root = str(Path(__file__).resolve().parents[2])
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(d / "jax_cache"), TOKENIZERS_PARALLELISM="false",
              PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))


def start_child(d: Path, name: str, cmd: list[str]) -> subprocess.Popen:
  """cmd in a child process that shares DIR/jax_cache, its output appended to DIR/logs/NAME.log."""
  log = log_path(d, name)
  log.parent.mkdir(parents=True, exist_ok=True)
  with log.open("ab") as out:
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(d))


class Workers:
  """Long-lived child processes that run the command's jobs one after another.

  A job in a fresh process spends 15-20 s before its first step on imports,
  the tokenizer, tracing and loading its compiled programs; a worker spends
  most of that once. A worker is `python -m rcfd_jax.reproduce --workdir=DIR
  --serve` (`serve`): it reads a job name per line on stdin, runs the job
  with its output appended to DIR/logs/NAME.log (its own goes to
  DIR/logs/workerN.log), and answers with the job's exit code on stdout.
  `start(job)` hands the job to an idle worker, starting one if none is
  idle, and returns a handle that run_jobs polls like a subprocess.Popen. A
  job gives the same results in a worker as in a process of its own: its
  randomness comes from its config's seed.
  """

  def __init__(self, d: Path, cmd: list[str]):
    self._d, self._cmd = d, cmd  # cmd starts a worker: `python -m rcfd_jax.reproduce ... --serve`
    self._all: list[_Worker] = []
    self._idle: list[_Worker] = []

  def start(self, job: Job) -> _Handle:
    if not self._idle:
      log = log_path(self._d, f"worker{len(self._all)}")
      log.parent.mkdir(parents=True, exist_ok=True)
      self._all.append(_Worker(self._cmd, log, child_env(self._d)))
      self._idle.append(self._all[-1])
    return _Handle(job.name, self._idle.pop(), self._idle.append)

  def __enter__(self) -> Workers:
    return self

  def __exit__(self, *exc) -> None:
    """Ends every worker: an idle one at the end of its input; a busy one is stopped first (SIGTERM)."""
    for worker in self._all:
      if worker not in self._idle and worker.proc.poll() is None:
        worker.proc.terminate()
      worker.close()


_ANSWER = "job-ended "  # a worker's answer line: _ANSWER + "RC NAME"


class _Worker:
  def __init__(self, cmd: list[str], log: Path, env: dict[str, str]):
    self._log = log
    with log.open("ab") as out:
      self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=out, env=env,
                                   text=True, bufsize=1)
    self.answers: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      if line.startswith(_ANSWER):
        self.answers.put(line[len(_ANSWER):])
      else:  # printed before serve() took stdout over
        with self._log.open("a") as out:
          out.write(line)
    self.answers.put(None)  # the worker ended

  def send(self, name: str) -> None:
    self.proc.stdin.write(name + "\n")
    self.proc.stdin.flush()

  def close(self) -> None:
    if not self.proc.stdin.closed:
      try:
        self.proc.stdin.close()
      except BrokenPipeError:  # it had already ended
        pass
    self.proc.wait()


class _Handle:
  """One job running in a worker, with the part of the Popen interface run_jobs uses."""

  def __init__(self, name: str, worker: _Worker, on_idle: Callable[[_Worker], None]):
    self.name, self._worker, self._on_idle = name, worker, on_idle
    self.returncode: int | None = None
    worker.send(name)

  def poll(self) -> int | None:
    if self.returncode is None:
      try:
        line = self._worker.answers.get_nowait()
      except queue.Empty:
        return None
      if line is None:  # the worker died during the job
        self.returncode = self._worker.proc.wait() or 1
      else:
        rc, _, name = line.rstrip("\n").partition(" ")
        if name != self.name:
          raise RuntimeError(f"a worker answered for {name!r} while running {self.name!r}")
        self.returncode = int(rc)
        if self.returncode == 0:
          self._on_idle(self._worker)
    return self.returncode

  def terminate(self) -> None:
    self._worker.proc.terminate()  # a trainer saves a checkpoint, then the worker ends

  def wait(self) -> int:
    self._worker.close()
    return self._worker.proc.returncode


def serve(d: Path, run_job: Callable[[str], None]) -> int:
  """A worker's loop (Workers): run_job(NAME) for each line of stdin, then its exit code on stdout.

  Ends at the end of its input, or after the first job that fails (exit code
  1 for an exception, 2 for a UserError); the error ends that job's log.
  """
  answers = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # what is printed outside a job goes to the worker's log, not into the answers
  for line in sys.stdin:
    name = line.strip()
    with _output_to(log_path(d, name)):
      try:
        run_job(name)
        rc = 0
      except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        rc = 2
      except Exception:  # noqa: BLE001 - the traceback goes to the job's log, the parent raises it
        traceback.print_exc()
        rc = 1
    answers.write(f"{_ANSWER}{rc} {name}\n")
    if rc:
      return rc
  return 0


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
  """Sends this process's stdout and stderr to log: the file descriptors, so native code's output too."""
  log.parent.mkdir(parents=True, exist_ok=True)
  sys.stdout.flush()
  sys.stderr.flush()
  saved = [os.dup(1), os.dup(2)]
  with log.open("ab") as out:
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
  try:
    yield
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in zip((1, 2), saved):
      os.dup2(copy, fd)
      os.close(copy)


def run_jobs(todo: list[Job], d: Path, parallel: int, start: Callable[[Job], subprocess.Popen]) -> dict[str, float]:
  """Runs every job whose output is missing, `parallel` at once; seconds per job run.

  start(job) launches one and returns a Popen or a Workers handle; either way
  its output goes to DIR/logs/NAME.log.

  A job starts as soon as the jobs it needs are done, earliest in `todo`
  first. If one fails, or ends without its output (stopped by a signal), the
  others are stopped (SIGTERM: trainers checkpoint) and its log's end is
  raised.
  """
  done = {j.name for j in todo if j.done.exists()}
  pending = [j for j in todo if j.name not in done]
  running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
  seconds = {}
  try:
    while pending or running:
      ready = [j for j in pending if set(j.needs) <= done]
      for job in ready[:parallel - len(running)]:
        logging.info("starting %s", job.name)
        pending.remove(job)
        running[job.name] = (job, start(job), time.perf_counter())
      if not running:
        raise RuntimeError(f"jobs wait for jobs that are not planned: {[j.name for j in pending]}")
      time.sleep(0.2)
      for name, (job, proc, t0) in list(running.items()):
        if proc.poll() is None:
          continue
        del running[name]
        if proc.returncode != 0 or not job.done.exists():
          tail = log_path(d, name).read_text(errors="replace")[-3000:]
          what = f"failed with exit code {proc.returncode}" if proc.returncode else f"ended without {job.done}"
          raise RuntimeError(f"{name} {what}; its log ends:\n{tail}")
        seconds[name] = time.perf_counter() - t0
        done.add(name)
        logging.info("finished %s in %.0f s", name, seconds[name])
  finally:
    for _, proc, _ in running.values():
      proc.terminate()
      proc.wait()
  return seconds


def run_commands(d: Path, commands: dict[str, tuple[list[str], Path]], parallel: int) -> dict[str, float]:
  """{name: (command line, the file it writes last)}: run_jobs over processes of their own.

  For experiments beside the reproduction (benchmarks/): each command runs in
  a child that shares DIR/jax_cache, logs to DIR/logs/NAME.log, and is
  skipped when its file exists. Prints and returns seconds per command run.
  """
  todo = [Job(name, (), done) for name, (_, done) in commands.items()]
  seconds = run_jobs(todo, d, parallel, lambda job: start_child(d, job.name, commands[job.name][0]))
  for name, sec in seconds.items():
    print(f"finished {name} in {sec:.0f} s", flush=True)
  return seconds
