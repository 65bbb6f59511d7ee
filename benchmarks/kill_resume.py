"""SIGKILL the trainer at many points, rerun it, and check it ends where an uninterrupted run ends.

    python benchmarks/kill_resume.py --out=/tmp/kill_resume [--points=compile,mid_step,...]

Too slow for CI (two runs of the tiny config per point); tests/test_train.py
and tests/test_hardening.py keep two points in the suite. Each point runs
`python -m rcfd_jax.main` with a hook that SIGKILLs the process at that
point (the trainer has no test hooks), then reruns the same command without
the hook, and compares the final metrics.jsonl (timings aside), the final
evaluation and the final parameters (exported through rcfd_jax.export) with
those of one uninterrupted run. Prints one line per point and, last,
    kill_resume: ours=PASSED/N peer=N ratio=... (points)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
TOTAL = 6
OVERRIDES = {"total_steps": TOTAL, "checkpoint.every_steps": 2, "eval.every_steps": 3, "eval.num_prompts": 8,
             "rollout.max_new_tokens": 8, "data.demo_max_tokens": 8, "data.max_examples": 64,
             "data.validation_size": 8}
TIMING = {"tokens_per_second", "bridge_seconds"}

# point -> (Python run in the child before main, what it interrupts)
POINTS = {
    "demo_scoring": ("patch(demos, 'score', before=lambda *a, **k: die())",
                     "scoring the demonstrations (first run, cache empty)"),
    "compile": ("patch(train, 'compile_steps', before=lambda *a, **k: die_in(0.5))",
                "while XLA compiles the step"),
    "mid_step": ("patch(bridge, 'device_batch', before=lambda *a, **k: step_is(3) and die_in(0.05))",
                 "inside step 3's rollout/update"),
    "mid_metrics_line": ("half_line_at(4)", "writing step 4's metrics line (half a line on disk)"),
    "mid_async_save": ("patch(checkpoint.Checkpointer, 'save', after=lambda s, step, *a: step == 4 and die())",
                       "right after the step-4 async save starts"),
    "mid_save_commit": ("patch(checkpoint.Checkpointer, 'save', after=lambda s, step, *a: step == 4 and die_in(0.2))",
                        "while Orbax commits step 4 (0.2 s into the save)"),
    "mid_eval": ("patch(evaluation, 'write_eval', before=lambda *a, **k: die())",
                 "inside the step-3 evaluation, before its files"),
    "after_eval": ("patch(evaluation, 'write_eval', after=lambda *a, **k: die())",
                   "after the step-3 evaluation files, before step 4"),
    "resume_restore": ("second_run_dies_in_restore()", "killed at step 5, then again while restoring"),
    "final_close": ("patch(checkpoint.Checkpointer, 'close', before=lambda s: die())",
                    "at the end, while the last save is finishing"),
}

_CHILD = textwrap.dedent("""
    import os, signal, sys, threading, time
    from absl import app
    from rcfd_jax import bridge, checkpoint, demos, evaluation, main, metrics, train
    STEP = {"n": 0}
    def die():
      os.kill(os.getpid(), signal.SIGKILL)
      return True
    def die_in(seconds):
      threading.Timer(seconds, die).start()
      return True
    def step_is(n):
      STEP["n"] += 1
      return STEP["n"] == n
    def patch(owner, name, before=None, after=None):
      fn = getattr(owner, name)
      def wrapped(*a, **k):
        if before: before(*a, **k)
        out = fn(*a, **k)
        if after: after(*a, **k)
        return out
      setattr(owner, name, wrapped)
    def half_line_at(step):
      write = metrics.MetricsWriter.write
      def wrapped(self, s, m):
        if s == step:
          self._file.write('{"step": %d, "loss": 0.12' % s)
          self._file.flush()
          die()
        write(self, s, m)
      metrics.MetricsWriter.write = wrapped
    def second_run_dies_in_restore():
      marker = os.environ["KILL_MARKER"]
      if not os.path.exists(marker):
        open(marker, "w").close()
        patch(metrics.MetricsWriter, "write", after=lambda self, s, m: s == 5 and die())
      else:
        os.remove(marker)
        patch(checkpoint.Checkpointer, "_try_restore", before=lambda *a: die_in(0.01))
    exec(os.environ["KILL_HOOK"])
    parsed = main.parse_flags(["rcfd_jax.main"] + sys.argv[1:])
    app.run(main.main, flags_parser=lambda _: parsed)
""")

flags.DEFINE_string("out", "/tmp/kill_resume", "Scratch directory (assets, workdirs, caches).")
flags.DEFINE_list("points", list(POINTS), "Kill points to run.")
FLAGS = flags.FLAGS


def _args(assets: Path, cache: Path, wd: Path) -> list[str]:
  return ([f"--config={REPO / 'configs' / 'tiny.py'}:{assets}", f"--workdir={wd}",
           f"--config.reward.cache_dir={cache}"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()])


def _env(out: Path) -> dict:
  e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest", HF_HUB_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false", JAX_COMPILATION_CACHE_DIR=str(out / "xla_cache"),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
           PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  return e


def _metrics(wd: Path) -> list[dict]:
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _params(wd: Path):
  """Final parameters as numpy, through the export path users take."""
  import jax
  import numpy as np
  from flax import nnx
  from rcfd_jax import export
  lm, _, step = export.load_trained(wd)
  return step, [np.asarray(x) for x in jax.tree.leaves(nnx.state(lm))]


def _same(ref, wd: Path) -> list[str]:
  import numpy as np
  diffs = []
  if _metrics(wd) != ref["metrics"]:
    diffs.append("metrics.jsonl differs")
  for name, want in ref["evals"].items():
    got = json.loads((wd / "eval" / name).read_text())
    if {k: got[k] for k in want} != want:
      diffs.append(f"eval/{name} differs")
  step, params = _params(wd)
  if step != TOTAL:
    diffs.append(f"latest checkpoint is step {step}")
  if len(params) != len(ref["params"]) or any(not np.array_equal(a, b) for a, b in zip(params, ref["params"])):
    diffs.append("parameters differ")
  return diffs


def main(argv):
  del argv
  out = Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  from rcfd_jax.reproduce import prepare
  assets = prepare.build(out / "assets", n_reviews=400, width=32)
  env = _env(out)
  ref_wd, ref_cache = out / "reference", out / "cache_reference"
  if not (ref_wd / "checkpoints" / str(TOTAL)).is_dir():
    subprocess.run([sys.executable, "-m", "rcfd_jax.main", *_args(assets, ref_cache, ref_wd)], env=env,
                   cwd=REPO, check=True, capture_output=True)
  keys = ("reward_mean", "demo_reward_mean", "alignment", "distinct_2", "length_mean", "kl")
  ref = {"metrics": _metrics(ref_wd), "params": _params(ref_wd)[1],
         "evals": {p.name: {k: json.loads(p.read_text())[k] for k in keys}
                   for p in sorted((ref_wd / "eval").glob("step_*.json"))}}
  passed = 0
  for point in FLAGS.points:
    hook, what = POINTS[point]
    wd, cache = out / f"run_{point}", out / f"cache_{point}"
    for d in (wd, cache):
      if d.exists():
        subprocess.run(["rm", "-rf", str(d)], check=True)
    t0 = time.time()
    kills, rc = 0, None
    # Killed runs are rerun unchanged (the hook stays) until one exits: each hook fires once per workdir
    # state, so the run that passes the point already resumed past it. A plain rerun then finishes.
    for attempt in range(4):
      child_env = dict(env, KILL_HOOK=hook if attempt < 2 else "", KILL_MARKER=str(out / f"{point}.marker"))
      p = subprocess.run([sys.executable, "-c", _CHILD, *_args(assets, cache, wd)], env=child_env, cwd=REPO,
                         capture_output=True, text=True)
      rc = p.returncode
      if rc == -9:
        kills += 1
        continue
      if rc != 0:
        print(f"{point}: rerun failed rc={rc}: {p.stderr[-2000:]}", file=sys.stderr)
      break
    diffs = ["never killed"] if kills == 0 else ([f"exit {rc}"] if rc != 0 else _same(ref, wd))
    passed += not diffs
    print(f"{point:18s} kills={kills} {'ok' if not diffs else 'FAIL: ' + '; '.join(diffs)}  "
          f"({what}; {time.time() - t0:.0f}s)", flush=True)
  n = len(FLAGS.points)
  print(f"kill_resume: ours={passed}/{n} peer={n} ratio={passed / max(n, 1):.2f} (points matching the uninterrupted run)")


if __name__ == "__main__":
  app.run(main)
