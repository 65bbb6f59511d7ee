"""policy: what trains under LoRA and full fine-tuning, pi_0, and the completion outputs.

Every check compares against the tiny GPT-2 policy loaded a second time,
untouched (`plain`): its parameters, and its logits and hidden states from a
plain forward pass, sliced in NumPy. One jitted forward per graph, so the
plain LM, the full fine-tuning policy and the LoRA policy compile once each.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config
from rcfd_jax import models, policy, sharding
from rcfd_jax.models import layers as L

B, P, N = 3, 6, 4
RANK = 4


def _build(assets, *, value_head, **overrides):
  c = load_config(f"tiny:{assets}", {"mesh.shape": (1, 1, 1), "mesh.devices": 1, **overrides})
  mesh = sharding.mesh_from_config(c.mesh)
  lm = models.load_pretrained(str(assets / "policy"), task="causal_lm", mesh=mesh)
  return policy.build(lm, c, value_head=value_head, mesh=mesh)


def _flat(state) -> dict[tuple, np.ndarray]:
  return {tuple(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


@functools.partial(jax.jit, static_argnums=(0, 2))
def _completion(graphdef, state, prompt_len, seq, mask):
  return nnx.merge(graphdef, state).completion_outputs(seq, mask, prompt_len)


def completion(module: policy.Policy):
  """(logits [B, N, V], values [B, N] or None) of `module` on SEQ as NumPy arrays."""
  logits, values = _completion(*nnx.split(module), P, SEQ, MASK)
  return np.asarray(logits), None if values is None else np.asarray(values)


def _perturb(state, seed: int, where=lambda top: True):
  """`state` with normal(0, 0.5) noise added to the leaves under the top-level names `where` accepts."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  top = lambda path: str(getattr(path[0], "key", getattr(path[0], "name", path[0])))
  out = [x + 0.5 * jax.random.normal(k, x.shape, x.dtype) if where(top(path)) else x
         for k, (path, x) in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, out)


# Left-padded prompts of 6, 4 and 5 tokens; the last completion ends one token early.
_rng = np.random.RandomState(0)
PROMPT_MASK = np.array([[1] * 6, [0, 0] + [1] * 4, [0] + [1] * 5], bool)
COMPLETION_MASK = np.array([[1] * 4, [1] * 4, [1, 1, 1, 0]], bool)
MASK = jnp.asarray(np.concatenate([PROMPT_MASK, COMPLETION_MASK], 1))
SEQ = jnp.asarray(np.where(MASK, _rng.randint(3, 500, (B, P + N)), 0).astype(np.int32))


@pytest.fixture(scope="module")
def plain(tiny_assets):
  """The policy checkpoint loaded as a bare LM: (lm, Param state by path, logits [B, N, V], hidden [B, N, H])."""
  lm = models.load_pretrained(str(tiny_assets / "policy"), task="causal_lm")

  @jax.jit
  def forward(state):
    return nnx.merge(graphdef, state)(SEQ, MASK, positions=L.positions_from_mask(MASK), return_hidden=True)

  graphdef, state = nnx.split(lm)
  logits, hidden = map(np.asarray, forward(state))
  # Position t predicts token t + 1: the completion's N tokens are predicted from positions P-1 .. P+N-2.
  return lm, _flat(nnx.state(lm, nnx.Param)), logits[:, P - 1:-1], hidden[:, P - 1:-1]


@pytest.fixture(scope="module")
def full(tiny_assets):
  return _build(tiny_assets, value_head=True, **{"model.lora.rank": 0})


@pytest.fixture(scope="module")
def lora(tiny_assets):
  return _build(tiny_assets, value_head=True, **{"model.lora.rank": RANK, "model.lora.targets": ("c_attn",)})


def test_full_fine_tuning_trains_every_weight_and_the_value_head(full, plain):
  parts, ref = full
  _, base, _, _ = plain
  assert not parts.uses_lora and policy.count(parts.frozen) == 0
  trainable = _flat(parts.trainable)
  assert {p[1:] for p in trainable if p[0] == "lm"} == set(base)
  assert {p for p in trainable if p[0] != "lm"} == {("value", "kernel"), ("value", "bias")}
  for path, x in base.items():
    np.testing.assert_array_equal(trainable[("lm",) + path], x, err_msg=str(path))
  h = plain[0].config.n_embd
  assert trainable[("value", "kernel")].shape == (h, 1)
  assert policy.count(parts.trainable) == sum(x.size for x in base.values()) + h + 1
  # pi_0's copy: the same paths and initial values (its own buffers: the next test).
  ref = _flat(ref)
  assert ref.keys() == trainable.keys()
  for path, x in ref.items():
    np.testing.assert_array_equal(x, trainable[path], err_msg=str(path))


def test_the_reference_copy_survives_the_trainable_state_being_donated(tiny_assets, plain):
  """The update donates the trainable state: pi_0 must not share its buffers."""
  parts, ref = _build(tiny_assets, value_head=False, **{"model.lora.rank": 0})
  for x in jax.tree.leaves(parts.trainable):
    x.delete()
  kept = _flat(ref)
  for path, x in plain[1].items():
    np.testing.assert_array_equal(kept[("lm",) + path], x, err_msg=str(path))


def test_lora_trains_only_the_adapters_and_the_value_head(lora, plain):
  parts, ref = lora
  _, base, _, _ = plain
  assert parts.uses_lora and ref is None
  trainable, frozen = _flat(parts.trainable), _flat(parts.frozen)
  adapted = {p[:-1] for p in trainable if p[-1] in ("lora_a", "lora_b")}
  assert adapted == {p[:-1] for p in trainable if p[0] == "lm"} and adapted
  assert all(p[-1] == "c_attn" for p in adapted), adapted
  assert {p for p in trainable if p[0] != "lm"} == {("value", "kernel"), ("value", "bias")}
  # Every base weight is frozen, unchanged.
  assert {p[1:] for p in frozen} == set(base) and all(p[0] == "lm" for p in frozen)
  for path, x in base.items():
    np.testing.assert_array_equal(frozen[("lm",) + path], x, err_msg=str(path))
  # Adapter sizes: r * (in + out) per adapted kernel, each stacked over the layers.
  want = 0
  for path in adapted:
    *lead, din, dout = base[path[1:] + ("kernel",)].shape
    want += int(np.prod(lead)) * RANK * (din + dout)
  h = plain[0].config.n_embd
  assert policy.count(parts.trainable) == want + h + 1
  # lora_b starts at zero: before training the policy is pi_0.
  assert all(not x.any() for p, x in trainable.items() if p[-1] == "lora_b")


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_reference_is_the_initial_policy_after_the_weights_move(kind, request, plain):
  parts, ref = request.getfixturevalue(kind)
  _, _, want, _ = plain
  moved = _perturb(parts.trainable, seed=1)
  policy_logits, _ = completion(parts.merge(moved, parts.frozen))
  assert np.abs(policy_logits - want).max() > 1e-2  # the perturbation reaches the logits
  ref_logits, _ = completion(parts.reference(moved, parts.frozen, ref))
  np.testing.assert_allclose(ref_logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_completion_logits_are_the_lm_logits_at_the_completion_positions(kind, request, plain):
  parts, _ = request.getfixturevalue(kind)
  _, _, want, _ = plain
  logits, values = completion(parts.merge(parts.trainable, parts.frozen))
  assert logits.shape == (B, N, plain[0].config.vocab_size) and logits.dtype == np.float32
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  # The value head starts at zero (its weights are zero-initialised).
  assert values.shape == (B, N) and values.dtype == np.float32 and not values.any()


def test_value_head_reads_the_hidden_states_that_predict_each_completion_token(full, plain):
  parts, _ = full
  _, _, want_logits, hidden = plain
  moved = _perturb(parts.trainable, seed=2, where=lambda top: top == "value")
  logits, values = completion(parts.merge(moved, parts.frozen))
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)  # only the head moved
  w = np.asarray(moved["value"]["kernel"][...])
  b = np.asarray(moved["value"]["bias"][...])
  assert np.abs(w).max() > 0
  np.testing.assert_allclose(values, (hidden @ w)[..., 0] + b[0], rtol=1e-5, atol=1e-5)


def test_without_a_value_head_there_is_none_to_train_or_read(tiny_assets, plain):
  parts, _ = _build(tiny_assets, value_head=False, **{"model.lora.rank": 0})
  assert all(p[0] == "lm" for p in _flat(parts.trainable))
  logits, values = nnx.eval_shape(lambda m: m.completion_outputs(SEQ, MASK, P),
                                  parts.merge(parts.trainable, parts.frozen))
  assert values is None and logits.shape == (B, N, plain[0].config.vocab_size)


def test_hidden_size_is_the_width_of_the_final_hidden_states(plain):
  lm, _, _, hidden = plain
  assert policy.hidden_size(lm) == lm.config.n_embd == hidden.shape[-1]
