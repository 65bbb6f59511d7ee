"""One arm of the CPU reproduction (rcfd_jax.reproduce): RL from a tiny SFT policy.

    python -m rcfd_jax.reproduce --workdir=runs/reproduce     # every arm, tables and plots

runs the whole comparison; one arm alone, once the reproduction has built
its assets, SFT policies and reward models under DIR, is

    python -m rcfd_jax.main --config=configs/reproduce.py:sentiment,runs/reproduce \
        --config.rl.objective=kl --config.rl.beta=0.05 --workdir=/tmp/kl05

The argument is "TASK,DIR" with TASK one of
  loglik     reward = mean per-token log-likelihood of the completion under the
             frozen SFT policy (the paper's use case 1); prompts are the first
             8 tokens of any review, the demonstration is the rest.
  sentiment  reward = positive logit of the tiny classifier (configs/rm_tiny.py);
             prompts are the first 8 tokens of positive reviews, the
             demonstration is the rest (the paper's IMDB case); the policy is
             the SFT policy fine-tuned on positive reviews.
on the "plain" corpus regime (DIR/plain: reviews whose opening says little of
what follows), or loglik_voiced and sentiment_voiced, the same on the
"voiced" regime (DIR/voiced: reviews that open with a rating and a title in
the reviewer's voice; docs/reproduce.md). Every objective (max, kl, rcfd,
rcfd_group) shares these settings: the comparison changes rl.objective and
rl.beta only. Results and times are in docs/reproduce.md.
"""

from rcfd_jax import config as base

# task -> (corpus regime, whose assets live in DIR/REGIME; reward)
TASKS = {"loglik": ("plain", "loglik"), "sentiment": ("plain", "sentiment"),
         "loglik_voiced": ("voiced", "loglik"), "sentiment_voiced": ("voiced", "sentiment")}


def get_config(arg=None):
  task, _, workdir = (arg or "sentiment").partition(",")
  workdir = workdir or "runs/reproduce"
  if task not in TASKS:
    raise ValueError(f"task {task!r}; use one of {tuple(TASKS)}")
  regime, reward = TASKS[task]
  root = f"{workdir}/{regime}"
  c = base.base()
  c.seed = 0
  c.total_steps = 200                       # the earliest evaluation where max overshoots both tasks at this lr
  # The SFT policy of configs/sft_tiny.py; for sentiment, fine-tuned on the positive reviews,
  # the task's demonstrations (rcfd_jax.reproduce, stage sft_positive).
  c.policy.path = f"{root}/{'sft_positive' if reward == 'sentiment' else 'sft'}/model"
  c.data.path = f"{root}/assets/reviews.jsonl"
  c.data.format = "continuation"
  c.data.text_column = "text"
  if reward == "sentiment":
    c.data.label_column = "label"
    c.data.label_value = "positive"
  c.data.prompt_tokens = 8                  # prompt = first 8 tokens; the rest of the review is y_d
  c.data.max_prompt_tokens = 8
  c.data.demo_max_tokens = 48               # y_d truncated like the generations (EOS included)
  c.data.validation_size = 512              # sentiment: ~1800 positive reviews, ~1300 left to train on
  c.rollout.prompts_per_step = 16
  c.rollout.samples_per_prompt = 4
  c.rollout.max_new_tokens = 48
  c.reward.cache_dir = f"{root}/cache"      # demonstration rewards, next to the regime's models
  if reward == "sentiment":
    c.reward.sources = ("classifier",)
    c.reward.classifier.path = f"{root}/rm/model"
    c.reward.classifier.label_index = 1     # positive
    c.reward.classifier.max_tokens = 56     # prompt + completion
  else:
    c.reward.sources = ("loglik",)
  c.rl.objective = "rcfd"
  c.rl.algorithm = "reinforce"              # on-policy: PPO with one epoch and one minibatch is the same
  c.rl.baseline = "whiten"                  # the paper's baseline: rewards whitened per batch
  c.rl.beta = 0.0
  c.rl.kl_estimator = "k1"                  # log(pi/pi_0) summed over the sequence, in the reward
  c.optim.learning_rate = 2e-4              # chosen on SFT and max alone (docs/reproduce.md); 1e-4 does not overshoot
  c.log_every_steps = 10
  c.checkpoint.every_steps = 100
  c.checkpoint.keep = 1
  c.eval.every_steps = 50                   # 4 evaluations: the last, and the paper's best-checkpoint pick
  c.eval.num_prompts = 512                  # all: A of two same-distribution samples is ~0.13 at 256, ~0.05 at 512
  c.eval.samples_per_prompt = 2             # k per validation prompt: rcfd_group's own value needs k >= 2
  return c
