"""Every experiment config loads, passes the pre-flight checks and documents its command."""

import importlib
import shutil
from pathlib import Path

import pytest

from conftest import load_config
from rcfd_jax import config as config_lib
from rcfd_jax.errors import UserError

RL_CONFIGS = ["tiny", "wiki_seqll", "imdb", "tldr", "tldr_length"]
REPO = Path(__file__).resolve().parent.parent
NAMES = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


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
    ("rl.objective", "rcfd_tilt", "samples_per_prompt >= 2"),
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


@pytest.mark.parametrize("objective", ["rcfd_group", "rcfd_tilt"])
def test_group_objectives_take_no_other_baseline(objective):
  c = load_config("tiny", {"rl.objective": objective, "rollout.samples_per_prompt": 4,
                           "reward.sources": ("loglik",)})
  for baseline in ("whiten", "none"):
    c.rl.baseline = baseline
    config_lib.check(c)
  for baseline in ("loo", "gae"):
    c.rl.baseline = baseline
    with pytest.raises(UserError, match="whiten or none"):
      config_lib.check(c)


def test_rcfd_tilt_takes_one_reward_and_the_untempered_policy():
  c = load_config("tiny", {"rl.objective": "rcfd_tilt", "rollout.samples_per_prompt": 4, "rl.baseline": "whiten"})
  with pytest.raises(UserError, match="calibrates one reward"):
    config_lib.check(c)
  c.reward.sources = ("loglik",)
  config_lib.check(c)
  for field, value in (("temperature", 0.7), ("top_k", 5), ("top_p", 0.9)):
    changed = load_config("tiny", {"rl.objective": "rcfd_tilt", "rollout.samples_per_prompt": 4,
                                   "rl.baseline": "whiten", "reward.sources": ("loglik",), f"rollout.{field}": value})
    with pytest.raises(UserError, match="temperature=1.0, top_k=0 and top_p=1.0"):
      config_lib.check(changed)


def test_rcfd_tilt_from_reference_takes_no_baseline_and_no_ppo():
  good = {"rl.objective": "rcfd_tilt", "rollout.samples_per_prompt": 4, "rl.baseline": "none",
          "reward.sources": ("loglik",), "rl.tilt_proposal": "reference"}
  config_lib.check(load_config("tiny", good))
  for field, value in (("rl.baseline", "whiten"), ("rl.algorithm", "ppo"), ("rl.objective", "rcfd_group")):
    with pytest.raises(UserError, match="tilt_proposal=reference trains rcfd_tilt on pi_0's samples"):
      config_lib.check(load_config("tiny", {**good, field: value}))
  with pytest.raises(UserError, match="tilt_proposal='pi0'; use one of"):
    config_lib.check(load_config("tiny", {**good, "rl.tilt_proposal": "pi0"}))


def test_demo_reward_controller_needs_the_adaptive_kl_objective():
  c = load_config("tiny", {"rl.objective": "kl", "rl.beta": 0.1, "rl.adaptive_kl": True,
                           "rl.adaptive_kl_signal": "demo_reward"})
  config_lib.check(c)
  for field, value in [("rl.adaptive_kl", False), ("rl.beta", 0.0)]:
    bad = load_config("tiny", {"rl.objective": "kl", "rl.beta": 0.1, "rl.adaptive_kl": True,
                               "rl.adaptive_kl_signal": "demo_reward", field: value})
    with pytest.raises(UserError, match="objective=kl, config.rl.adaptive_kl=True"):
      config_lib.check(bad)
  c.rl.adaptive_kl_signal = "reward"
  with pytest.raises(UserError, match="use kl|demo_reward"):
    config_lib.check(c)


def test_a_kl_coefficient_is_refused_where_the_objective_has_no_kl_penalty():
  """rl.beta and rl.adaptive_kl are read by objective kl alone: elsewhere the run would lack the anchor it shows."""
  config_lib.check(load_config("tiny", {"rl.objective": "kl", "rl.beta": 0.1}))
  config_lib.check(load_config("tiny", {"rl.objective": "kl", "rl.beta": 0.1, "rl.adaptive_kl": True}))
  for objective in ("max", "rcfd", "rcfd_group"):
    for extra, named in (({"rl.beta": 0.1}, r"config.rl.beta=0.1 sets"),
                         ({"rl.adaptive_kl": True}, r"config.rl.adaptive_kl=True sets"),
                         ({"rl.adaptive_kl": True, "rl.adaptive_kl_signal": "demo_reward"},
                          r"config.rl.adaptive_kl=True sets"),
                         ({"rl.beta": 0.1, "rl.adaptive_kl": True}, r"config.rl.beta=0.1 and config.rl.adaptive_kl=True set")):
      with pytest.raises(UserError, match=f"^{named} the KL penalty of objective kl, and objective {objective!r} "
                                          "has none: set config.rl.objective=kl"):
        config_lib.check(load_config("tiny", {"rl.objective": objective, **extra}))
  with pytest.raises(UserError, match="config.rl.beta=-0.1 is negative"):
    config_lib.check(load_config("tiny", {"rl.objective": "kl", "rl.beta": -0.1}))


def test_experiment_file_finds_every_config_by_name():
  assert {"reproduce", "sft_tiny", "rm_tiny", *RL_CONFIGS} <= set(NAMES)
  for name in NAMES:
    assert config_lib.experiment_file(name) == REPO / "configs" / f"{name}.py"
  with pytest.raises(UserError, match="no config 'tldr_lenght' in .*; there are imdb, "):
    config_lib.experiment_file("tldr_lenght")


def test_installed_configs_are_found_inside_the_package_and_load_their_neighbours(tmp_path, monkeypatch):
  """pip install puts configs/*.py in rcfd_jax/configs; tldr_length loads the tldr.py beside it, not the checkout's."""
  tomllib = pytest.importorskip("tomllib")
  setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
  assert setuptools["package-dir"] == {"rcfd_jax.configs": "configs"}
  packages = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "rcfd_jax").rglob("__init__.py")}
  assert set(setuptools["packages"]) == packages | {"rcfd_jax.configs"}  # every sub-package installs
  package = tmp_path / "site-packages" / "rcfd_jax"
  shutil.copytree(REPO / "configs", package / "configs")
  monkeypatch.setattr(config_lib, "__file__", str(package / "config.py"))
  assert config_lib.experiment_dir() == package.resolve() / "configs"
  for name in NAMES:
    assert config_lib.experiment_file(name) == package.resolve() / "configs" / f"{name}.py"
  both = config_lib.load_file(config_lib.experiment_file("tldr_length"))
  assert Path(both.tldr.__file__) == package.resolve() / "configs" / "tldr.py"
  assert tuple(both.get_config().reward.sources) == ("classifier", "length")
