"""rcfd_jax.aot: the trainer's own programs compiled for a TPU topology by libtpu, with no TPU attached.

The 7B paper configs take minutes per program to compile; they run as
benchmarks/aot_paper.py. Here the tiny config compiles for a v5e 2x2 slice,
a config that cannot fit is one error line, and the pieces aot stands on
(loop trip counts in the compiled HLO, rollout micro-batches) are checked.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from conftest import load_config


@pytest.fixture(autouse=True, scope="module")
def _no_persistent_cache():
  """TPU programs compiled here could not be loaded back from the tests' XLA cache (no TPU client)."""
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # the flag is read when the cache starts
  yield
  jax.config.update("jax_enable_compilation_cache", True)
  compilation_cache.reset_cache()

pytest.importorskip("libtpu", reason="libtpu is not installed here (pip install 'jax[tpu]==0.10.2'); "
                                      "nothing can be compiled for a TPU")

from rcfd_jax import aot, bridge, hlo_cost, programs, targets, train  # noqa: E402
from rcfd_jax.step import make_rollout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEYS = {"peak_gib_per_chip", "flops", "model_flops", "bytes_accessed", "estimated_seconds", "mfu"}


def test_tiny_config_compiles_for_a_v5e_slice(tiny_assets, tmp_path):
  result = aot.compile_config(load_config(f"tiny:{tiny_assets}"), "v5e:2x2")
  assert (result["topology"], result["chips"], result["fits"]) == ("v5e:2x2", 4, True)
  assert result["hbm_gib_per_chip"] == pytest.approx(15.75)
  assert set(result["programs"]) == {"iteration", "eval_rollout", "demo_scoring"}
  for name, p in result["programs"].items():
    assert set(p) == KEYS and min(p.values()) > 0, (name, p)
    assert p["peak_gib_per_chip"] < result["hbm_gib_per_chip"]
    assert 0.8 < p["flops"] / p["model_flops"] < 1.25, (name, p)  # executed vs analytic, loops counted
  out = tmp_path / "tiny.json"
  aot.write_json(str(out), result)
  assert json.loads(out.read_text()) == result
  assert "| iteration |" in aot.table(result)


def test_analytic_flops_follow_the_reference_proposal(tiny_assets):
  """rcfd_tilt on pi_0's samples runs no reference forward: the analytic count drops it, and matches libtpu's."""
  c = load_config(f"tiny:{tiny_assets}")
  c.rl.objective, c.rl.tilt_proposal, c.rl.baseline, c.reward.sources = "rcfd_tilt", "reference", "none", ("loglik",)
  p = aot.compile_config(c, "v5e:2x2")["programs"]["iteration"]
  assert 0.95 < p["flops"] / p["model_flops"] < 1.1, p  # counting the reference forward reads 0.82


@pytest.mark.parametrize("override,expect", [
    ("--config.mesh.device_memory_gib=0.00001", "program 'iteration' needs "),  # with what stays resident
    ("--config.rollout.prompts_per_step=262144", "program 'iteration' needs "),  # the TPU compiler refuses it
])
def test_config_that_cannot_fit_is_one_error_line_and_writes_nothing(override, expect, tiny_assets, tmp_path, env):
  out = tmp_path / "never_written.json"
  proc = subprocess.run([sys.executable, "-m", "rcfd_jax.aot", f"--config={REPO / 'configs' / 'tiny.py'}:{tiny_assets}",
                         "--topology=v5e:2x2", f"--out={out}", override], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and expect in errors[0] and "per device" in errors[0], proc.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unknown_topology_and_model_are_one_error_line(tiny_assets):
  from rcfd_jax.errors import UserError
  with pytest.raises(UserError, match="v5e:2x4"):
    targets.describe("v9z:1x1")
  with pytest.raises(UserError, match="neither a local directory nor a model whose config.json ships"):
    aot.local_dir("someone/unknown-model", "policy.path")
  assert Path(aot.local_dir("meta-llama/Llama-2-7b-hf", "policy.path"), "config.json").is_file()


def test_loops_count_their_trips():
  """A scan of 7 matmuls inside a while loop of at most 5 steps that may stop early: 35 matmuls."""
  device = targets.describe("v5e:2x2").devices[0]
  x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))

  def fn(x):
    def step(carry):
      i, y = carry
      y = jax.lax.scan(lambda c, _: (jnp.tanh(c @ c), None), y, None, length=7)[0]
      return i + 1, y

    return jax.lax.while_loop(lambda c: (c[0] < 5) & (c[1][0, 0] < 1e9), step, (0, x))[1]

  compiled = jax.jit(fn).lower(x).compile()
  program = hlo_cost.Program(compiled.as_text(), 197e12, 819e9)
  cost = program.cost()
  assert sorted(program.trips.values()) == [5, 7]
  assert cost.flops == 35 * 2 * 256 ** 3
  once = compiled.cost_analysis()
  once = once[0] if isinstance(once, list) else once
  assert once["flops"] == pytest.approx(2 * 256 ** 3, rel=0.01)  # what XLA's own analysis reports
  assert cost.seconds >= cost.flops / 197e12


def test_in_place_updates_count_their_update_not_the_buffer():
  """A KV-cache-like buffer written a row per step: HBM traffic is the rows, not the buffer each time."""
  device = targets.describe("v5e:2x2").devices[0]
  sh = jax.sharding.SingleDeviceSharding(device)
  buf = jax.ShapeDtypeStruct((2, 4096, 4096), jnp.bfloat16, sharding=sh)  # 64 MiB
  rows = jax.ShapeDtypeStruct((1000, 4096), jnp.bfloat16, sharding=sh)

  def fn(buf, rows):  # both halves updated by one fusion, like a layer's keys and values
    return jax.lax.fori_loop(0, 1000, lambda i, b: b.at[:, i].set(jnp.stack([rows[i], 2 * rows[i]])), buf)

  compiled = jax.jit(fn, donate_argnums=0).lower(buf, rows).compile()
  cost = hlo_cost.Program(compiled.as_text(), 197e12, 819e9).cost()
  assert cost.bytes_accessed < 10 * 64 * 2 ** 20  # a pass over the buffer per step would be 1000 of them


@pytest.fixture(scope="module")
def one_device(tiny_assets):
  c = load_config(f"tiny:{tiny_assets}", {"mesh.shape": (1, 1, 1), "mesh.devices": 1})
  return train.setup(c)


def test_rollout_micro_batches_keep_rows_in_prompt_order(one_device):
  """Greedy decoding in 2 sequential chunks gives the rows of one rollout, in the same order."""
  s, state = one_device
  sc = dataclasses.replace(s.sc, temperature=0.0)
  batch = bridge.device_batch(s, s.batcher, s.batcher.indices(0), np.zeros((len(s.train), 2), np.float32))
  whole = jax.jit(make_rollout(s.parts, s.rewards, sc))(state, s.frozen, batch)
  parts = jax.jit(programs.chunked(make_rollout(s.parts, s.rewards, sc), 2))(state, s.frozen, batch)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(parts)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  rm = programs.chunked_rows(lambda st, ids, mask: (ids * mask).sum(-1), 4)
  ids = jnp.arange(32 * 3).reshape(32, 3)
  np.testing.assert_array_equal(rm(None, ids, ids > 5), (ids * (ids > 5)).sum(-1))


def test_rollout_micro_batches_sample_with_keys_of_their_own(one_device):
  """The same prompt in both chunks: without a key per chunk, its rows would draw the same tokens."""
  s, state = one_device
  batch = bridge.device_batch(s, s.batcher, np.zeros(s.config.rollout.prompts_per_step, np.int64),
                             np.zeros((len(s.train), 2), np.float32))
  ro = jax.jit(programs.chunked(make_rollout(s.parts, s.rewards, s.sc), 2))(state, s.frozen, batch)
  k, tokens = s.sc.samples_per_prompt, np.asarray(ro.tokens)
  assert not np.array_equal(tokens[0::2 * k], tokens[k::2 * k])  # prompts 0, 2, ... against 1, 3, ...
