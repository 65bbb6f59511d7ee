"""Benchmark worker, our side: the trainer's own code path, timed per RL iteration.

Started by benchmarks/rl_step.py and benchmarks/scaling.py (see common.py for
the protocol); by hand:

    python benchmarks/rl_ours.py --assets=DIR --reward=words --objective=max

It builds a config in code (the configs/tiny.py fields, pointed at the
benchmark's assets), then runs exactly what train.run runs per step:
train.build, train.compile_steps, and per iteration either the fused step
(every reward in-graph) or rollout -> host decode + reward -> update. EOS is
disabled (eos_id=-1) so every completion has exactly --new tokens, as
min_new_tokens forces on the TRL side.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

_ASSETS = flags.DEFINE_string("assets", None, "Directory from common.build_assets.", required=True)
_ALGORITHM = flags.DEFINE_enum("algorithm", "reinforce", ["reinforce", "ppo"], "RL algorithm.")
_REWARD = flags.DEFINE_enum("reward", "words", ["words", "function", "classifier"],
                            "words: sentiment word count in-graph; function: the same count in Python via the "
                            "host bridge; classifier: the GPT-2 reward model in assets/rm, in-graph.")
_OBJECTIVE = flags.DEFINE_enum("objective", "max", ["max", "rcfd"], "max r(y) or RCfD -(r(y) - r(y_demo))^2.")
_BATCH = flags.DEFINE_integer("batch", 8, "Prompts per iteration.")
_K = flags.DEFINE_integer("k", 4, "Samples per prompt.")
_NEW = flags.DEFINE_integer("new", 32, "New tokens per completion (exactly).")


def make_config(assets: Path, workdir: Path):
  from rcfd_jax import config as base
  c = base.base()
  c.policy.path = str(assets / "model")
  c.data.path = str(assets / "data.jsonl")
  c.data.format = "columns"
  c.data.max_prompt_tokens = 16
  c.data.demo_max_tokens = _NEW.value  # demonstrations as long as the completions, EOS included
  c.data.validation_size = 16
  c.rollout.prompts_per_step = _BATCH.value
  c.rollout.samples_per_prompt = _K.value
  c.rollout.max_new_tokens = _NEW.value
  c.rollout.temperature = 1.0
  c.reward.cache_dir = str(workdir / "demo_cache")
  c.reward.sources = {"words": ("words:sentiment",), "function": ("function",),
                      "classifier": ("classifier",)}[_REWARD.value]
  c.reward.function.name = "sentiment_words"
  c.reward.classifier.path = str(assets / "rm")
  c.reward.classifier.label_index = 0
  c.rl.objective = _OBJECTIVE.value
  c.rl.algorithm = _ALGORITHM.value
  c.rl.baseline = "gae" if _ALGORITHM.value == "ppo" else "loo"
  c.optim.learning_rate = 5e-5
  return c


def fused_setup(width: int, layers: int, algorithm: str = "reinforce"):
  """(setup, state, steps, first batch) of the rl_step.py iteration, EOS off, for one model size.

  compile_time.py and profile_step.py measure this very program: REINFORCE-LOO
  with the words reward, or with algorithm="ppo" rl_step.py's PPO worker
  (GAE with a value head, the GPT-2 reward model in the graph).
  """
  from rcfd_jax import bridge, train
  assets = common.build_assets(Path("/tmp/rcfd_bench") / f"w{width}l{layers}", width=width, layers=layers)
  extra = ["--algorithm=ppo", "--reward=classifier"] if algorithm == "ppo" else []
  flags.FLAGS(["x", f"--assets={assets}", *extra])
  wd = Path(tempfile.mkdtemp())
  s, state = train.build(make_config(assets, wd), wd)
  s.sc = dataclasses.replace(s.sc, eos_id=-1)
  steps = train.compile_steps(s)
  batch = bridge.device_batch(s, s.batcher, s.batcher.indices(0), s.demo_train)
  return s, state, steps, batch


def main(argv):
  del argv
  import jax
  from rcfd_jax import bridge, config as config_lib, train
  from rcfd_jax.errors import UserError

  t0 = time.perf_counter()
  workdir = Path(tempfile.mkdtemp(prefix="rl_ours_"))
  config = make_config(Path(_ASSETS.value), workdir)
  try:
    config_lib.check(config)
  except UserError:  # a tree where PPO's value head is still chosen by rl.algorithm, not baseline=gae
    config.rl.baseline = "loo"
    config_lib.check(config)
  s, state = train.build(config, workdir)
  s.sc = dataclasses.replace(s.sc, eos_id=-1)  # exactly --new tokens, like min_new_tokens on the peer
  steps = train.compile_steps(s)
  setup_s = time.perf_counter() - t0
  it = [0]

  def step() -> float:
    nonlocal state
    i = it[0]
    it[0] += 1
    batch = bridge.device_batch(s, s.batcher, s.batcher.indices(i), s.demo_train)
    if steps.fused is not None:
      state, m = steps.fused(state, s.frozen, batch)
    else:
      ro = steps.rollout(state, s.frozen, batch)
      hr = bridge.host_rewards(s, ro, s.batcher.indices(i))
      state, m = steps.update(state, s.frozen, ro, hr)
    return float(jax.device_get(m["generated_tokens"]))

  def compiles() -> dict:
    fns = [steps.fused] if steps.fused is not None else [steps.rollout, steps.update]
    return {"compiled_programs": sum(f._cache_size() for f in fns)}

  t = time.perf_counter()
  tokens = step()
  first = time.perf_counter() - t
  assert tokens == _BATCH.value * _K.value * _NEW.value, tokens
  step()  # second warm-up: allocator, caches
  common.serve(step, {"first_step_s": first, "setup_s": setup_s, "fused": steps.fused is not None,
                      "threads": common.cores(), "settings": _settings(config)}, compiles)


def _settings(c) -> str:
  return (f"rcfd_jax {c.rl.algorithm} baseline={c.rl.baseline} objective={c.rl.objective} "
          f"reward={list(c.reward.sources)} lr={c.optim.learning_rate} fp32 full fine-tuning "
          f"(reference log-probs computed every step)")


if __name__ == "__main__":
  app.run(main)
