"""Use case 1: sequence log-likelihood calibration on Wikipedia (paper section 5.1).

    python -m rcfd_jax.main --config=configs/wiki_seqll.py --workdir=DIR
    python -m rcfd_jax.main --config=configs/wiki_seqll.py --workdir=DIR --config.rl.objective=max

Prompt = the first 64 tokens of a Wikipedia segment, demonstration = its
continuation cut like the generations (at most 320 tokens, EOS included).
Reward = mean per-token log-likelihood of the completion under the frozen
initial model, i.e. the reference log-probs the step computes anyway. The paper reports: max reward drives the policy to
-0.19 nats/token (repetitive text), humans score -1.95, RCfD -1.94.
Policy LLaMA-2-7B with LoRA (rank 32, alpha 64); Adam 5e-5; PPO clip 0.3 with
batch-whitened rewards; effective batch 500 (the paper accumulates 25 x 20; here 20 x 25).
Needs a TPU/GPU slice (see docs in README "Scaling out"). Hub ids can be
replaced by local paths: --config.policy.path=/data/llama2 --config.data.path=/data/wiki.
The argument picks the policy: --config=configs/wiki_seqll.py:HF_DIR_OR_ID.
"""

from rcfd_jax import config as base


def get_config(arg=None):
  c = base.paper_setup(base.base(), arg or "meta-llama/Llama-2-7b-hf")
  c.total_steps = 2000
  c.data.path = "wikimedia/wikipedia"
  c.data.hub_config = "20231101.en"
  c.data.format = "continuation"
  c.data.text_column = "text"
  c.data.prompt_tokens = 64
  c.data.max_prompt_tokens = 65  # the 64 text tokens and Llama's BOS
  c.data.demo_max_tokens = 320  # 319 continuation tokens + EOS: as long as the longest completion
  c.data.max_examples = 100_000
  c.data.validation_size = 1000
  c.rollout.prompts_per_step = 500
  c.rollout.max_new_tokens = 320
  c.reward.sources = ("loglik",)
  c.rollout.micro_batches = 5  # one chunk of 100 prompts' KV cache at a time (docs/tpu.md)
  c.optim.grad_accum = 25  # effective batch 500 = 20 x 25: micro-batches of 20 split over 4 (or 2) devices
  return c
