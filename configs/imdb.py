"""Use case 2a: positive IMDB reviews with a DistilBERT sentiment reward (paper section 5.2).

    python -m rcfd_jax.main --config=configs/imdb.py --workdir=DIR
    python -m rcfd_jax.main --config=configs/imdb.py --workdir=DIR --config.rl.objective=kl --config.rl.beta=0.3

Prompt = the first 10 tokens of a positive review, demonstration = the rest
cut like the generations (up to 160 tokens, EOS included). Reward = the positive-class logit of a
DistilBERT sentiment classifier; it has its own tokenizer, so the host
re-tokenizes completions for it between rollout and update (bridge_seconds in
metrics.jsonl). Paper, mean reward / Alignment A: demonstrations 2.01;
beta=0: 2.96 / 1.38 (degenerate); beta=0.3: 2.01 / 0.04; RCfD: 1.97 / 0.04.
Policy LLaMA-2-7B with LoRA (rank 32, alpha 64); Adam 5e-5; PPO clip 0.3.
The argument picks the policy: --config=configs/imdb.py:HF_DIR_OR_ID.
"""

from rcfd_jax import config as base


def get_config(arg=None):
  c = base.paper_setup(base.base(), arg or "meta-llama/Llama-2-7b-hf")
  c.total_steps = 1000
  c.data.path = "stanfordnlp/imdb"
  c.data.format = "continuation"
  c.data.text_column = "text"
  c.data.label_column = "label"
  c.data.label_value = "1"
  c.data.prompt_tokens = 10
  c.data.max_prompt_tokens = 11  # the 10 text tokens and Llama's BOS
  c.data.demo_max_tokens = 160  # 159 tokens + EOS: as long as the longest completion
  c.data.validation_size = 500
  c.rollout.prompts_per_step = 400
  c.rollout.max_new_tokens = 160
  c.reward.sources = ("classifier",)
  c.reward.classifier.path = "lvwerra/distilbert-imdb"
  c.reward.classifier.label_index = 1  # POSITIVE
  c.reward.classifier.max_tokens = 512
  c.optim.grad_accum = 50  # effective batch 400 = 8 x 50
  return c
