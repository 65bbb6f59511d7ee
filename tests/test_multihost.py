"""Two local processes on one global mesh train like one process (to float tolerance).

launch/local_multiprocess.sh starts 2 processes of rcfd_jax.main, each with 4
forced CPU devices, joined by jax.distributed on 127.0.0.1 (gloo collectives)
into one (2, 2, 2) mesh of 8 devices. They train the tiny config 1 step and
save; a second launch resumes from that checkpoint for a second step. This
pytest process (8 forced devices from conftest, the same mesh shape) trains
the same 2 steps in one go, and the final parameters, read back from the
multi-process run's Orbax checkpoint, must agree.

A second test kills one of two processes and checks that the survivor stops
with JAX's "another task died" error within the heartbeat timeout instead of
hanging in a collective, and a third that JAX's SLURM detection (what srun
sets) brings two processes together without any coordinator flags.

    pytest tests/test_multihost.py   # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from conftest import load_config

REPO = Path(__file__).resolve().parents[1]

# Small enough for 2 shared cores; prompts_per_step * samples_per_prompt = 16
# rollouts split over the (data, fsdp) = 4 batch shards.
OVERRIDES = {
    "data.max_examples": 64,
    "data.validation_size": 8,
    "rollout.max_new_tokens": 8,
    "eval.num_prompts": 8,
    "eval.every_steps": 100,
    "checkpoint.every_steps": 1,
    "mesh.shape": (2, 2, 2),
}


def _env() -> dict:
  # No forced device count and no persistent XLA cache: each process compiles its own programs.
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  env.update(JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest", HF_HUB_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), PYTHON=sys.executable)
  return env


def _flags(assets: Path, workdir: Path, cache: Path, total_steps: int) -> list[str]:
  flags = [f"--config=configs/tiny.py:{assets}", f"--workdir={workdir}", f"--config.reward.cache_dir={cache}",
           f"--config.total_steps={total_steps}", "--config.distributed.shutdown_timeout_s=30"]
  for k, v in OVERRIDES.items():
    flags.append(f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}")
  return flags


def _launch(n: int, flags: list[str], timeout: float) -> str:
  env = dict(_env(), DEVICES_PER_PROCESS="4", HEARTBEAT_S="10")
  r = subprocess.run(["bash", str(REPO / "launch/local_multiprocess.sh"), str(n), *flags], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, r.stderr[-4000:]
  return r.stderr


def _flat(tree) -> dict[str, np.ndarray]:
  """Leaves by path, with Variable wrappers ('value') dropped from the names."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    out["/".join(n for n in names if n != "value")] = np.asarray(leaf)
  return out


def _checkpoint_params(workdir: Path, step: int) -> dict[str, np.ndarray]:
  path = workdir / "checkpoints" / str(step) / "state"
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return _flat(ckptr.restore(path, restore_args=args)["params"])


def test_two_processes_match_one(tiny_assets, tmp_path):
  from rcfd_jax import train
  cache = tmp_path / "cache"  # the single-process run fills it; the launches read it
  c = load_config(f"tiny:{tiny_assets}", {"total_steps": 2, "reward.cache_dir": str(cache), **OVERRIDES})
  t0 = time.perf_counter()
  state = train.run(c, str(tmp_path / "single"))
  t1 = time.perf_counter()

  multi = tmp_path / "multi"
  log = _launch(2, _flags(tiny_assets, multi, cache, total_steps=1), timeout=240)
  assert "process 1 of 2, 4 local and 8 global devices" in log
  log = _launch(2, _flags(tiny_assets, multi, cache, total_steps=2), timeout=240)
  assert "resumed from step 1" in log
  print(f"one process: {t1 - t0:.0f}s; two processes (2 launches): {time.perf_counter() - t1:.0f}s")

  want = _flat(state.params)
  got = _checkpoint_params(multi, 2)
  assert sorted(got) == sorted(want)
  moved = max(float(np.abs(_checkpoint_params(multi, 1)[k] - got[k]).max()) for k in got)
  diff = max(float(np.abs(got[k] - want[k]).max()) for k in got)
  print(f"largest parameter change in step 2: {moved:.2e}; largest difference 2 processes vs 1: {diff:.2e}")
  assert moved > 5e-4  # training moved the parameters, so agreement means something
  # Collectives through gloo sum in another order than in one process; Adam
  # divides by sqrt(v), so a gradient near 0 can amplify that to ~1e-5.
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-3, atol=1e-4, err_msg=k)
  # Process 0 alone wrote the metrics: one line per step, none twice.
  lines = (multi / "metrics.jsonl").read_text().splitlines()
  assert [int(re.search(r'"step": (\d+)', l).group(1)) for l in lines] == [1, 2]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_killed_process_stops_the_other(tiny_assets, tmp_path):
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = [sys.executable, "-m", "rcfd_jax.main", *_flags(tiny_assets, tmp_path / "run", tmp_path / "cache", 2),
           f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
           f"--config.distributed.process_id={i}", "--config.distributed.num_cpu_devices=4",
           "--config.distributed.heartbeat_timeout_s=5"]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True))
  survivor, victim = procs
  try:
    for line in victim.stderr:  # wait until it has joined the runtime
      if "process 1 of 2" in line:
        break
    victim.kill()
    victim.wait()
    t = time.perf_counter()
    _, err = survivor.communicate(timeout=90)
    waited = time.perf_counter() - t
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert survivor.returncode != 0
  assert "another task died" in err or "stopped sending heartbeats" in err, err[-3000:]
  print(f"survivor stopped {waited:.0f}s after the kill")


_SLURM_PROGRAM = """
import sys
from rcfd_jax import config, distributed
c = config.base().distributed
c.num_cpu_devices, c.heartbeat_timeout_s, c.shutdown_timeout_s = 2, 10, 10
assert distributed.cluster_detected() == "slurm"
distributed.initialize(c)
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
ids = multihost_utils.process_allgather(jnp.array([jax.process_index()]))
line = f"joined {jax.process_index()} {jax.process_count()} {jax.device_count()} {ids.ravel().tolist()}"
with open(sys.argv[1], "w") as f:  # not stdout: gloo's native prints can land inside a Python line there
  f.write(line)
distributed.shutdown()
"""


def test_slurm_environment_is_autodetected(tmp_path):
  """What srun sets for 2 tasks on one node: JAX finds coordinator, count and id by itself."""
  port = str(_free_port())  # otherwise JAX derives the coordinator port from the job id
  procs = []
  for i in range(2):
    env = dict(_env(), JAX_COORDINATOR_PORT=port, SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost",
               SLURM_NTASKS="2",
               SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NUM_NODES="1")
    procs.append(subprocess.Popen([sys.executable, "-c", _SLURM_PROGRAM, str(tmp_path / f"joined{i}")], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  try:
    outs = [p.communicate(timeout=90) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, err[-3000:]
    assert (tmp_path / f"joined{i}").read_text() == f"joined {i} 2 4 [0, 1]", out[-3000:]
