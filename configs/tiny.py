"""Tiny end-to-end run on 2 CPU cores, on assets the project builds (no hub).

    python -m rcfd_jax.main --config=configs/tiny.py --workdir=runs/tiny

The first run builds the assets in build/tiny (the same bytes as
`python -m rcfd_jax.reproduce.prepare --out=build/tiny`, about 10 seconds); later runs,
and runs started at the same time, use them.

RCfD on two rewards (a random GPT-2 sentiment classifier sharing the policy's
tokenizer, and the sequence log-likelihood under the initial policy) with a
2-layer width-64 GPT-2 policy. Expect about a minute including compilation;
metrics.jsonl, eval/step_*.json and checkpoints/ appear in the workdir. The
models are random, so the numbers only show that everything runs. The
argument overrides the assets directory, built there too when missing:
--config=configs/tiny.py:DIR.
"""

from rcfd_jax import config as base


def get_config(arg=None):
  assets = arg or "build/tiny"
  c = base.base()
  c.assets_dir = assets
  c.total_steps = 6
  c.policy.path = f"{assets}/policy"
  c.data.path = f"{assets}/reviews.jsonl"
  c.data.format = "continuation"
  c.data.text_column = "text"
  c.data.label_column = "label"
  c.data.label_value = "positive"
  c.data.prompt_tokens = 8
  c.data.demo_max_tokens = 24
  c.data.max_prompt_tokens = 8
  c.data.validation_size = 16
  c.data.max_examples = 256
  c.rollout.prompts_per_step = 8
  c.rollout.samples_per_prompt = 2
  c.rollout.max_new_tokens = 24
  c.reward.sources = ("classifier", "loglik")
  c.reward.classifier.path = f"{assets}/reward_model"
  c.reward.classifier.label_index = 1
  c.reward.classifier.max_tokens = 64
  c.reward.demo_batch_size = 16
  c.rl.objective = "rcfd"
  c.rl.algorithm = "reinforce"
  c.rl.baseline = "loo"
  c.optim.learning_rate = 1e-3
  c.checkpoint.every_steps = 3
  c.eval.every_steps = 3
  c.eval.num_prompts = 16
  return c
