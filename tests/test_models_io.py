"""Loading model directories: each kind of bad input is one clear UserError.

No test here compiles a model: errors are raised before any computation,
and the sharded-checkpoint test compares the loaded arrays directly.
"""

import json
import time

import numpy as np
import pytest
import torch
import transformers

from rcfd_jax import models
from rcfd_jax.errors import UserError
from rcfd_jax.models import llama

TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def torch_llama():
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


@pytest.fixture()
def good_dir(torch_llama, tmp_path):
  torch_llama.save_pretrained(tmp_path / "m")
  return tmp_path / "m"


def test_missing_directory(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    models.load_pretrained(str(tmp_path / "nowhere"))


def test_missing_config(tmp_path):
  with pytest.raises(UserError, match="no config.json"):
    models.load_pretrained(str(tmp_path))


def test_broken_json(good_dir):
  (good_dir / "config.json").write_text('{"model_type": "llama", ')
  with pytest.raises(UserError, match="not valid JSON"):
    models.load_pretrained(str(good_dir))


def test_unsupported_model_type_lists_supported(good_dir):
  cfg = json.loads((good_dir / "config.json").read_text())
  (good_dir / "config.json").write_text(json.dumps(dict(cfg, model_type="t5")))
  with pytest.raises(UserError, match="unsupported model_type 't5'") as e:
    models.load_pretrained(str(good_dir))
  assert all(t in str(e.value) for t in ("gpt2", "llama", "qwen2", "mistral"))


def test_missing_weights(good_dir):
  (good_dir / "model.safetensors").unlink()
  with pytest.raises(UserError, match="no model.safetensors"):
    models.load_pretrained(str(good_dir))


def test_pickle_only_checkpoint_is_refused(good_dir, torch_llama):
  (good_dir / "model.safetensors").unlink()
  torch.save(torch_llama.state_dict(), good_dir / "pytorch_model.bin")
  with pytest.raises(UserError, match="pickle") as e:
    models.load_pretrained(str(good_dir))
  assert "safetensors" in str(e.value)


def test_shape_that_disagrees_with_config(good_dir):
  cfg = json.loads((good_dir / "config.json").read_text())
  (good_dir / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=48)))
  with pytest.raises(UserError, match="has shape .* but config.json implies"):
    models.load_pretrained(str(good_dir))


def test_missing_tensor(good_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  f = good_dir / "model.safetensors"
  weights = load_file(str(f))
  del weights["model.norm.weight"]
  save_file(weights, str(f), metadata={"format": "pt"})
  with pytest.raises(UserError, match="missing 1 weight tensors .*model.norm.weight"):
    models.load_pretrained(str(good_dir))


def test_unsupported_sliding_window(good_dir):
  cfg = json.loads((good_dir / "config.json").read_text())
  (good_dir / "config.json").write_text(json.dumps(dict(cfg, model_type="mistral", sliding_window=8)))
  with pytest.raises(UserError, match="sliding_window=8 is not supported"):
    models.load_pretrained(str(good_dir))


def test_hub_id_offline_fails_fast():
  start = time.monotonic()
  with pytest.raises(UserError, match="hub") as e:
    models.load_pretrained("no-such-org/no-such-model")
  assert time.monotonic() - start < 10
  assert "local directory" in str(e.value)


def test_sharded_checkpoint_loads(torch_llama, tmp_path):
  torch_llama.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
  model = models.load_pretrained(str(tmp_path))
  state = {k: v.numpy() for k, v in torch_llama.state_dict().items()}
  for t in llama.tensors(model.config, model.task):
    ours = models._at(model, t.path)[...]
    ours = ours if t.layer is None else ours[t.layer]  # transformer layers are stacked [L, ...]
    np.testing.assert_array_equal(np.asarray(ours), t.to_ours(state[t.hf_name]), err_msg=t.hf_name)


def test_sharded_checkpoint_with_a_missing_shard(torch_llama, tmp_path):
  torch_llama.save_pretrained(tmp_path, max_shard_size="20KB")
  sorted(tmp_path.glob("model-*.safetensors"))[-1].unlink()
  with pytest.raises(UserError, match="cannot read"):
    models.load_pretrained(str(tmp_path))
