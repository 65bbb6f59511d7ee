#!/usr/bin/env bash
# One CPU process of the trainer on this machine.
#
#   launch/local.sh [main's flags...]
#   launch/local.sh --config=configs/tiny.py:build/tiny --workdir=/tmp/run
#
# DEVICES=N (default: XLA's default, one CPU device) forces N host devices, so a
# single process can exercise a (data, fsdp, tensor) mesh; the flags pass
# through to `python -m rcfd_jax.main` unchanged. Run from the repository root.
set -euo pipefail

extra=()
if [[ -n "${DEVICES:-}" ]]; then
  extra+=("--config.distributed.num_cpu_devices=${DEVICES}")
fi
JAX_PLATFORMS=cpu exec "${PYTHON:-python}" -m rcfd_jax.main "$@" ${extra[@]+"${extra[@]}"}
