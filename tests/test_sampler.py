"""Sampler: greedy parity with transformers' generate, log-probs, EOS, compile counts, sharding, CLI.

Tiny random models keep every compile under a few seconds; one Sampler per
shape is shared by a module so each test reuses the same executable.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rcfd_jax import models, sampler, sharding
from rcfd_jax.reproduce import tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, PAD, EOS, N = 97, 0, 1, 32
PROMPTS = [[5, 17, 33, 2, 8, 61, 40], [9, 4], [70, 12, 12, 3, 50], [44]]
REPO = Path(__file__).resolve().parents[1]


def _hf_greedy(hf_model, ids, mask, n):
  """transformers' greedy completion tokens [B, <=n] for a left-padded batch."""
  with torch.no_grad():
    out = hf_model.generate(
        input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
        max_new_tokens=n, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
  return out[:, ids.shape[1]:].numpy()


def _expected_after_eos(tokens_bn, eos):
  """What a run with `eos` must give, derived from a run that never stops."""
  tokens = tokens_bn.copy()
  lengths = np.full(len(tokens), tokens.shape[1])
  for b, row in enumerate(tokens):
    hits = np.flatnonzero(row == eos)
    if hits.size:
      lengths[b] = hits[0] + 1
      tokens[b, hits[0] + 1:] = PAD
  return tokens, lengths


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
  """(torch model, our model, model dir). A wide init makes logits peaky, so argmax has no near-ties."""
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
                                initializer_range=0.3)
  hf_model = transformers.GPT2LMHeadModel(cfg).eval()
  path = tmp_path_factory.mktemp("gpt2")
  hf_model.save_pretrained(path)
  return hf_model, models.load_pretrained(str(path)), path


@pytest.fixture(scope="module")
def prompts():
  return sampler.pad_prompts(PROMPTS, PAD)


@pytest.fixture(scope="module")
def gpt2_sampler(gpt2):
  return sampler.Sampler(gpt2[1])


@pytest.fixture(scope="module")
def greedy(gpt2_sampler, prompts):
  """Greedy tokens with EOS disabled, the reference for several tests."""
  return gpt2_sampler(*prompts, 0, max_new_tokens=N, temperature=0.0, eos_id=-1, pad_id=PAD)


def test_greedy_matches_transformers_gpt2(gpt2, gpt2_sampler, prompts):
  hf_model = gpt2[0]
  ids, mask = prompts
  out = gpt2_sampler(ids, mask, 0, max_new_tokens=N, temperature=0.0, eos_id=EOS, pad_id=PAD)
  want = _hf_greedy(hf_model, ids, mask, N)
  got = np.asarray(out.tokens_bn)
  np.testing.assert_array_equal(got[:, :want.shape[1]], want)
  assert (got[:, want.shape[1]:] == PAD).all()


def test_logprobs_equal_full_forward(gpt2, gpt2_sampler, prompts):
  ids, mask = prompts
  out = gpt2_sampler(ids, mask, 3, max_new_tokens=N, temperature=1.0, top_k=20, top_p=0.9,
                     eos_id=EOS, pad_id=PAD)
  seq = jnp.concatenate([jnp.asarray(ids), out.tokens_bn], axis=1)
  seq_mask = jnp.concatenate([jnp.asarray(mask), out.mask_bn], axis=1)
  logits = jax.jit(lambda m, s, k: m(s, k))(gpt2[1], seq, seq_mask)
  p = ids.shape[1]
  logp = jax.nn.log_softmax(logits[:, p - 1:-1], axis=-1)
  want = jnp.take_along_axis(logp, out.tokens_bn[..., None], axis=-1)[..., 0]
  m = np.asarray(out.mask_bn)
  np.testing.assert_allclose(np.asarray(out.logprobs_bn)[m], np.asarray(want)[m], atol=1e-4)
  assert (np.asarray(out.logprobs_bn)[~m] == 0).all()


def test_value_fn_reads_the_hidden_states_of_a_full_forward(gpt2, prompts):
  """PPO's values from the sampling pass equal a value head on a forward of the finished sequences."""
  model = gpt2[1]
  ids, mask = jnp.asarray(prompts[0]), jnp.asarray(prompts[1])
  w = jnp.asarray(np.random.default_rng(0).normal(size=(model.config.n_embd,)), jnp.float32)
  def run(eos, value_fn=None):
    return jax.jit(lambda ids, mask, eos: sampler.sample(
        model, ids, mask, jax.random.key(5), max_new_tokens=N, eos_id=eos, pad_id=PAD,
        value_fn=value_fn))(ids, mask, eos)

  eos = int(run(-1).tokens_bn[0, N // 2])  # a token the first row samples half-way: rows end apart
  out, plain = run(eos, lambda h: h @ w), run(eos)
  assert plain.values_bn is None
  np.testing.assert_array_equal(np.asarray(out.tokens_bn), np.asarray(plain.tokens_bn))
  seq = jnp.concatenate([ids, out.tokens_bn], axis=1)
  seq_mask = jnp.concatenate([mask, out.mask_bn], axis=1)
  _, hidden = jax.jit(lambda s, m: model(s, m, return_hidden=True))(seq, seq_mask)
  p = ids.shape[1]
  want = np.asarray(hidden[:, p - 1:-1] @ w)
  m = np.asarray(out.mask_bn)
  assert 0 < m.sum() < m.size, "the batch should mix finished and running rows"
  assert np.abs(want[m]).max() > 0.1
  np.testing.assert_allclose(np.asarray(out.values_bn)[m], want[m], atol=1e-4)
  assert (np.asarray(out.values_bn)[~m] == 0).all()


def test_eos_stops_rows_and_pads(gpt2_sampler, prompts, greedy):
  ref = np.asarray(greedy.tokens_bn)
  assert greedy.mask_bn.all() and (np.asarray(greedy.lengths_b) == N).all()
  eos = int(ref[0, 3])
  out = gpt2_sampler(*prompts, 0, max_new_tokens=N, temperature=0.0, eos_id=eos, pad_id=PAD)
  want_tokens, want_len = _expected_after_eos(ref, eos)
  assert want_len[0] <= 4
  np.testing.assert_array_equal(np.asarray(out.tokens_bn), want_tokens)
  np.testing.assert_array_equal(np.asarray(out.lengths_b), want_len)
  np.testing.assert_array_equal(np.asarray(out.mask_bn), np.arange(N)[None] < want_len[:, None])
  assert (np.asarray(out.logprobs_bn)[~np.asarray(out.mask_bn)] == 0).all()


def test_knobs_do_not_recompile_and_truncation_limits(gpt2_sampler, prompts, greedy):
  before = (gpt2_sampler.traces, len(gpt2_sampler.compiled))
  run = lambda **kw: gpt2_sampler(*prompts, 7, max_new_tokens=N, eos_id=-1, pad_id=PAD, **kw)
  top1 = run(temperature=1.0, top_k=1)
  nucleus = run(temperature=0.7, top_p=1e-6)
  a, b = run(temperature=1.3, top_k=5, top_p=0.8), run(temperature=1.3, top_k=5, top_p=0.8)
  c = gpt2_sampler(*prompts, 8, max_new_tokens=N, temperature=1.3, top_k=5, top_p=0.8, eos_id=-1)
  assert (gpt2_sampler.traces, len(gpt2_sampler.compiled)) == before
  np.testing.assert_array_equal(top1.tokens_bn, greedy.tokens_bn)
  np.testing.assert_array_equal(nucleus.tokens_bn, greedy.tokens_bn)
  np.testing.assert_array_equal(a.tokens_bn, b.tokens_bn)
  assert (np.asarray(a.tokens_bn) != np.asarray(c.tokens_bn)).any()


def test_sample_inside_user_jit_traces_once(gpt2, prompts):
  """The RL step's way: sample() in its own jit with traced knobs."""
  traces = []

  @jax.jit
  def step(model, ids, mask, key, temperature, top_k, top_p):
    traces.append(1)
    return sampler.sample(model, ids, mask, key, max_new_tokens=4, temperature=temperature,
                          top_k=top_k, top_p=top_p, eos_id=EOS, pad_id=PAD)

  for t, k, p in ((1.0, 0, 1.0), (0.5, 3, 0.9), (0.0, 0, 1.0)):
    step(gpt2[1], *prompts, jax.random.key(0), jnp.float32(t), jnp.int32(k), jnp.float32(p))
  assert len(traces) == 1


def test_first_token_distribution(gpt2):
  """Empirical first-token frequencies over many rows match the (filtered) softmax."""
  model, rows = gpt2[1], 4096
  ids, mask = sampler.pad_prompts([PROMPTS[0]] * rows, PAD)
  s = sampler.Sampler(model)
  logits = np.asarray(model(jnp.asarray(ids[:1]), jnp.asarray(mask[:1]))[0, -1], np.float64)
  for temperature, top_k in ((1.0, 0), (0.7, 4)):
    out = s(ids, mask, 11, max_new_tokens=1, temperature=temperature, top_k=top_k, eos_id=-1)
    freq = np.bincount(np.asarray(out.tokens_bn)[:, 0], minlength=VOCAB) / rows
    z = logits / temperature
    if top_k:
      z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    assert probs.max() < 0.9  # a distribution worth testing
    np.testing.assert_allclose(freq, probs, atol=0.035)
    if top_k:
      assert (freq[probs == 0] == 0).all()
  assert s.traces == 1


def test_sharded_mesh_matches_one_device(gpt2, prompts, greedy):
  mesh = sharding.make_mesh((2, 2, 2))
  model = models.load_pretrained(str(gpt2[2]), mesh=mesh)
  out = sampler.Sampler(model, mesh)(*prompts, 0, max_new_tokens=N, temperature=0.0, eos_id=-1)
  assert out.tokens_bn.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_array_equal(np.asarray(out.tokens_bn), np.asarray(greedy.tokens_bn))


def test_greedy_matches_transformers_llama_gqa(tmp_path):
  if importlib.util.find_spec("rcfd_jax.models.llama") is None:
    pytest.skip("rcfd_jax.models.llama not written yet")
  torch.manual_seed(1)
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.3)
  hf_model = transformers.LlamaForCausalLM(cfg).eval()
  hf_model.save_pretrained(tmp_path)
  ids, mask = sampler.pad_prompts(PROMPTS, PAD)
  out = sampler.Sampler(models.load_pretrained(str(tmp_path)))(
      ids, mask, 0, max_new_tokens=N, temperature=0.0, eos_id=EOS, pad_id=PAD)
  want = _hf_greedy(hf_model, ids, mask, N)
  got = np.asarray(out.tokens_bn)
  np.testing.assert_array_equal(got[:, :want.shape[1]], want)
  assert (got[:, want.shape[1]:] == PAD).all()


def _np_truncate(logits, k, p):
  """Sort-based reference: top-k, then the smallest nucleus reaching mass p."""
  out = logits.copy()
  if 0 < k < len(out):
    out[out < np.sort(out)[-k]] = -np.inf
  if p < 1:
    desc = np.sort(out)[::-1]
    probs = np.exp(desc - desc.max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    out[out < desc[max(int((before < p).sum()), 1) - 1]] = -np.inf
  return out


def test_truncate_logits_matches_sort_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
  logits[1, :5] = logits[1].max()  # ties at the top
  fn = jax.jit(sampler.truncate_logits)
  for k, p in ((0, 0.5), (5, 1.0), (5, 0.7), (1, 1.0), (0, 1e-6), (80, 0.95), (3, 0.0)):
    got = np.asarray(fn(jnp.asarray(logits), jnp.int32(k), jnp.float32(p)))
    want = np.stack([_np_truncate(row, k, p) for row in logits])
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=f"k={k} p={p}")


def test_pad_prompts_checks_lengths():
  ids, mask = sampler.pad_prompts([[3, 4, 5], [6]], PAD, 4)
  np.testing.assert_array_equal(ids, [[0, 3, 4, 5], [0, 0, 0, 6]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  with pytest.raises(sampler.UserError, match="exceeds the model's context of 8"):
    sampler.pad_prompts([[1] * 5], PAD, max_new_tokens=4, max_positions=8)
  with pytest.raises(sampler.UserError, match="empty"):
    sampler.pad_prompts([[1], []], PAD)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  text = ["the cat sat on the mat", "a dog ran in the park", "hello world again"] * 20
  tok = tiny.train_tokenizer(text, vocab_size=300)
  cfg = tiny.gpt2_config(len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=32)
  return tiny.write_model_dir(tmp_path_factory.mktemp("tiny") / "model", cfg, tokenizer=tok)


def _cli(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-m", "rcfd_jax.generate", *args], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=300)


def test_cli_prints_completions(tiny_dir):
  r = _cli(f"--model={tiny_dir}", "--prompt=the cat", "--max_new_tokens=8", "--num_samples=2",
           "--seed=1")
  assert r.returncode == 0, r.stderr
  assert "=== sample 1 ===" in r.stdout and r.stdout.count("the cat") >= 2, r.stdout


def test_cli_rejects_prompt_longer_than_context(tiny_dir):
  r = _cli(f"--model={tiny_dir}", "--prompt=" + "the cat sat on the mat " * 20, "--max_new_tokens=8")
  assert r.returncode == 2
  err = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(err) == 1 and "exceeds the model's context" in err[0], r.stderr
