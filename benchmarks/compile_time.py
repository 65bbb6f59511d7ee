"""Compile time of the first fused RL step, the cost that grows with model depth.

    python benchmarks/compile_time.py --width=512 --layers=8
    python benchmarks/compile_time.py                      # the tiny setup (128 wide, 2 layers)
    python benchmarks/compile_time.py --ppo --width=512 --layers=8

Same setup as benchmarks/rl_step.py (GPT-2 assets of common.build_assets, 8
prompts x 4 samples, 32 new tokens, REINFORCE-LOO with the in-graph word
count, or with --ppo PPO with GAE, a value head and the GPT-2 reward model
in the graph). Times tracing + lowering and XLA compilation of train.compile_steps'
fused program separately, since scanning over layers shrinks both, then the
median of --iters runs of the compiled step, to show the scan costs no speed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

_WIDTH = flags.DEFINE_integer("width", 128, "Model width.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Layers.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed runs of the compiled step.")
_PPO = flags.DEFINE_bool("ppo", False, "rl_step.py's PPO worker (GAE, value head, GPT-2 RM) "
                         "instead of REINFORCE-LOO with the words reward.")


def main(argv):
  del argv

  import jax

  from benchmarks import rl_ours
  from rcfd_jax import bridge

  s, state, steps, batch = rl_ours.fused_setup(_WIDTH.value, _LAYERS.value,
                                               "ppo" if _PPO.value else "reinforce")
  t0 = time.perf_counter()
  lowered = steps.fused.lower(state, s.frozen, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  ca = common.cost_analysis(compiled)
  ts = []
  for i in range(_ITERS.value + 1):  # the first run warms allocators and is not counted
    b = bridge.device_batch(s, s.batcher, s.batcher.indices(i), s.demo_train)
    t = time.perf_counter()
    state, m = compiled(state, s.frozen, b)
    jax.block_until_ready(m)
    ts.append(time.perf_counter() - t)
  name = f"{'ppo' if _PPO.value else 'loo'} w{_WIDTH.value}l{_LAYERS.value}"
  print(f"compile_time {name}: trace+lower {t1 - t0:.1f} s, XLA compile {t2 - t1:.1f} s, "
        f"total {t2 - t0:.1f} s; step {common.median(ts[1:]):.3f} s; "
        f"cost analysis {ca.get('flops', 0) / 1e9:.2f} GFLOP")


if __name__ == "__main__":
  app.run(main)
