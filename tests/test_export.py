"""export: a trained (LoRA) policy written as a HF directory that transformers loads."""

import numpy as np
import pytest
import torch
import transformers

from conftest import load_config
from rcfd_jax import export, train
from rcfd_jax.reproduce import prepare


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  assets = prepare.build(root / "assets", n_reviews=300, width=32)
  c = load_config(f"tiny:{assets}", {
      "total_steps": 2, "reward.sources": ("loglik",), "reward.cache_dir": str(root / "cache"),
      "model.lora.rank": 4, "model.lora.targets": ("c_attn", "c_fc"), "optim.learning_rate": 1e-2,
      "checkpoint.every_steps": 2, "eval.every_steps": 2, "eval.num_prompts": 8,
      "mesh.shape": (1, 1, 1), "mesh.devices": 1})
  train.run(c, str(root / "run"))
  return root / "run"


def test_export_loads_in_transformers_with_the_policy_logits(trained, tmp_path):
  lm, tokenizer, step = export.load_trained(trained)
  assert step == 2
  out = export.export(trained, tmp_path / "hf")
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = np.asarray(tokenizer(["a quiet film about a lighthouse keeper"]).input_ids)
  ours = np.asarray(lm(ids))
  with torch.no_grad():
    theirs = torch_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  # The adapters were trained: the export differs from the untouched base model.
  base = transformers.AutoModelForCausalLM.from_pretrained(trained.parent / "assets" / "policy").eval()
  with torch.no_grad():
    assert np.abs(base(torch.tensor(ids)).logits.numpy() - theirs).max() > 1e-4
  assert transformers.AutoTokenizer.from_pretrained(out)("film").input_ids == tokenizer("film").input_ids


def test_export_of_a_non_workdir_is_one_clear_error(tmp_path):
  with pytest.raises(export.UserError, match="not a training workdir"):
    export.load_trained(tmp_path)
