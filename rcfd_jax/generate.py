"""Prints sampled completions of a prompt from a Hugging Face model directory.

    python -m rcfd_jax.generate --model=HF_DIR --prompt="Once upon a time" \
        --max_new_tokens=64 --temperature=0.7 --top_p=0.9 --num_samples=3

Bad input (missing directory, prompt too long for the context) prints one
`error:` line and exits 2.
"""

from __future__ import annotations

from absl import app, flags

from rcfd_jax.errors import UserError, exit_on_user_error

_MODEL = flags.DEFINE_string("model", None, "Hugging Face model directory (or hub id).", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.", required=True)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to sample after the prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 keeps all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass to keep; 1.0 keeps all.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Completions to print.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def load_policy(path: str):
  """(model, tokenizer) for a policy path.

  `path` is a Hugging Face directory, a hub id, or a training workdir (the
  latest good checkpoint, LoRA merged, with the policy's tokenizer).
  """
  from rcfd_jax import export, models
  from rcfd_jax.models import hf
  if export.is_workdir(path):
    model, tokenizer, _ = export.load_trained(path)
    return model, tokenizer
  return models.load_pretrained(path, task="causal_lm"), hf.open_tokenizer(path)


def _special_ids(model, tokenizer) -> tuple[int, int]:
  """(eos_id, pad_id): the tokenizer's, else config.json's; -1 eos never stops."""
  eos = tokenizer.eos_token_id
  if eos is None:
    eos = model.config.eos_token_id
  if isinstance(eos, (list, tuple)):
    eos = eos[0]
  eos = -1 if eos is None else eos
  pad = tokenizer.pad_token_id
  pad = pad if pad is not None else max(eos, 0)
  return eos, pad


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; pass everything as --flags")
  if _MAX_NEW_TOKENS.value < 1 or _NUM_SAMPLES.value < 1:
    raise UserError("--max_new_tokens and --num_samples must be at least 1")
  if _TEMPERATURE.value < 0 or not 0 < _TOP_P.value <= 1 or _TOP_K.value < 0:
    raise UserError("need --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0")
  import numpy as np

  from rcfd_jax import sampler
  model, tokenizer = load_policy(_MODEL.value)
  eos, pad = _special_ids(model, tokenizer)
  prompt = tokenizer(_PROMPT.value, add_special_tokens=True)["input_ids"]
  ids, mask = sampler.pad_prompts([prompt] * _NUM_SAMPLES.value, pad,
                                  max_new_tokens=_MAX_NEW_TOKENS.value,
                                  max_positions=model.config.max_positions)
  out = sampler.Sampler(model)(
      ids, mask, _SEED.value, max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value, top_p=_TOP_P.value, eos_id=eos, pad_id=pad)
  tokens, lengths = np.asarray(out.tokens_bn), np.asarray(out.lengths_b)
  for i in range(_NUM_SAMPLES.value):
    text = tokenizer.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
    print(f"=== sample {i} ===")
    print(_PROMPT.value + text)


if __name__ == "__main__":
  app.run(main)
