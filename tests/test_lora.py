"""LoRA: adapters start as a no-op, zeroing them gives the base model, merging folds them in.

One tiny Llama (GQA, untied head) saved by torch is reloaded fresh wherever
a test mutates the model; forwards share one jitted function, so the base
and the adapted graph each compile once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from rcfd_jax import models, sharding
from rcfd_jax.errors import UserError
from rcfd_jax.models import lora

TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False)
TARGETS = ("q_proj", "v_proj", "down_proj")
IDS = np.random.RandomState(0).randint(1, 100, (2, 8))
MASK = np.ones((2, 8), np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
  return nnx.merge(graphdef, state)(ids, mask)


def forward(model) -> np.ndarray:
  return np.asarray(_forward(*nnx.split(model), IDS, MASK))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp("llama")
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
  return str(path)


@pytest.fixture(scope="module")
def base_logits(ckpt):
  return forward(models.load_pretrained(ckpt))


def adapted(ckpt, *, random_b: bool = False, mesh=None):
  model = lora.apply(models.load_pretrained(ckpt, mesh=mesh), rank=4, alpha=8, targets=TARGETS,
                     rngs=nnx.Rngs(1))
  if random_b:
    key = jax.random.key(2)
    for _, d in lora._denses(model):
      if d.lora_b is not None:
        key, sub = jax.random.split(key)
        d.lora_b[...] = jax.random.normal(sub, d.lora_b[...].shape) * 0.5
  return model


def test_apply_adds_adapters_and_keeps_logits(ckpt, base_logits):
  model = adapted(ckpt)
  block = model.layers  # both layers, stacked [2, ...]
  assert block.q_proj.lora_a[...].shape == (2, 32, 4) and block.q_proj.lora_b[...].shape == (2, 4, 32)
  assert block.v_proj.lora_b[...].shape == (2, 4, 16) and block.down_proj.lora_a[...].shape == (2, 64, 4)
  assert block.k_proj.lora_a is None and model.lm_head.lora_a is None
  assert block.q_proj.lora_scale == 2.0
  assert len(nnx.state(model, nnx.LoRAParam).flat_state()) == 3 * 2
  np.testing.assert_array_equal(forward(model), base_logits)


def test_without_adapters_is_exactly_the_base_model(ckpt, base_logits):
  model = adapted(ckpt, random_b=True)
  logits = forward(model)
  assert np.abs(logits - base_logits).max() > 1e-2
  graphdef, state = nnx.split(model)
  ref = np.asarray(_forward(graphdef, lora.without_adapters(state), IDS, MASK))
  np.testing.assert_array_equal(ref, base_logits)
  # Inside jit too, as the train step uses it for the reference policy.
  in_jit = jax.jit(lambda s: _forward.__wrapped__(graphdef, lora.without_adapters(s), IDS, MASK))(state)
  np.testing.assert_allclose(np.asarray(in_jit), base_logits, atol=1e-6, rtol=0)
  # The state itself is untouched: adapters still apply.
  np.testing.assert_array_equal(forward(model), logits)


def test_merge_folds_adapters_into_kernels(ckpt):
  model = adapted(ckpt, random_b=True)
  merged = lora.merge(model)
  assert not nnx.state(merged, nnx.LoRAParam).flat_state()
  assert model.layers.q_proj.lora_a is not None  # the input model keeps its adapters
  np.testing.assert_allclose(forward(merged), forward(model), atol=1e-5, rtol=0)


def test_save_pretrained_of_adapted_model_loads_merged_in_transformers(ckpt, tmp_path):
  model = adapted(ckpt, random_b=True)
  models.save_pretrained(model, tmp_path / "out")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  with torch.no_grad():
    ref = back(torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
  np.testing.assert_allclose(ref, forward(model), atol=1e-4, rtol=0)


def test_optimizer_over_lora_params_touches_only_adapters(ckpt):
  model = adapted(ckpt)
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
  before = {k: np.asarray(v.get_value()) for k, v in nnx.state(model, nnx.Param).flat_state()}

  @nnx.jit
  def step(model, opt):
    def loss(model):
      logits = model(jnp.asarray(IDS), jnp.asarray(MASK))
      return -jax.nn.log_softmax(logits)[..., 0].mean()
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)

  step(model, opt)
  after = dict(nnx.state(model, nnx.Param).flat_state())
  changed = {k for k, v in after.items() if not np.array_equal(np.asarray(v.get_value()), before[k])}
  lora_keys = {k for k, v in after.items() if isinstance(v, nnx.LoRAParam)}
  assert changed and changed <= lora_keys
  assert any(k[-1] == "lora_b" for k in changed)


def test_adapters_are_born_sharded_on_the_model_mesh(ckpt):
  model = adapted(ckpt, mesh=sharding.make_mesh((2, 2, 2)))
  q = model.layers.q_proj  # stacked [L, ...]: the layer axis is replicated
  assert q.lora_a[...].sharding.spec == P(None, "fsdp", None)
  assert q.lora_b[...].sharding.spec == P(None, "fsdp", "tensor")  # rank over fsdp (sharding.RULES)
  assert sharding.variable_names(q.lora_a) == ("layers", "embed", "lora")
  assert sharding.variable_names(q.lora_b) == ("layers", "lora", "heads")
  merged = lora.merge(model)
  assert merged.layers.q_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")


def test_gpt2_fused_attention_target():
  from rcfd_jax.reproduce import tiny
  model = models.build(tiny.gpt2_config(100, n_embd=32))
  lora.apply(model, rank=2, alpha=2, targets=("c_attn",), rngs=nnx.Rngs(0))
  assert model.h.c_attn.lora_b[...].shape == (model.config.n_layer, 2, 96)
  assert model.h.c_proj.lora_a is None


def test_unknown_target_names_the_available_layers(ckpt):
  model = models.load_pretrained(ckpt)
  with pytest.raises(UserError, match="c_attn.*available: .*down_proj.*q_proj"):
    lora.apply(model, rank=2, alpha=2, targets=("q_proj", "c_attn"), rngs=nnx.Rngs(0))
