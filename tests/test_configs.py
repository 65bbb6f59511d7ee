"""Every experiment config loads, passes the pre-flight checks and documents its command."""

import importlib
from pathlib import Path

import pytest

from conftest import load_config
from rcfd_jax import config as config_lib
from rcfd_jax.errors import UserError

RL_CONFIGS = ["tiny", "wiki_seqll", "imdb", "tldr", "tldr_length"]


@pytest.mark.parametrize("name", RL_CONFIGS)
def test_config_is_valid_and_documented(name):
  c = load_config(name)
  config_lib.check(c)
  # Both count the EOS: no demonstration outgrows the longest completion.
  assert c.data.demo_max_tokens <= c.rollout.max_new_tokens
  assert f"--config=configs/{name}.py" in importlib.import_module(f"configs.{name}").__doc__
  # Locked like the CLI locks it: a misspelt field is refused.
  c.lock()
  with pytest.raises(AttributeError):
    c.rl.betaa = 1.0


def test_paper_hyperparameters():
  imdb = load_config("imdb")
  assert (imdb.rl.clip_eps, imdb.optim.learning_rate, imdb.model.lora.rank, imdb.model.lora.alpha) == (
      0.3, 5e-5, 32, 64.0)
  assert imdb.rollout.max_new_tokens == 160 and imdb.data.prompt_tokens == 10
  assert imdb.rollout.prompts_per_step == 8 * 50
  tldr = load_config("tldr")
  assert tldr.data.min_confidence == 5 and tldr.data.prompt_template == "Summarize: {prompt}"
  assert tldr.rollout.prompts_per_step == 25 * 20
  both = load_config("tldr_length")
  assert tuple(both.reward.sources) == ("classifier", "length")
  wiki = load_config("wiki_seqll")
  assert wiki.data.prompt_tokens == 64 and wiki.rollout.max_new_tokens == 320


@pytest.mark.parametrize("field,value,match", [
    ("rl.objective", "maximum", "objective"),
    ("rl.baseline", "loo", "samples_per_prompt"),
    ("rl.alpha", (1.0, 2.0, 3.0), "alpha"),
    ("optim.grad_accum", 3, "divisible"),
    ("rl.objective", "rcfd_group", "samples_per_prompt >= 2"),
    ("eval.samples_per_prompt", 0, "eval.samples_per_prompt"),
])
def test_inconsistent_configs_are_refused(field, value, match):
  weighted = {"rl.objective": "weighted"} if field == "rl.alpha" else {}
  c = load_config("tiny", {"rollout.samples_per_prompt": 1, "rl.baseline": "whiten", **weighted, field: value})
  with pytest.raises(UserError, match=match):
    config_lib.check(c)


def test_every_config_file_is_tested():
  names = {p.stem for p in Path(__file__).parent.parent.joinpath("configs").glob("*.py")}
  assert set(RL_CONFIGS) <= names


def test_rcfd_group_takes_no_other_baseline():
  c = load_config("tiny", {"rl.objective": "rcfd_group", "rollout.samples_per_prompt": 4})
  for baseline in ("whiten", "none"):
    c.rl.baseline = baseline
    config_lib.check(c)
  for baseline in ("loo", "gae"):
    c.rl.baseline = baseline
    with pytest.raises(UserError, match="whiten or none"):
      config_lib.check(c)
