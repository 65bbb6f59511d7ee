"""Where one fused RL iteration of ours spends its time (tiny setup of rl_step.py).

    python benchmarks/profile_step.py [--width=512 --layers=8]

Prints XLA's cost analysis (flops, bytes accessed) of the fused step and of
its parts compiled alone, the median wall time of each, and how many
programs the fused step compiled after the first call (0 means no
recompilation).
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


def main(argv):
  del argv

  import jax

  from benchmarks import rl_ours
  from rcfd_jax import bridge, sampler
  from rcfd_jax.step import make_rollout

  s, state, steps, batch = rl_ours.fused_setup(_WIDTH.value, _LAYERS.value)
  k, n = s.sc.samples_per_prompt, s.sc.max_new_tokens

  def sample_only(st, fr, b):
    ids, pm = jax.numpy.repeat(b.prompt_ids, k, 0), jax.numpy.repeat(b.prompt_mask, k, 0)
    pol = s.parts.merge(st.params, fr.base)
    return sampler.sample(pol.lm, ids, pm, jax.random.key(0), max_new_tokens=n, temperature=1.0, top_k=0,
                          top_p=1.0, eos_id=-1, pad_id=0).tokens_bn

  parts = {"sample": jax.jit(sample_only), "rollout (sample + ref log-probs + reward)":
           jax.jit(make_rollout(s.parts, s.rewards, s.sc))}
  for name, f in parts.items():
    ca = common.cost_analysis(f.lower(state, s.frozen, batch).compile())
    f(state, s.frozen, batch)
    ts = []
    for _ in range(5):
      t = time.perf_counter()
      jax.block_until_ready(f(state, s.frozen, batch))
      ts.append(time.perf_counter() - t)
    print(f"{name}: {common.median(ts):.3f} s  flops={ca.get('flops', 0) / 1e9:.2f}G "
          f"bytes={ca.get('bytes accessed', 0) / 1e9:.2f}G")
  ca = common.cost_analysis(steps.fused.lower(state, s.frozen, batch).compile())
  ts = []
  for i in range(7):
    b = bridge.device_batch(s, s.batcher, s.batcher.indices(i), s.demo_train)
    t = time.perf_counter()
    state, m = steps.fused(state, s.frozen, b)
    jax.block_until_ready(m)
    ts.append(time.perf_counter() - t)
  print(f"fused step (rollout + update): {common.median(ts[2:]):.3f} s  flops={ca.get('flops', 0) / 1e9:.2f}G "
        f"bytes={ca.get('bytes accessed', 0) / 1e9:.2f}G  first call {ts[0]:.1f} s")
  print(f"compiled programs of the fused step after {len(ts)} calls: {steps.fused._cache_size()}")


if __name__ == "__main__":
  app.run(main)
