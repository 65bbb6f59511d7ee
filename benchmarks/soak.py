"""Soak: the tiny config for N minutes, SIGTERM every few minutes, restarted; nothing lost or repeated.

    nice -n 10 python benchmarks/soak.py --minutes=30 --out=/tmp/soak

Runs `python -m rcfd_jax.main` on the tiny config (checkpoints every 3 steps,
an evaluation every 30) with an endless step budget. A few minutes after each
start (--sigterm_min_s..--sigterm_max_s, counted from the run's first new
metrics line, so the signal lands in the training loop) it sends SIGTERM,
waits for the clean exit and starts the same command again. At the end it
checks:
  - every run after the first resumed from the step the previous run saved
    on SIGTERM (no step lost beyond the last checkpoint: zero here);
  - metrics.jsonl holds steps 1..last exactly once each, in order;
  - the latest checkpoint is the last logged step;
and prints a JSON summary and, last,
    soak: ours=STEPS peer=RESTARTS ratio=PROBLEMS (steps, restarts, problems)
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
flags.DEFINE_float("minutes", 30.0, "How long to soak.")
flags.DEFINE_string("out", "/tmp/soak", "Scratch directory (assets, workdir, cache, logs); emptied first.")
flags.DEFINE_float("sigterm_min_s", 90.0, "Shortest time from a run's first step to its SIGTERM.")
flags.DEFINE_float("sigterm_max_s", 180.0, "Longest time from a run's first step to its SIGTERM.")
flags.DEFINE_integer("seed", 0, "Seeds the SIGTERM times.")
FLAGS = flags.FLAGS

OVERRIDES = {"total_steps": 10**7, "checkpoint.every_steps": 3, "eval.every_steps": 30, "eval.num_prompts": 8}


def _lines(f: Path) -> int:
  return f.read_text().count("\n") if f.exists() else 0


def main(argv):
  del argv
  out = Path(FLAGS.out)
  subprocess.run(["rm", "-rf", str(out / "run"), str(out / "cache"), str(out / "logs")], check=True)
  (out / "logs").mkdir(parents=True)
  from rcfd_jax.reproduce import prepare
  assets = prepare.build(out / "assets", n_reviews=400, width=32)
  wd = out / "run"
  cmd = [sys.executable, "-m", "rcfd_jax.main", f"--config={REPO / 'configs' / 'tiny.py'}:{assets}",
         f"--workdir={wd}", f"--config.reward.cache_dir={out / 'cache'}"]
  cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             JAX_COMPILATION_CACHE_DIR=str(out / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  rng = random.Random(FLAGS.seed)
  deadline = time.time() + 60 * FLAGS.minutes
  runs, problems = [], []
  while time.time() < deadline:
    log = out / "logs" / f"run_{len(runs)}.err"
    before = _lines(wd / "metrics.jsonl")
    t0 = time.time()
    with open(log, "w") as err:
      proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
      # The SIGTERM clock starts at the run's first new step (or when the soak's time is up).
      while proc.poll() is None and _lines(wd / "metrics.jsonl") <= before and time.time() < deadline:
        time.sleep(0.5)
      stop_at = min(time.time() + rng.uniform(FLAGS.sigterm_min_s, FLAGS.sigterm_max_s), deadline)
      while proc.poll() is None and time.time() < stop_at:
        time.sleep(0.5)
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
      try:
        rc = proc.wait(timeout=600)
      except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        problems.append(f"run {len(runs)} ignored SIGTERM for 600 s")
    text = log.read_text()
    resumed = re.findall(r"resumed from step (\d+)", text)
    saved = re.findall(r"SIGTERM received: saved step (\d+) and stopping", text)
    run = {"rc": rc, "seconds": round(time.time() - t0, 1), "resumed_from": int(resumed[-1]) if resumed else 0,
           "saved": int(saved[-1]) if saved else None}
    if rc != 0 or run["saved"] is None:
      problems.append(f"run {len(runs)} exited {rc} without a SIGTERM save (see {log})")
    if runs and runs[-1]["saved"] is not None and run["resumed_from"] != runs[-1]["saved"]:
      problems.append(f"run {len(runs)} resumed from {run['resumed_from']}, not from the saved {runs[-1]['saved']}")
    runs.append(run)
    print(json.dumps(run), flush=True)

  steps = [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines()]
  duplicates = sorted({s for s in steps if steps.count(s) > 1})
  gaps = sorted(set(range(1, max(steps, default=0) + 1)) - set(steps))
  if steps != list(range(1, len(steps) + 1)):
    problems.append(f"metrics.jsonl is not steps 1..{len(steps)}: duplicates {duplicates[:10]}, gaps {gaps[:10]}")
  ckpts = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  if not ckpts or ckpts[-1] != max(steps, default=0):
    problems.append(f"latest checkpoint {ckpts[-1:]} is not the last logged step {max(steps, default=0)}")
  lost = sum(max(0, (a["saved"] or 0) - b["resumed_from"]) for a, b in zip(runs, runs[1:]))
  summary = {"minutes": FLAGS.minutes, "runs": len(runs), "restarts": len(runs) - 1, "steps": max(steps, default=0),
             "metrics_lines": len(steps), "duplicates": duplicates, "gaps": gaps, "steps_lost": lost,
             "checkpoints": ckpts, "problems": problems}
  print(json.dumps(summary), flush=True)
  print(f"soak: ours={summary['steps']} peer={summary['restarts']} ratio={len(problems)} "
        "(steps, restarts, problems)")
  sys.exit(1 if problems else 0)


if __name__ == "__main__":
  app.run(main)
