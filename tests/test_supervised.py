"""The supervised stages end to end on a tiny corpus, on the 8-device test mesh.

Short runs check what later stages rely on: the loss falls, the exported
directory loads in transformers with our logits, and bad data fails with a
UserError before anything heavy happens.
"""

import json

import numpy as np
import pytest

from rcfd_jax import supervised
from rcfd_jax.errors import UserError
from rcfd_jax.reproduce import corpus, prepare


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  return prepare.build(tmp_path_factory.mktemp("tiny"), n_reviews=200)


def _config(assets, stage, data_path=None, **over):
  """A small run's config; `over` holds dotted overrides ({"optim.learning_rate": 1e-3})."""
  c = supervised.base_config()
  c.stage = stage
  c.model.path = str(assets / ("policy" if stage == "sft" else "reward_model"))
  c.data.path = str(data_path or assets / "reviews.jsonl")
  c.data.skip_labels = ("mixed",)
  c.batch_size = 16
  c.seq_len = 48
  c.data.validation_size = 32
  c.optim.warmup_steps = 2
  c.log_every_steps = 5
  c.update_from_flattened_dict(over)
  return c


def _metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _logits_match_transformers(model_dir, ours_fn, auto_cls):
  """Loads model_dir in transformers (torch) and compares logits with ours on the same ids."""
  import torch
  from transformers import AutoTokenizer
  from rcfd_jax import models
  tok = AutoTokenizer.from_pretrained(str(model_dir))
  ids = np.asarray([tok("The acting was very dull, but the score is superb.")["input_ids"][:12]] * 2)
  ids[1] = ids[1][::-1]
  theirs = auto_cls.from_pretrained(str(model_dir)).eval()
  with torch.no_grad():
    ref = theirs(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(ours_fn(models.load_pretrained(str(model_dir)), ids))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def sft(assets, tmp_path_factory):
  """A 10-step SFT run, shared: the classifier test starts from its model as rm_tiny does."""
  workdir = tmp_path_factory.mktemp("sft")
  config = _config(assets, "sft", **{"total_steps": 10, "optim.learning_rate": 5e-3})
  return workdir, supervised.run(config, str(workdir))


def test_sft_lowers_loss_and_exports_a_transformers_model(sft):
  from transformers import GPT2LMHeadModel
  workdir, result = sft
  rows = _metrics(workdir)
  assert [r["step"] for r in rows] == [5, 10]
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.25
  assert rows[-1]["tokens_per_second"] > 0
  assert json.loads((workdir / "eval.json").read_text()) == pytest.approx(result)
  assert result["validation_loss"] < np.log(512)  # below a uniform guess
  _logits_match_transformers(workdir / "model", lambda m, ids: m(ids), GPT2LMHeadModel)


def test_classifier_from_the_sft_model_beats_chance_and_exports(assets, sft, tmp_path):
  from transformers import GPT2ForSequenceClassification
  # An easy split: strings of strongly positive or strongly negative adjectives.
  rng = np.random.default_rng(0)
  words = {"positive": corpus.ADJECTIVES[3] + corpus.ADJECTIVES[2],
           "negative": corpus.ADJECTIVES[-3] + corpus.ADJECTIVES[-2]}
  easy = tmp_path / "easy.jsonl"
  with easy.open("w") as f:
    for i in range(256):
      label = ("negative", "positive")[i % 2]
      text = " ".join(rng.choice(words[label], 4)).capitalize() + "."
      f.write(json.dumps({"text": text, "label": label}) + "\n")
  config = _config(assets, "classifier", easy, **{"total_steps": 30, "optim.learning_rate": 3e-3, "seq_len": 16,
                                                   "model.path": str(sft[0] / "model")})
  result = supervised.run(config, str(tmp_path / "run"))
  assert result["validation_accuracy"] >= 0.75, result
  labels = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["id2label"]
  assert labels == {"0": "negative", "1": "positive"}
  _logits_match_transformers(tmp_path / "run" / "model", lambda m, ids: m(ids), GPT2ForSequenceClassification)


def test_data_order_is_a_function_of_the_seed():
  a, b = supervised.Order(10, 4, seed=3), supervised.Order(10, 4, seed=3)
  steps = [a.indices(s) for s in range(5)]
  assert all((x == b.indices(s)).all() for s, x in enumerate(steps))
  assert sorted(np.concatenate(steps)[:10].tolist()) == list(range(10))  # each example once per epoch
  assert not (supervised.Order(10, 4, seed=4).indices(0) == steps[0]).all()


@pytest.mark.parametrize("stage, lines, message", [
    ("classifier", [{"text": "fine", "label": "positive"}, {"text": "meh"}], "has no field 'label'"),
    ("sft", [{"body": "fine"}], "has no field 'text'"),
    ("classifier", [{"text": "fine", "label": "great"}], "label 'great'"),
    ("classifier", [{"text": "fine", "label": "mixed"}], "no usable examples"),
    ("sft", [], "holds no examples"),
    ("sft", ["not json"], "not valid JSON"),
])
def test_bad_data_raises_one_clear_user_error(assets, tmp_path, stage, lines, message):
  path = tmp_path / "bad.jsonl"
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
  with pytest.raises(UserError, match=message):
    supervised.run(_config(assets, stage, path, total_steps=1), str(tmp_path / "run"))


def test_bad_config_raises_user_error(assets, tmp_path):
  with pytest.raises(UserError, match="config.stage"):
    supervised.run(_config(assets, "rlhf"), str(tmp_path))
  three = tmp_path / "three.jsonl"
  three.write_text("".join(json.dumps({"text": "x", "label": l}) + "\n" for l in "abc"))
  with pytest.raises(UserError, match="2 class logits but config.data.labels has 3"):
    supervised.run(_config(assets, "classifier", three, **{"data.labels": ("a", "b", "c")}), str(tmp_path))
  with pytest.raises(UserError, match="does not exist"):
    supervised.run(_config(assets, "sft", tmp_path / "missing.jsonl"), str(tmp_path))


def test_command_line_reports_a_misspelt_override_in_one_line(tmp_path):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-m", "rcfd_jax.main", "--config=configs/sft_tiny.py",
                        f"--workdir={tmp_path}", "--config.data.lables=1"],
                       cwd=root, capture_output=True, text=True, timeout=60)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == 'error: bad flags: lables Did you mean "labels" instead of "lables"?'
