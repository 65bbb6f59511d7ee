"""Helpers shared by the benchmarks: assets, worker processes, timing, reporting.

A benchmark driver runs in the project's venv (JAX). Each side of a
comparison runs in its own warm worker process (ours in the project's venv,
TRL in the benchmark venv) that speaks one JSON object per line:

    driver -> worker   {"cmd": "run", "iters": N}  |  {"cmd": "quit"}
    worker -> driver   "@@ " + {"ready": ..., "first_step_s": ...}   once, after its first step
                       "@@ " + {"times": [...], "tokens": [...], "maxrss_mb": ...}  per run

Anything else a worker prints (warnings, progress) is passed through to the
driver's stderr. The driver asks the workers for a few iterations each in
turn, A B C A B C, because these machines drift by up to 1.6x within minutes.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = "@@ "


def cores() -> int:
  """Cores this process may use; XLA's CPU client sizes its thread pool the same way."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def maxrss_mb() -> float:
  """Peak resident memory of this process (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs) -> float:
  return statistics.median(xs)


def cost_analysis(compiled) -> dict:
  """XLA's cost analysis of a compiled program (flops, bytes accessed, ...) as one dict.

  A loop body (the decode loop, the layer scan) counts once: a floor, for comparisons.
  """
  ca = compiled.cost_analysis()
  return (ca[0] if isinstance(ca, list) else ca) or {}


# ---------------------------------------------------------------- assets

def build_assets(out: Path, *, width: int, layers: int, heads: int = 4, vocab: int = 1000, context: int = 128,
                 prompt_tokens: int = 16, demo_tokens: int = 32, n_rows: int = 512, seed: int = 0) -> Path:
  """A random GPT-2 + BPE tokenizer as a HF dir (out/model), a reward model (out/rm), out/data.jsonl.

  Rows have a `prompt` of exactly prompt_tokens tokens (re-encoding the text
  gives the same count) and a `demonstration` continuing the review. Both
  sides load these very files, so they run identical fp32 weights on
  identical prompts. Returns out; an existing complete out is reused.
  """
  from rcfd_jax.reproduce import corpus, tiny
  out = Path(out)
  if (out / "model" / "config.json").exists() and (out / "data.jsonl").exists():
    return out
  texts = corpus.pretraining_texts(4000, seed)
  tok = tiny.train_tokenizer(texts, vocab)
  cfg = tiny.gpt2_config(len(tok), n_embd=width, n_layer=layers, n_head=heads, n_positions=context)
  tiny.write_model_dir(out / "model", cfg, tok, seed=seed)
  # A scalar reward model on the policy's tokenizer, for PPO (TRL's PPOTrainer takes only a model).
  tiny.write_model_dir(out / "rm", tiny.gpt2_config(len(tok), n_embd=width, n_layer=layers, n_head=heads,
                                                    n_positions=context, num_labels=1), tok, seed=seed + 1)
  rows = []
  for text in texts:
    ids = tok.encode(text)
    if len(ids) < prompt_tokens + demo_tokens:
      continue
    prompt = tok.decode(ids[:prompt_tokens])
    if len(tok.encode(prompt)) != prompt_tokens:
      continue
    rows.append({"prompt": prompt, "demonstration": tok.decode(ids[prompt_tokens:prompt_tokens + demo_tokens])})
    if len(rows) == n_rows:
      break
  with open(out / "data.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return out


# ---------------------------------------------------------------- workers

class Worker:
  """A warm benchmark worker process (see the module docstring for the protocol)."""

  def __init__(self, name: str, argv: list[str], env: dict | None = None):
    self.name = name
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=dict(os.environ, **(env or {})), cwd=ROOT)
    self._err_tail: list[str] = []
    threading.Thread(target=self._pump_stderr, daemon=True).start()
    self.ready = self._read()

  def _pump_stderr(self):
    for line in self.proc.stderr:
      self._err_tail = (self._err_tail + [line])[-40:]
      if os.environ.get("BENCH_VERBOSE"):
        sys.stderr.write(f"[{self.name}] {line}")

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(PROTOCOL):
        return json.loads(line[len(PROTOCOL):])
      if os.environ.get("BENCH_VERBOSE"):
        sys.stderr.write(f"[{self.name}] {line}")
    self.proc.wait()
    time.sleep(0.2)
    raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}:\n{''.join(self._err_tail)}")

  def run(self, iters: int) -> dict:
    self.proc.stdin.write(json.dumps({"cmd": "run", "iters": iters}) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)
      except (BrokenPipeError, subprocess.TimeoutExpired):
        self.proc.kill()


def serve(step, ready: dict, extra=dict) -> None:
  """Worker side: report readiness, then time `step()` (returns generated tokens) on request.

  `extra()` adds fields to each reply (e.g. how many programs were compiled so far).
  """
  send(ready)
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "quit":
      return
    times, tokens = [], []
    for _ in range(cmd["iters"]):
      t = time.perf_counter()
      tokens.append(step())
      times.append(time.perf_counter() - t)
    send({"times": times, "tokens": tokens, "maxrss_mb": maxrss_mb(), **extra()})


def send(obj: dict) -> None:
  sys.stdout.write(PROTOCOL + json.dumps(obj) + "\n")
  sys.stdout.flush()


def alternate(workers: list[Worker], rounds: int, iters: int) -> dict[str, dict]:
  """Round-robin timed runs; per worker: all iteration times, tokens per iteration, peak RSS."""
  res = {w.name: {"times": [], "tokens": [], "maxrss_mb": 0.0} for w in workers}
  for r in range(rounds):
    order = workers if r % 2 == 0 else workers[::-1]  # neither side always runs right after the other
    for w in order:
      out = w.run(iters)
      res[w.name]["times"] += out["times"]
      res[w.name]["tokens"] += out["tokens"]
      res[w.name]["maxrss_mb"] = max(res[w.name]["maxrss_mb"], out["maxrss_mb"])
      res[w.name]["last"] = out
  for w in workers:
    res[w.name].update(w.ready)
  return res


def summary(r: dict) -> dict:
  """Median seconds per iteration and generated tokens per second of one worker's results."""
  s = median(r["times"])
  return {"s_per_iter": s, "tokens_per_s": median(r["tokens"]) / s, "maxrss_mb": r["maxrss_mb"],
          "first_step_s": r["first_step_s"]}


def line(name: str, ours: float, peer: float, unit: str, higher_is_better: bool = True) -> str:
  """The contract line: NAME: ours=X peer=Y ratio=Z (unit); ratio > 1 means ours is better."""
  ratio = ours / peer if higher_is_better else peer / ours
  fmt = (lambda x: f"{x:.4g}")
  return f"{name}: ours={fmt(ours)} peer={fmt(peer)} ratio={ratio:.2f} ({unit})"


def reproduction_tasks(d: Path, arg: str, known: tuple[str, ...], needed: str, what: str) -> list[str]:
  """The tasks a script over the reproduction's DIR reads: the comma-separated `arg`, each one of `known`,
  each with DIR/runs/TASK/`needed` present; otherwise exits with one line saying what to run."""
  tasks = [t for t in arg.split(",") if t]
  unknown = [t for t in tasks if t not in known]
  if unknown:
    sys.exit(f"--tasks: unknown {unknown}; use some of {known}")
  missing = [t for t in tasks if not (d / "runs" / t / needed).exists()]
  if missing:
    sys.exit(f"{d} has no {what} for {missing}: run `python -m rcfd_jax.reproduce --workdir={d}` first")
  return tasks


def print_table(header: list[str], rows: list[list[str]]) -> None:
  """A markdown table on stdout."""
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(row) + " |")
