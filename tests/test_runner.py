"""The reproduction's job runner: worker processes, job logs, order and failures, on jobs that take no time.

The workers here serve a stand-in job function (FAKE_JOB) instead of the
reproduction's stages and arms, so each test costs a few Python start-ups;
tests/test_reproduce.py runs the real jobs through the same workers.
"""

import sys
import textwrap

import pytest

from rcfd_jax.reproduce import runner
from rcfd_jax.reproduce.runner import Job

# A worker whose jobs write DIR/NAME.done unless named "bad" (raises), "quiet" (writes nothing) or
# "user" (a UserError); each prints which worker process ran it, to stdout and to stderr.
FAKE_JOB = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from rcfd_jax.errors import UserError
    from rcfd_jax.reproduce import runner

    d = Path(sys.argv[1])

    def run_job(name):
      print(f"ran {name} in {os.getpid()}")
      print(f"stderr of {name}", file=sys.stderr)
      if name == "bad":
        raise ValueError("the job broke")
      if name == "user":
        raise UserError("the job's input is wrong")
      if name != "quiet":
        (d / f"{name}.done").write_text(str(os.getpid()))

    print("outside any job")
    sys.exit(runner.serve(d, run_job))
""")


def workers(d):
  return runner.Workers(d, [sys.executable, "-c", FAKE_JOB, str(d)])


def test_workers_run_jobs_in_order_each_logging_to_its_own_file(tmp_path):
  todo = [Job("a", (), tmp_path / "a.done"), Job("b", ("a",), tmp_path / "b.done"),
          Job("c", (), tmp_path / "c.done"), Job("d", ("b", "c"), tmp_path / "d.done")]
  with workers(tmp_path) as w:
    seconds = runner.run_jobs(todo, tmp_path, 2, w.start)
  assert sorted(seconds) == ["a", "b", "c", "d"]
  pids = {name: (tmp_path / f"{name}.done").read_text() for name in "abcd"}
  assert len(set(pids.values())) == 2  # two workers, reused: four jobs, two processes
  for name in "abcd":
    log = runner.log_path(tmp_path, name).read_text()
    assert log == f"ran {name} in {pids[name]}\nstderr of {name}\n"
  assert sorted(p.name for p in (tmp_path / "logs").glob("worker*.log")) == ["worker0.log", "worker1.log"]
  assert "outside any job" in (tmp_path / "logs" / "worker0.log").read_text()

  # Finished jobs are not run again.
  (tmp_path / "d.done").unlink()
  with workers(tmp_path) as w:
    assert list(runner.run_jobs(todo, tmp_path, 2, w.start)) == ["d"]


@pytest.mark.parametrize("name, message, in_log", [
    ("bad", "bad failed with exit code 1", "ValueError: the job broke"),
    ("user", "user failed with exit code 2", "error: the job's input is wrong"),
    ("quiet", "quiet ended without", "ran quiet"),
])
def test_a_failed_job_stops_the_run_with_the_end_of_its_log(tmp_path, name, message, in_log):
  todo = [Job(name, (), tmp_path / f"{name}.done"), Job("after", (name,), tmp_path / "after.done")]
  with workers(tmp_path) as w:
    with pytest.raises(RuntimeError, match=message) as e:
      runner.run_jobs(todo, tmp_path, 2, w.start)
  assert in_log in str(e.value)
  assert not (tmp_path / "after.done").exists()
  assert all(worker.proc.poll() is not None for worker in w._all)  # no worker outlives the run


def test_jobs_that_wait_for_unplanned_jobs_are_refused(tmp_path):
  with workers(tmp_path) as w:
    with pytest.raises(RuntimeError, match="not planned"):
      runner.run_jobs([Job("a", ("missing",), tmp_path / "a.done")], tmp_path, 2, w.start)


def test_run_commands_runs_each_missing_command_in_a_process_of_its_own(tmp_path, capsys):
  write = "import sys; from pathlib import Path; print('wrote', sys.argv[1]); Path(sys.argv[1]).write_text('x')"
  commands = {name: ([sys.executable, "-c", write, str(tmp_path / f"{name}.done")], tmp_path / f"{name}.done")
              for name in ("a", "b", "c")}
  (tmp_path / "b.done").write_text("earlier")  # finished before: reused, not rerun
  seconds = runner.run_commands(tmp_path, commands, parallel=2)
  assert sorted(seconds) == ["a", "c"] and (tmp_path / "b.done").read_text() == "earlier"
  assert all((tmp_path / f"{n}.done").read_text() == "x" for n in ("a", "c"))
  assert f"wrote {tmp_path / 'a.done'}" in runner.log_path(tmp_path, "a").read_text()
  assert "finished a in" in capsys.readouterr().out
