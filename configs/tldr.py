"""Use case 2b: TL;DR summarization with the OpenAssistant DeBERTa-v3 reward model (paper section 5.2).

    python -m rcfd_jax.main --config=configs/tldr.py --workdir=DIR
    python -m rcfd_jax.main --config=configs/tldr.py --workdir=DIR --config.rl.objective=kl --config.rl.beta=0.12

Reddit TL;DR comparisons filtered to annotator confidence >= 5 (about 22k
prompts); demonstration = the chosen summary; prompt "Summarize: <post>".
The dataset ships a loading script, which datasets >= 4 no longer runs, so it
is read from the hub's parquet conversion (revision refs/convert/parquet).
Reward = the scalar score of OpenAssistant/reward-model-deberta-v3-large-v2,
read as a (question, answer) pair through the host bridge. Paper, R_RM /
length / Alignment A: demonstrations 4.14 / 40.2 / -; beta=0: 5.64 / 95.2 /
0.45; beta*=0.12: 3.92 / 136 / 0.09; RCfD: 4.17 / 138 / 0.04.
Policy Alpaca-7B with LoRA (rank 32, alpha 64, no dropout); Adam 5e-5.
The argument picks the policy: --config=configs/tldr.py:HF_DIR_OR_ID.
"""

from rcfd_jax import config as base


def get_config(arg=None):
  c = base.paper_setup(base.base(), arg or "chavinlo/alpaca-native")
  c.total_steps = 1000
  c.data.path = "openai/summarize_from_feedback"
  c.data.hub_config = "comparisons"
  c.data.format = "tldr"
  c.data.prompt_template = "Summarize: {prompt}"
  c.data.min_confidence = 5
  c.data.max_prompt_tokens = 512
  c.data.demo_max_tokens = 129
  c.data.validation_size = 500
  c.rollout.prompts_per_step = 500
  c.rollout.max_new_tokens = 256
  c.reward.sources = ("classifier",)
  c.reward.classifier.path = "OpenAssistant/reward-model-deberta-v3-large-v2"
  c.reward.classifier.label_index = 0
  c.reward.classifier.input = "pair"
  c.reward.classifier.max_tokens = 1024
  c.rollout.micro_batches = 5  # one chunk of 100 prompts' KV cache at a time (docs/tpu.md)
  c.optim.grad_accum = 25  # effective batch 500 = 20 x 25: micro-batches of 20 split over 4 (or 2) devices
  return c
