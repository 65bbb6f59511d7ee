"""Benchmark worker, TRL side: GRPOTrainer, RLOOTrainer (trl 1.16) or PPOTrainer (trl 1.12), timed per step.

Runs in the benchmark venv (benchmarks/requirements-bench.txt), started by
benchmarks/rl_step.py and benchmarks/scaling.py (protocol in common.py); by hand:

    /work/bench-venv/bin/python benchmarks/rl_trl.py --trainer=grpo --assets=DIR --words=FILE

PPO left trl's main package after 1.12; it runs from trl 1.12.0 installed
with --no-deps into its own directory (see requirements-bench.txt) and put
first on PYTHONPATH by the driver.

Each trainer runs its own train() loop; a callback gates it at every
on_step_end, so the driver decides when the next iterations run, and an
iteration is timed from the end of the previous one (data loading,
generation, reward, loss, backward, optimizer step all included). Settings
shared with our side: same HF model dir and prompts, B prompts x k samples,
exactly N new tokens (min_new_tokens = max_new_tokens; PPO: no stop token),
temperature 1, no top-k/top-p, fp32 on CPU, lr 5e-5, max_grad_norm 1, one
optimizer step per iteration. Everything else stays at the trainer's defaults
except gradient checkpointing, turned off (faster for TRL; we do not
checkpoint either).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402

from benchmarks import common  # noqa: E402


def word_reward(lexicon_file: str):
  """rcfd_jax.rewards.sentiment_words, on the word lists the driver passes (TRL's venv has no JAX)."""
  lex = json.loads(Path(lexicon_file).read_text())
  pos, neg = frozenset(lex["positive"]), frozenset(lex["negative"])

  def score(text: str) -> float:
    words = [w.strip(".,!?;:\"'()").lower() for w in text.split()]
    return float(sum(w in pos for w in words) - sum(w in neg for w in words))

  return score


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--trainer", choices=["grpo", "rloo", "ppo"], required=True)
  ap.add_argument("--assets", required=True)
  ap.add_argument("--words", required=True, help="JSON {positive: [...], negative: [...]}")
  ap.add_argument("--objective", choices=["max", "rcfd"], default="max")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--k", type=int, default=4)
  ap.add_argument("--new", type=int, default=32)
  a = ap.parse_args()

  t0 = time.perf_counter()
  import datasets
  import torch
  import trl
  torch.set_num_threads(common.cores())
  torch.manual_seed(0)
  assets = Path(a.assets)
  tok = transformers.AutoTokenizer.from_pretrained(assets / "model")
  tok.padding_side = "left"
  ds = datasets.load_dataset("json", data_files=str(assets / "data.jsonl"), split="train")
  model = transformers.AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32)
  score = word_reward(a.words)

  def reward(completions, demonstration=None, **kw):
    r = [score(c) for c in completions]
    if a.objective == "rcfd":  # RCfD: -(r(y) - r(y_demo))^2, the demonstration read from its column
      r = [-(x - score(d)) ** 2 for x, d in zip(r, demonstration)]
    return r

  out = tempfile.mkdtemp(prefix="rl_trl_")
  common_args = dict(output_dir=out, use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
                     logging_steps=10**6, disable_tqdm=True, seed=0, learning_rate=5e-5, max_grad_norm=1.0,
                     gradient_checkpointing=False, dataloader_num_workers=0)
  gate = Gate()
  if a.trainer in ("grpo", "rloo"):
    Config, Trainer = (trl.GRPOConfig, trl.GRPOTrainer) if a.trainer == "grpo" else (trl.RLOOConfig, trl.RLOOTrainer)
    args = Config(per_device_train_batch_size=a.batch * a.k, num_generations=a.k, max_completion_length=a.new,
                  temperature=1.0, top_k=0, top_p=1.0, generation_kwargs={"min_new_tokens": a.new},
                  max_steps=10**6, **common_args)
    trainer = Trainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                      callbacks=[gate])
    keys = ("beta", "loss_type", "scale_rewards", "normalize_advantages", "num_iterations", "epsilon",
            "gradient_checkpointing", "per_device_train_batch_size", "num_generations")
    settings = f"trl {trl.__version__} {Trainer.__name__}: " + " ".join(
        f"{k}={getattr(args, k)}" for k in keys if hasattr(args, k))
  else:
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    prompts = ds.map(lambda r: {"input_ids": tok(r["prompt"])["input_ids"]}, remove_columns=ds.column_names)
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(assets / "rm", dtype=torch.float32)
    vm = transformers.AutoModelForSequenceClassification.from_pretrained(assets / "rm", dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32)
    args = PPOConfig(per_device_train_batch_size=a.batch * a.k, num_mini_batches=1, num_ppo_epochs=1,
                     response_length=a.new, stop_token=None, temperature=1.0, total_episodes=10**7,
                     local_rollout_forward_batch_size=a.batch * a.k, num_sample_generations=0, **common_args)
    trainer = PPOTrainer(args=args, processing_class=tok, model=model, ref_model=ref, reward_model=rm,
                         train_dataset=prompts, value_model=vm, callbacks=[gate])
    settings = (f"trl {trl.__version__} PPOTrainer: kl_coef={args.kl_coef} epochs={args.num_ppo_epochs} "
                f"minibatches={args.num_mini_batches} separate value model and reward model (GPT-2 RM in "
                f"assets/rm), batch={args.per_device_train_batch_size} prompts x 1 sample")
  gate.tokens = a.batch * a.k * a.new
  gate.ready = {"setup_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), "settings": settings}
  trainer.train()


class Gate(transformers.TrainerCallback):
  """Times each step and lets the driver decide when the next ones run."""

  def __init__(self):
    self.steps_done = 0
    self.todo = 0
    self.times: list[float] = []
    self.t = None

  def on_train_begin(self, args, state, control, **kw):
    self.t = time.perf_counter()

  def on_step_end(self, args, state, control, **kw):
    now = time.perf_counter()
    self.steps_done += 1
    if self.steps_done == 1:
      self.ready["first_step_s"] = now - self.t
    elif self.steps_done == 2:  # second warm-up step, like ours
      common.send(self.ready)
      self._wait()
    else:
      self.times.append(now - self.t)
      self.todo -= 1
      if self.todo == 0:
        common.send({"times": self.times, "tokens": [self.tokens] * len(self.times), "maxrss_mb": common.maxrss_mb()})
        self._wait()
    self.t = time.perf_counter()
    return control

  def _wait(self):
    line = sys.stdin.readline()
    cmd = json.loads(line) if line else {"cmd": "quit"}
    if cmd["cmd"] == "quit":
      sys.stdout.flush()
      import os
      os._exit(0)
    self.todo, self.times = cmd["iters"], []


if __name__ == "__main__":
  main()
