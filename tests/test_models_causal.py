"""Parity of the causal-LM and classifier families with transformers (torch as the oracle).

Every model is a tiny random torch model built here, saved with
save_pretrained and loaded through models.load_pretrained, so the whole
checkpoint path is under test. Each case compiles its forward once
(module-scoped fixtures) to keep the suite fast on two shared cores.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from rcfd_jax import models, sharding
from rcfd_jax.models import llama

VOCAB, B, T, PREFILL = 100, 3, 10, 4
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64, attn_implementation="eager")
LLAMA3 = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=16)

# name -> (config class, kwargs). Between them the cases cover GQA, tied and untied heads,
# llama3 and linear rope scaling, Llama's attention/mlp biases and Qwen2's q/k/v biases.
CASES = {
    "gpt2": (transformers.GPT2Config, dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                           n_head=4, attn_implementation="eager")),
    "llama_gqa": (transformers.LlamaConfig, dict(SMALL, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama3_rope": (transformers.LlamaConfig, dict(SMALL, rope_parameters=LLAMA3, tie_word_embeddings=True,
                                                   attention_bias=True, mlp_bias=True)),
    "qwen2": (transformers.Qwen2Config, dict(SMALL, num_key_value_heads=2)),
    "mistral": (transformers.MistralConfig, dict(
        SMALL, num_key_value_heads=1, sliding_window=None,
        rope_parameters=dict(rope_type="linear", rope_theta=1000.0, factor=2.0))),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Non-trivial weights everywhere: norms near 1, biases and matrices random."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      is_norm = p.ndim == 1 and ("norm" in name or ".ln_" in name or name.startswith("ln_"))
      p.copy_(1.0 + 0.1 * noise if is_norm and name.endswith("weight") else 0.1 * noise)
  return model.eval()


def batch(pad_side: str = "left"):
  """ids [B, T] (never the pad id 0 on real tokens), mask with rows of 0, 3 and 6 pads."""
  ids = np.random.RandomState(1).randint(1, VOCAB, (B, T))
  mask = np.ones((B, T), np.int32)
  for row, pads in ((1, 3), (2, 6)):
    if pad_side == "left":
      mask[row, :pads] = 0
    else:
      mask[row, T - pads:] = 0
  ids = np.where(mask == 1, ids, 0)
  return ids, mask


def positions(mask):
  return np.maximum(np.cumsum(mask, -1) - 1, 0)


def torch_logits(model, ids, mask):
  with torch.no_grad():
    out = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions(mask)))
  return out.logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
  return nnx.merge(graphdef, state)(ids, mask)


def forward(model, ids, mask) -> np.ndarray:
  return np.asarray(_forward(*nnx.split(model), jnp.asarray(ids), jnp.asarray(mask)))


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, ids, pos, cache, key_valid, index):
  return nnx.merge(graphdef, state).decode(ids, pos, cache, key_valid, index)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  """(name, torch model, checkpoint dir, our model, our logits on the left-padded batch)."""
  cls, kwargs = CASES[request.param]
  tm = randomize(transformers.AutoModelForCausalLM.from_config(cls(**kwargs)))
  path = tmp_path_factory.mktemp(request.param)
  tm.save_pretrained(path)
  ours = models.load_pretrained(str(path))
  ids, mask = batch()
  return request.param, tm, path, ours, forward(ours, ids, mask)


def test_logits_match_transformers_on_left_padded_batch(case):
  _, tm, _, _, logits = case
  ids, mask = batch()
  real = mask.astype(bool)
  np.testing.assert_allclose(logits[real], torch_logits(tm, ids, mask)[real], atol=1e-4, rtol=0)


def test_decode_with_cache_matches_full_forward(case):
  _, _, _, ours, logits = case
  ids, mask = batch()
  pos, key_valid = positions(mask), jnp.asarray(mask, bool)
  graphdef, state = nnx.split(ours)
  cache = ours.init_cache(B, T)
  step, cache = _decode(graphdef, state, ids[:, :PREFILL], pos[:, :PREFILL], cache, key_valid, 0)
  got = [np.asarray(step)]
  for t in range(PREFILL, T):
    step, cache = _decode(graphdef, state, ids[:, t:t + 1], pos[:, t:t + 1], cache, key_valid, t)
    got.append(np.asarray(step))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.concatenate(got, 1)[real], logits[real], atol=1e-5, rtol=0)


def test_save_pretrained_loads_in_transformers(case, tmp_path):
  _, _, _, ours, logits = case
  models.save_pretrained(ours, tmp_path / "out")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
  ids, mask = batch()
  real = mask.astype(bool)
  np.testing.assert_allclose(torch_logits(back.eval(), ids, mask)[real], logits[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_same_logits_on_a_2x2x2_mesh(name, tmp_path):
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
  cls, kwargs = CASES[name]
  tm = randomize(transformers.AutoModelForCausalLM.from_config(cls(**kwargs)))
  tm.save_pretrained(tmp_path)
  ids, mask = batch()
  single = forward(models.load_pretrained(str(tmp_path)), ids, mask)
  sharded = models.load_pretrained(str(tmp_path), mesh=sharding.make_mesh((2, 2, 2)))
  kernel = sharded.h.c_fc.kernel if name == "gpt2" else sharded.layers.q_proj.kernel  # stacked [L, ...]
  assert kernel[...].sharding.spec == P(None, "fsdp", "tensor")
  assert len(kernel[...].addressable_shards) == 8 and not kernel[...].sharding.is_fully_replicated
  real = mask.astype(bool)
  np.testing.assert_allclose(forward(sharded, ids, mask)[real], single[real], atol=1e-5, rtol=0)


def test_bfloat16_params_run_close_to_float32(tmp_path):
  cls, kwargs = CASES["llama_gqa"]
  tm = randomize(transformers.AutoModelForCausalLM.from_config(cls(**kwargs)))
  tm.save_pretrained(tmp_path)
  ids, mask = batch()
  ref = forward(models.load_pretrained(str(tmp_path)), ids, mask)
  model = models.load_pretrained(str(tmp_path), dtype=jnp.bfloat16)
  assert model.layers.q_proj.kernel[...].dtype == jnp.bfloat16
  got = forward(model, ids, mask)
  assert got.dtype == np.float32
  real = mask.astype(bool)
  assert np.abs(got[real] - ref[real]).max() < 0.05 * np.abs(ref[real]).max()


@pytest.mark.parametrize("cls,kwargs", [
    (transformers.GPT2Config, dict(CASES["gpt2"][1])),
    (transformers.LlamaConfig, dict(CASES["llama_gqa"][1])),
], ids=["gpt2", "llama"])
def test_sequence_classifier_matches_transformers(cls, kwargs, tmp_path):
  config = cls(**kwargs, num_labels=3, pad_token_id=0)
  tm = randomize(transformers.AutoModelForSequenceClassification.from_config(config))
  tm.save_pretrained(tmp_path)
  ours = models.load_pretrained(str(tmp_path))
  assert ours.task == "seq_cls"
  ids, mask = batch("right")
  with torch.no_grad():
    ref = tm(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got = forward(ours, ids, mask)
  assert got.shape == (B, 3)
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  models.save_pretrained(ours, tmp_path / "out")
  back = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / "out", attn_implementation="eager").eval()
  with torch.no_grad():
    again = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(again, ref, atol=1e-4, rtol=0)


def test_old_rope_scaling_keys_read_like_rope_parameters():
  base = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
  new = llama.config_from_hf(dict(base, rope_parameters=dict(LLAMA3, rope_theta=500000.0)))
  old_scaling = {k: v for k, v in LLAMA3.items() if k not in ("rope_type", "rope_theta")}
  old = llama.config_from_hf(dict(base, rope_theta=500000.0, rope_scaling=dict(old_scaling, type="llama3")))
  assert new == old and new.rope_type == "llama3" and new.rope_theta == 500000.0
  assert llama.config_from_hf(base).rope_type == "default"


def test_unsupported_rope_and_sliding_window_are_refused():
  from rcfd_jax.errors import UserError
  base = dict(model_type="mistral", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
  with pytest.raises(UserError, match="sliding_window"):
    llama.config_from_hf(dict(base, sliding_window=16))
  llama.config_from_hf(dict(base, sliding_window=64))  # can never bind: full attention
  llama.config_from_hf(dict(base, model_type="qwen2", sliding_window=16, use_sliding_window=False))
  with pytest.raises(UserError, match="yarn"):
    llama.config_from_hf(dict(base, rope_parameters=dict(rope_type="yarn", factor=2.0)))


def _nll(state, graphdef, ids, mask):
  """Mean next-token negative log-likelihood over real tokens."""
  logp = jax.nn.log_softmax(nnx.merge(graphdef, state)(ids, mask)[:, :-1])
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
  real = mask[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * real) / jnp.sum(real)


_nll_grad = jax.jit(jax.grad(_nll), static_argnums=1)


def test_remat_leaves_gradients_unchanged(case):
  _, _, path, _, _ = case
  ids, mask = (jnp.asarray(a) for a in batch())
  model = models.load_pretrained(str(path))
  graphdef, state = nnx.split(model)
  plain = _nll_grad(state, graphdef, ids, mask)
  model.remat = True
  graphdef_remat, state = nnx.split(model)
  assert graphdef_remat != graphdef  # the flag is static: a separate program
  remat = _nll_grad(state, graphdef_remat, ids, mask)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_remat_cuts_the_backward_pass_temporaries():
  """XLA's buffer assignment for the gradient: without remat it keeps every layer's activations."""
  cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=64, n_layer=8, n_head=4).to_dict()
  model = models.build(cfg)
  ids = jnp.ones((8, 256), jnp.int32)
  mask = jnp.ones((8, 256), jnp.int32)
  temps = {}
  for remat in (False, True):
    model.remat = remat
    graphdef, state = nnx.split(model)
    compiled = jax.jit(jax.grad(_nll), static_argnums=1).lower(state, graphdef, ids, mask).compile()
    temps[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert temps[True] < 0.6 * temps[False], temps
