"""Accelerators to compile for without having one: TPU slices (libtpu) and NVIDIA GPUs (the CUDA plugin).

    target = targets.describe("v5e:2x4")    # or "v4:2x2x1", "v5p:2x2x1", "v6e:2x2", "h100:8"
    target.devices, target.hbm_bytes, target.peak_flops, target.hbm_bandwidth

TPU: libtpu (pip install "jax[tpu]==0.10.2") describes any slice by name;
v4 is taken with one device per chip (megacore). The chip's HBM, peak FLOP/s
and HBM bandwidth are read off the TPU compiler itself: the HBM from the
error it gives for a program too big for one chip, the rates from its cost
model's optimal_seconds for a large bfloat16 matmul (compute-bound) and a
large addition (memory-bound).

GPU: the CUDA PJRT plugin (pip install jax-cuda12-plugin==0.10.2
jax-cuda12-pjrt==0.10.2; no GPU, driver or CUDA libraries needed) compiles
for a device described by a target config. "h100:N" is N H100 SXM 80GB in
one host. Its compiler reports no cost analysis, so the rates are the
published ones (989 TFLOP/s dense bfloat16, 3.35 TB/s), and the memory is
the device's as CUDA reports it.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from rcfd_jax.errors import UserError

# An H100 SXM 80GB as XLA's GPU compiler wants it described (stream_executor GpuTargetConfigProto).
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPUS = {"h100": (H100, 989.4e12)}  # target config, dense bfloat16 FLOP/s


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  devices: list
  hbm_bytes: int          # memory one device offers programs
  peak_flops: float       # per device
  hbm_bandwidth: float    # bytes/s per device

  @property
  def where(self) -> str:
    return f"a {self.name} device"


def describe(name: str) -> Target:
  """The devices and figures of a TPU slice ("v5e:2x4") or of N GPUs ("h100:8")."""
  kind, _, count = name.partition(":")
  if kind.lower() in GPUS:
    return _gpus(name, kind.lower(), count)
  devices = _tpu_devices(name)
  peak, bandwidth = _tpu_rates(devices[0])
  return Target(name, devices, _tpu_hbm(devices[0]), peak, bandwidth)


def _tpu_devices(name: str) -> list:
  from jax.experimental import topologies
  try:
    kw = {"chip_config_name": "megacore"} if name.lower().startswith("v4") else {}
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kw).devices)
  except (ImportError, RuntimeError, ValueError, jax.errors.JaxRuntimeError) as e:
    text = str(e).lower()
    if "tpu" in text and ("plugin" in text or "not found" in text or "unknown backend" in text):
      raise UserError("libtpu is not installed; pip install 'jax[tpu]==0.10.2' (it compiles for TPUs on any "
                      "machine)") from None
    raise UserError(f"cannot describe TPU topology {name!r} ({str(e).splitlines()[0]}); use a slice name "
                    "such as v5e:2x4, v4:2x2x1, v5p:2x2x1 or v6e:2x2, or h100:N for N GPUs") from None


def _tpu_hbm(device) -> int:
  """HBM one chip offers programs, as the TPU compiler states it when a program is too big for it."""
  sds = jax.ShapeDtypeStruct((1 << 20, 1 << 20), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
  try:  # a 4 TiB temporary: the compiler refuses it and names the chip's memory
    jax.jit(lambda x: jnp.sort(x, axis=0)[::2]).lower(sds).compile()
  except jax.errors.JaxRuntimeError as e:
    found = re.search(r"available HBM \(([\d.]+)([KMGT])\)", str(e))
    if found:
      return int(float(found[1]) * 1024 ** ("KMGT".index(found[2]) + 1))
  raise UserError(f"the TPU compiler did not state the HBM of a {device.device_kind} chip; this libtpu "
                  "is not one rcfd_jax knows (pip install 'jax[tpu]==0.10.2')")


def _tpu_rates(device) -> tuple[float, float]:
  """(peak FLOP/s, HBM bytes/s) of one chip from the compiler's optimal_seconds of two probes."""
  x = jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device))
  out = []
  for fn, key in ((lambda a, b: a @ b, "flops"), (lambda a, b: a + b, "bytes accessed")):
    ca = jax.jit(fn).lower(x, x).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    out.append(ca[key] / ca["optimal_seconds"])
  return out[0], out[1]


def _gpus(name: str, kind: str, count: str) -> Target:
  target, peak = GPUS[kind]
  if not count.isdigit() or int(count) < 1:
    raise UserError(f"GPU target {name!r}: write {kind}:N for N devices in one host, e.g. {kind}:8")
  from jax.experimental import topologies
  try:
    devices = list(topologies.get_topology_desc(platform="cuda", target_config=target,
                                                topology=f"1x1x{count}").devices)
  except Exception as e:  # no plugin: the platform is unknown
    raise UserError(f"cannot describe {name!r} ({str(e).splitlines()[0][:200]}); the CUDA plugin compiles for "
                    "GPUs without one: pip install jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2") from None
  memory = int(re.search(r"device_memory_size: (\d+)", target).group(1))
  bandwidth = float(re.search(r"memory_bandwidth: (\d+)", target).group(1))
  return Target(name, devices, memory, peak, bandwidth)
