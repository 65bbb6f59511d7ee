"""One RL iteration, rcfd_jax vs TRL (GRPOTrainer, RLOOTrainer, PPOTrainer), same tiny GPT-2, same work.

Setup (once):
    python3 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install -r benchmarks/requirements-bench.txt
    /work/bench-venv/bin/pip install --no-deps --target /work/bench-venv/trl-1.12 trl==1.12.0   # PPOTrainer
Run (project venv; about 10 minutes on 2 CPU cores):
    python benchmarks/rl_step.py                     # all groups
    python benchmarks/rl_step.py --groups=max --rounds=3

Both sides load one randomly initialised GPT-2 (2 layers, width 128, 4
heads, vocab 1000, context 128) saved once as a Hugging Face directory with
its BPE tokenizer, and the same prompts (exactly 16 tokens) with a
demonstration column. One iteration: 8 prompts x 4 samples, exactly 32 new
tokens each (temperature 1, fp32), reward, advantages, loss, backward, one
optimizer step. Rewards: the sentiment word count (rcfd_jax.rewards.
sentiment_words), and its RCfD form -(r(y) - r(y_demo))^2. Our side runs
the trainer's code path (benchmarks/rl_ours.py) twice: with the word count
in-graph (reward kind words:sentiment, one fused program per iteration) and
as the registered Python function through the host bridge (rollout program,
decode + Python reward, update program). TRL's settings are printed.

Each side runs in its own warm worker process; the driver asks each in turn
for --iters iterations, for --rounds rounds (A B C, then C B A, ...), since
these machines drift, and compares medians. First-step time (ours:
compilation; TRL: first step's warm-up) and peak RSS of each worker are
reported separately. The last lines follow the benchmark contract,
NAME: ours=X peer=Y ratio=Z (unit), ratio > 1 meaning ours is better.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

_GROUPS = flags.DEFINE_list("groups", ["max", "rcfd", "ppo"], "Comparisons to run: max, rcfd, ppo.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Alternating rounds.")
_ITERS = flags.DEFINE_integer("iters", 2, "Timed iterations per worker per round.")
_WORK = flags.DEFINE_string("work", "/tmp/rcfd_bench", "Assets directory (reused when present).")
_BENCH_PY = flags.DEFINE_string("bench_python", "/work/bench-venv/bin/python", "Python of the TRL venv.")
_TRL_PPO = flags.DEFINE_string("trl_ppo_path", "/work/bench-venv/trl-1.12", "trl 1.12.0 installed with --target.")


def ours(name: str, assets: Path, shape: dict, **kw) -> common.Worker:
  args = [f"--{k}={v}" for k, v in {**shape, **kw}.items()]
  return common.Worker(name, [sys.executable, "benchmarks/rl_ours.py", f"--assets={assets}"] + args)


def trl(name: str, assets: Path, shape: dict, trainer: str, **kw) -> common.Worker:
  words = assets / "words.json"
  if not words.exists():
    from rcfd_jax import words as words_lib
    words.write_text(json.dumps({"positive": sorted(words_lib.POSITIVE_WORDS),
                                 "negative": sorted(words_lib.NEGATIVE_WORDS)}))
  args = [f"--{k}={v}" for k, v in {**shape, **kw}.items()]
  env = {"PYTHONPATH": _TRL_PPO.value} if trainer == "ppo" else {}
  env["TOKENIZERS_PARALLELISM"] = "false"
  return common.Worker(name, [_BENCH_PY.value, "benchmarks/rl_trl.py", f"--trainer={trainer}",
                              f"--assets={assets}", f"--words={words}"] + args, env=env)


# group -> (workers to start, comparisons (ours worker, peer worker))
def plan(group: str, assets: Path, shape: dict):
  if group in ("max", "rcfd"):
    o = dict(objective=group)
    ws = [lambda: ours(f"ours_words_{group}", assets, shape, reward="words", **o),
          lambda: ours(f"ours_function_{group}", assets, shape, reward="function", **o),
          lambda: trl(f"trl_grpo_{group}", assets, shape, "grpo", **o)]
    pairs = [(f"ours_words_{group}", f"trl_grpo_{group}"), (f"ours_function_{group}", f"trl_grpo_{group}")]
    if group == "max":
      ws.append(lambda: trl("trl_rloo_max", assets, shape, "rloo", **o))
      pairs += [("ours_words_max", "trl_rloo_max"), ("ours_function_max", "trl_rloo_max")]
    return ws, pairs
  if group == "ppo":
    ws = [lambda: ours("ours_ppo_rm", assets, shape, algorithm="ppo", reward="classifier"),
          lambda: trl("trl_ppo_rm", assets, shape, "ppo")]
    return ws, [("ours_ppo_rm", "trl_ppo_rm")]
  raise ValueError(group)


def run_group(group, assets, shape, rounds, iters) -> tuple[dict, list]:
  makers, pairs = plan(group, assets, shape)
  workers = []
  try:
    for m in makers:  # started one at a time so no compile or warm-up overlaps another's
      workers.append(m())
    res = common.alternate(workers, rounds, iters)
  finally:
    for w in workers:
      w.close()
  return res, pairs


def main(argv):
  del argv
  shape = dict(batch=8, k=4, new=32)
  assets = common.build_assets(Path(_WORK.value) / "tiny", width=128, layers=2)
  lines, rows = [], []
  for g in _GROUPS.value:
    res, pairs = run_group(g, assets, shape, _ROUNDS.value, _ITERS.value)
    for name, r in res.items():
      s = common.summary(r)
      rows.append((name, s, r))
      print(f"{name}: s/iter median={s['s_per_iter']:.3f} all={[round(t, 3) for t in r['times']]} "
            f"tokens/s={s['tokens_per_s']:.0f} first_step_s={s['first_step_s']:.1f} "
            f"setup_s={r['setup_s']:.1f} peak_rss_mb={s['maxrss_mb']:.0f} threads={r['threads']} "
            f"compiled_programs={r['last'].get('compiled_programs', '-')}\n  settings: {r['settings']}",
            flush=True)
    for o, p in pairs:
      so, sp = common.summary(res[o]), common.summary(res[p])
      tag = f"{o}_vs_{p}"
      lines += [common.line(f"tokens_per_s_{tag}", so["tokens_per_s"], sp["tokens_per_s"], "generated tokens/s"),
                common.line(f"s_per_iter_{tag}", so["s_per_iter"], sp["s_per_iter"], "s, ratio=peer/ours", False),
                common.line(f"first_step_s_{tag}", so["first_step_s"], sp["first_step_s"],
                            "s, ours compiles; ratio=peer/ours", False),
                common.line(f"peak_rss_mb_{tag}", so["maxrss_mb"], sp["maxrss_mb"], "MiB, ratio=peer/ours", False)]
  print(f"shape: {shape} prompt=16 tokens, fp32, threads per side={common.cores()}, "
        f"load average at end={os.getloadavg()[0]:.1f}")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
