"""The tiny sentiment reward model: a GPT-2 classifier fine-tuned from the SFT policy.

    python -m rcfd_jax.reproduce.prepare --out=build/tiny
    python -m rcfd_jax.main --config=configs/sft_tiny.py --workdir=runs/sft_tiny
    python -m rcfd_jax.main --config=configs/rm_tiny.py --workdir=runs/rm_tiny

Expect on 2 CPU cores about 70 seconds (300 updates of 32 reviews; measured
68 s) and, deterministically, validation_accuracy 0.93 (loss 0.20) on 300
held-out reviews in runs/rm_tiny/eval.json. runs/rm_tiny/model/ is a
GPT2ForSequenceClassification whose class 1 is "positive", so RL configs set
reward.classifier.path=runs/rm_tiny/model and label_index=1.

Labels: "negative" -> 0, "positive" -> 1; the ~8% "mixed" reviews
(|score| < 0.35) are dropped rather than mapped, so the classifier learns the
sentiment direction and its positive logit still grades them in between
(mean positive logit -1.6 negative, 0.2 mixed, 1.8 positive; correlation
with the corpus score 0.85), which is the spread RCfD calibrates to.

Why from the SFT policy: like the paper's reward models (DistilBERT, DeBERTa
fine-tuned from pretrained LMs) it starts from a model that already reads
the domain; the trainer copies the trunk and draws a new 2-logit head.
Trained from the random build/tiny/reward_model instead
(--config.model.path=build/tiny/reward_model) it overfits: train batches
reach 1.0 while validation stays at 0.80 (400 steps) to 0.82 (800 steps).
The argument overrides the assets directory (--config=configs/rm_tiny.py:DIR);
--config.model.path=DIR/model picks another SFT run.
"""

from rcfd_jax import supervised


def get_config(arg=None):
  assets = arg or "build/tiny"
  c = supervised.base_config()
  c.stage = "classifier"
  c.model.path = "runs/sft_tiny/model"      # the SFT policy (configs/sft_tiny.py); a causal LM gets a new head
  c.data.path = f"{assets}/reviews.jsonl"
  c.data.text_column = "text"
  c.data.label_column = "label"
  c.data.labels = ("negative", "positive")  # class 1 = positive: RL reads reward.classifier.label_index=1
  c.data.skip_labels = ("mixed",)
  c.total_steps = 300                       # ~3 epochs of 3362 reviews; longer starts to overfit
  c.batch_size = 32
  c.seq_len = 128
  c.data.validation_size = 300
  c.optim.learning_rate = 5e-4              # gentle, to keep the SFT features (2e-3 ends at 0.83)
  c.optim.warmup_steps = 40
  c.optim.weight_decay = 0.1
  c.log_every_steps = 50
  return c
