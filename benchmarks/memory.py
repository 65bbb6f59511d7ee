"""Bytes per device under FSDP, from XLA's compiled memory analysis; nothing is materialised.

    python benchmarks/memory.py                    # scaling lines + the 7B table, a few minutes
    python benchmarks/memory.py --skip_step        # parameters / optimizer only, under a minute

Runs in one process with 8 forced host CPU devices and builds meshes over the
first 1, 2, 4 and 8 of them. Every model is abstract (jax.ShapeDtypeStruct
leaves carrying their NamedSharding), so the paper's 7B sizes are measured on
a laptop: the numbers are XLA's buffer assignment for the compiled programs
(memory_analysis() is per device for SPMD programs), not allocations.

Part 1, the scaling comparison: full fine-tuning of Llama-2-7B (fp32 weights,
Adam) with every device on the fsdp axis. The compiled Adam init takes the
parameters as arguments and returns the optimizer state, so its argument
bytes are the parameters per device and its output bytes the optimizer
state per device. The peer is the same figure on 1 device; the ratio should
be 1/N (and is, up to the few small vectors FSDP leaves replicated).

Part 2, the paper's setting: Llama-2-7B policy in bfloat16 with LoRA rank 32
on q/k/v/o in float32 (the reference policy is the same weights with adapters
off, so no second copy), Adam on the adapters, and a DistilBERT or DeBERTa-v3-large
reward model (bf16) on its own tokenizer. The train-step temporaries come
from compiling the real update step (rcfd_jax.step.make_update) for the
configured rollout batch, without and with config.model.remat (jax.checkpoint
on the decoder-layer scan).

Output: a markdown table, then, last, one line per comparison:
    NAME: ours=X peer=Y ratio=Z (unit)
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rcfd_jax import memory, models, policy as policy_lib, rewards as rewards_lib, sharding  # noqa: E402
from rcfd_jax.models import lora  # noqa: E402
from rcfd_jax.step import Frozen, Rollout, StepConfig, TrainState, make_update  # noqa: E402

flags.DEFINE_bool("skip_step", False, "Skip compiling the 7B update step (the slow part).")
flags.DEFINE_integer("rollouts", 32, "Rollouts per update step (global) for the 7B step temporaries.")
flags.DEFINE_integer("prompt_tokens", 448, "Prompt length P for the 7B step.")
flags.DEFINE_integer("new_tokens", 64, "Completion length N for the 7B step.")
flags.DEFINE_integer("grad_accum", 4, "Micro-batches per update in the 7B step.")
FLAGS = flags.FLAGS

LLAMA2_7B = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=4096,
                 intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
DISTILBERT = dict(model_type="distilbert", architectures=["DistilBertForSequenceClassification"],
                  vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072, activation="gelu",
                  max_position_embeddings=512, sinusoidal_pos_embds=False, pad_token_id=0, num_labels=2)
DEBERTA_V3_LARGE = dict(model_type="deberta-v2", architectures=["DebertaV2ForSequenceClassification"],
                        vocab_size=128100, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0,
                        layer_norm_eps=1e-7, relative_attention=True, max_relative_positions=-1,
                        position_buckets=256, position_biased_input=False, pos_att_type=["p2c", "c2p"],
                        share_att_key=True, norm_rel_ebd="layer_norm", pad_token_id=0, num_labels=1)
DEVICE_COUNTS = (1, 2, 4, 8)


def mesh_of(n: int):
  return sharding.make_mesh((1, n, 1), jax.devices()[:n])


def abstract_model(hf_config: dict, task: str, dtype, lora_rank: int = 0):
  """The module with ShapeDtypeStruct leaves (LoRA added when lora_rank > 0)."""
  fam = models.family(hf_config["model_type"])
  cfg = fam.config_from_hf(hf_config)

  def make():
    m = fam.build(cfg, task, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    if lora_rank:
      lora.apply(m, rank=lora_rank, alpha=2.0 * lora_rank, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                 rngs=nnx.Rngs(0))
    return m

  return sharding.abstract_module(make)


def placed(state, mesh):
  """Abstract state whose leaves carry their logical sharding on `mesh`."""
  shardings = sharding.state_shardings(state, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def adam_stats(params, mesh, tx):
  """(param bytes, optimizer-state bytes) per device, and the optimizer state's shardings.

  Both from compiled programs: one that reads the parameters (argument bytes;
  XLA drops arguments a program never reads, so tx.init alone reports 0) and
  tx.init with the trainer's shardings (output bytes).
  """
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, params), param_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh))
  read = memory.compiled_stats(jax.jit(lambda p: sum(jnp.sum(x[(0,) * x.ndim]) for x in jax.tree.leaves(p))),
                               params)
  init = memory.compiled_stats(jax.jit(tx.init, out_shardings=opt_sh), params)
  assert read.arguments == memory.tree_bytes(params), (read.arguments, memory.tree_bytes(params))
  return read.arguments, init.outputs, opt_sh


def scaling_lines() -> list[str]:
  """Part 1: parameters and Adam state per device on 1, 2, 4, 8 devices (full fine-tuning, fp32)."""
  graphdef, state = nnx.split(abstract_model(LLAMA2_7B, "causal_lm", jnp.float32))
  del graphdef
  tx = optax.adamw(1e-5)
  rows = {}
  for n in DEVICE_COUNTS:
    p, o, _ = adam_stats(placed(state, mesh_of(n)), mesh_of(n), tx)
    rows[n] = (p, o)
    print(f"  full fine-tuning fp32, {n} device(s): params {memory.fmt(p)}, Adam state {memory.fmt(o)} per device",
          flush=True)
  lines = []
  for n in DEVICE_COUNTS[1:]:
    for name, i in (("params", 0), ("adam_state", 1)):
      ours, peer = rows[n][i] / memory.GiB, rows[1][i] / memory.GiB
      lines.append(f"fsdp_{name}_per_device_{n}dev_llama7b_fp32: ours={ours:.3f} peer={peer:.3f} "
                   f"ratio={ours / peer:.4f} (GiB per device; peer = 1 device, ideal ratio {1 / n:.4f})")
  return lines


def update_step_stats(parts, frozen_base, tx, mesh) -> memory.CompiledStats:
  """Compiled memory of the real REINFORCE update step for the 7B LoRA policy."""
  sc = StepConfig(samples_per_prompt=1, max_new_tokens=FLAGS.new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                  eos_id=2, pad_id=0, objective="rcfd", algorithm="reinforce", baseline="whiten",
                  kl_estimator="k1", adaptive_kl=False, kl_target=6.0, kl_horizon=1e4, alpha=(1.0,),
                  ppo_epochs=1, minibatches=1, grad_accum=FLAGS.grad_accum, clip_eps=0.3, value_clip=0.2,
                  vf_coef=0.1, gamma=1.0, lam=0.95, loss_agg="token_mean")
  rewards = rewards_lib.Rewards(rewards_lib.parse_sources(("loglik",)), None, None)
  update = make_update(parts, rewards, tx, sc)
  rep = sharding.replicated(mesh)
  params = parts.trainable
  _, _, opt_sh = adam_stats(params, mesh, tx)
  opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                     jax.eval_shape(tx.init, params), opt_sh)
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)
  state = TrainState(step=scalar(jnp.int32), params=params, opt_state=opt,
                     rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep), beta=scalar(jnp.float32),
                     bad_steps=scalar(jnp.int32), skipped_total=scalar(jnp.int32))
  r, p, n = FLAGS.rollouts, FLAGS.prompt_tokens, FLAGS.new_tokens
  row = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.batch_sharding(mesh, len(shape)))
  ro = Rollout(prompt_ids=row((r, p), jnp.int32), prompt_mask=row((r, p), jnp.bool_),
               tokens=row((r, n), jnp.int32), mask=row((r, n), jnp.bool_), logp=row((r, n), jnp.float32),
               ref_logp=row((r, n), jnp.float32), values=row((r, n), jnp.float32),
               rewards={"loglik": row((r,), jnp.float32)}, demo_reward=row((r, 1), jnp.float32))
  frozen = Frozen(frozen_base, None, None)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  jitted = jax.jit(update, out_shardings=(state_sh, None), donate_argnums=0)
  return memory.compiled_stats(jitted, state, frozen, ro, None)


def paper_table(step_devices: tuple[int, ...]) -> tuple[list[str], dict]:
  """Part 2: the paper's 7B LoRA policy and its reward models, per device."""
  lm = abstract_model(LLAMA2_7B, "causal_lm", jnp.bfloat16, lora_rank=32)
  policy = policy_lib.Policy(lm, LLAMA2_7B["hidden_size"], value_head=False, rngs=nnx.Rngs(0))
  graphdef, trainable, base = nnx.split(policy, policy_lib.trainable_filter(True), ...)
  lm.remat = True  # config.model.remat: the same step with jax.checkpoint on the layer scan
  graphdef_remat = nnx.split(policy, policy_lib.trainable_filter(True), ...)[0]
  # Adapters (and so Adam) in float32 over the bfloat16 base, as PEFT keeps them;
  # layers.Dense casts them to the compute dtype.
  trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable)
  rms = {"DistilBERT": nnx.split(abstract_model(DISTILBERT, "seq_cls", jnp.bfloat16))[1],
         "DeBERTa-v3-large": nnx.split(abstract_model(DEBERTA_V3_LARGE, "seq_cls", jnp.bfloat16))[1]}
  tx = optax.adamw(5e-5)
  header = ("| devices | policy base (bf16, frozen; also pi_0) | LoRA r=32 (fp32) | Adam | DistilBERT RM | "
            "DeBERTa-v3-large RM | update-step temporaries | update-step peak | temporaries, model.remat | "
            "peak, model.remat |")
  lines = [header, "|" + "---|" * 10]
  figures = {}
  for n in DEVICE_COUNTS:
    mesh = mesh_of(n)
    t, b = placed(trainable, mesh), placed(base, mesh)
    lora_bytes, adam_bytes, _ = adam_stats(t, mesh, tx)
    rm_bytes = {k: memory.tree_bytes(placed(v, mesh)) for k, v in rms.items()}
    cells = ["not compiled"] * 4
    if n in step_devices:
      stats = update_step_stats(policy_lib.PolicyParts(graphdef, t, b, True), b, tx, mesh)
      remat = update_step_stats(policy_lib.PolicyParts(graphdef_remat, t, b, True), b, tx, mesh)
      cells = [memory.fmt(x) for x in (stats.temporaries, stats.peak_estimate, remat.temporaries,
                                         remat.peak_estimate)]
      figures[n], figures[("remat", n)] = stats, remat
    lines.append(f"| {n} | {memory.fmt(memory.tree_bytes(b))} | {memory.fmt(lora_bytes)} | "
                 f"{memory.fmt(adam_bytes)} | {memory.fmt(rm_bytes['DistilBERT'])} | "
                 f"{memory.fmt(rm_bytes['DeBERTa-v3-large'])} | {' | '.join(cells)} |")
    print(f"  {n} device(s) measured", flush=True)
  return lines, figures


def main(argv):
  del argv
  print("Part 1: FSDP scaling, Llama-2-7B full fine-tuning (fp32 + Adam), abstract", flush=True)
  lines = scaling_lines()
  print(f"\nPart 2: paper setting, Llama-2-7B bf16 + LoRA r=32 fp32 (adapters off = pi_0), reward models bf16; "
        f"update step: {FLAGS.rollouts} rollouts x ({FLAGS.prompt_tokens} + {FLAGS.new_tokens}) tokens, "
        f"grad_accum {FLAGS.grad_accum}", flush=True)
  table, figures = paper_table(() if FLAGS.skip_step else (1, 8))
  print("\n" + "\n".join(table))
  if 1 in figures and 8 in figures:
    ours, peer = figures[8].peak_estimate / memory.GiB, figures[1].peak_estimate / memory.GiB
    lines.append(f"lora7b_update_step_peak_per_device_8dev: ours={ours:.3f} peer={peer:.3f} "
                 f"ratio={ours / peer:.4f} (GiB per device; peer = 1 device)")
    for n in (1, 8):
      ours, peer = figures[("remat", n)].peak_estimate / memory.GiB, figures[n].peak_estimate / memory.GiB
      lines.append(f"lora7b_update_step_peak_per_device_{n}dev_remat: ours={ours:.3f} peer={peer:.3f} "
                   f"ratio={ours / peer:.4f} (GiB per device; ours = model.remat, peer = without)")
  print()
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
