"""Encoder reward models (BERT, DistilBERT, DeBERTa-v2/v3) against transformers' torch code.

Each case builds a tiny randomly initialised torch model (nothing is
downloaded), perturbs every parameter so LayerNorm scales, biases and the
relative-position table are not at their trivial init values, and saves it
as safetensors. Our loader must reproduce its logits on a right-padded batch,
write a directory transformers loads back without missing keys, and give
the same logits when its parameters are sharded over a (2, 2, 2) mesh.
"""

import numpy as np
import pytest
import torch
import transformers as tf

import jax
import jax.numpy as jnp
from flax import nnx

from rcfd_jax import models, sharding
from rcfd_jax.errors import UserError
from rcfd_jax.models import deberta_v2

VOCAB, T, LENGTHS = 100, 24, (24, 17, 7, 1)
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)

CASES = {
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**TINY, num_labels=3)),
    "distilbert": lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
        sinusoidal_pos_embds=True, id2label={0: "NEGATIVE", 1: "POSITIVE"})),
    # Shaped like OpenAssistant/reward-model-deberta-v3-large-v2: one score, v3 attention.
    # position_buckets=16 (mid 8) puts distances >= 8 of the 24 slots in log buckets.
    "deberta_v3_reward": lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
        **TINY, num_labels=1, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
        max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True,
        position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7, hidden_act="gelu")),
    # The other switches: separate position projections, absolute positions, token types,
    # embed_proj, no buckets (distances clipped at +-12), legacy "c2p|p2c" string.
    "deberta_v2_variant": lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
        **TINY, num_labels=3, relative_attention=True, pos_att_type="c2p|p2c", position_buckets=-1,
        max_relative_positions=12, share_att_key=False, position_biased_input=True, type_vocab_size=2,
        embedding_size=24)),
}


def _batch():
  rng = np.random.RandomState(0)
  mask = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
  ids = rng.randint(1, VOCAB, (len(LENGTHS), T)) * mask  # right padding with pad id 0
  return ids, mask


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _jax_logits(model, ids, mask, mesh=None):
  """One jitted forward, as the trainer runs it (split/merge, not eager ops)."""
  graphdef, state = nnx.split(model)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  if mesh is not None:
    ids = jax.device_put(ids, sharding.batch_sharding(mesh, 2))
    mask = jax.device_put(mask, sharding.batch_sharding(mesh, 2))
  fwd = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m))
  return np.asarray(fwd(state, ids, mask))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  """(name, torch model, its saved directory, inputs, reference logits)."""
  torch.manual_seed(0)
  model = CASES[request.param]().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(str(path))
  ids, mask = _batch()
  return request.param, model, path, ids, mask, _torch_logits(model, ids, mask)


def test_logits_match_transformers(case):
  name, torch_model, path, ids, mask, ref = case
  model = models.load_pretrained(str(path))
  assert model.task == "seq_cls" and model.config.model_type == torch_model.config.model_type
  out = _jax_logits(model, ids, mask)
  assert out.dtype == np.float32 and out.shape == (len(LENGTHS), torch_model.config.num_labels)
  assert np.abs(ref).max() > 1e-2, "reference logits too small for the comparison to mean anything"
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0, err_msg=name)


def test_save_pretrained_loads_in_transformers(case, tmp_path):
  name, torch_model, path, ids, mask, ref = case
  out_dir = models.save_pretrained(models.load_pretrained(str(path)), tmp_path / "export")
  back, info = type(torch_model).from_pretrained(str(out_dir), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
  assert back.config.id2label == torch_model.config.id2label
  np.testing.assert_allclose(_torch_logits(back.eval(), ids, mask), ref, atol=1e-4, rtol=0, err_msg=name)


def test_sharded_on_2x2x2_mesh(case):
  name, _, path, ids, mask, ref = case
  mesh = sharding.make_mesh((2, 2, 2))
  model = models.load_pretrained(str(path), mesh=mesh)
  emb = model.word.embedding[...]
  assert not emb.sharding.is_fully_replicated, emb.sharding  # vocab on tensor, embed on fsdp
  assert len(emb.sharding.device_set) == 8
  np.testing.assert_allclose(_jax_logits(model, ids, mask, mesh), ref, atol=1e-4, rtol=0, err_msg=name)


def test_random_build_round_trips_through_transformers(tmp_path):
  """models.build (parameters born sharded) writes a v3 reward model transformers agrees with."""
  cfg = dict(CASES["deberta_v3_reward"]().config.to_dict(),
             architectures=["DebertaV2ForSequenceClassification"])
  mesh = sharding.make_mesh((2, 2, 2))
  model = models.build(cfg, mesh=mesh, seed=1)
  ids, mask = _batch()
  out = _jax_logits(model, ids, mask, mesh)
  back = tf.DebertaV2ForSequenceClassification.from_pretrained(
      str(models.save_pretrained(model, tmp_path / "m"))).eval()
  np.testing.assert_allclose(out, _torch_logits(back, ids, mask), atol=1e-4, rtol=0)


def test_relative_buckets_match_transformers_at_v3_large_sizes():
  """The real v3 setting (256 buckets, 512 positions) is beyond tiny models: compare the function."""
  from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position
  t = 600
  rel = torch.arange(t)[:, None] - torch.arange(t)[None, :]
  want = make_log_bucket_position(rel, 256, 512).to(torch.long).numpy()
  np.testing.assert_array_equal(deberta_v2.relative_buckets(t, 256, 512), want)


def test_deberta_conv_layer_is_refused():
  cfg = dict(CASES["deberta_v3_reward"]().config.to_dict(), conv_kernel_size=3)
  with pytest.raises(UserError, match="conv_kernel_size"):
    deberta_v2.config_from_hf(cfg)
