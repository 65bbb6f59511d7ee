#!/usr/bin/env bash
# The same training command on every worker of a Cloud TPU VM slice (one process per host).
#
#   launch/tpu_vm.sh TPU_NAME ZONE [main's flags...]
#   launch/tpu_vm.sh my-v4-32 us-central2-b --config=configs/tldr.py --workdir=/mnt/shared/runs/tldr
#
# Runs `python -m rcfd_jax.main [flags]` on all workers at once through
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all --command=...
# Each worker needs this repository at REPO_DIR (default: ~/rcfd_jax) with its
# environment; PYTHON (default: python3) is the interpreter there, PROJECT the
# gcloud project (default: gcloud's). RCFD_TPU_SLICE=1 makes rcfd_jax call
# jax.distributed.initialize() without arguments: JAX reads the workers,
# this host's index and the coordinator from the TPU metadata server. The
# mesh spans every chip of the slice (--config.mesh.shape, e.g. "(1,-1,1)").
# --workdir must be a directory every worker sees (NFS, Filestore, a gcsfuse
# mount): all processes write Orbax checkpoints there together, and process
# 0 alone writes metrics and evaluations.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
tpu=$1
zone=$2
shift 2
repo_dir=${REPO_DIR:-'~/rcfd_jax'}
python=${PYTHON:-python3}
args=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" ${PROJECT:+--project="${PROJECT}"} --worker=all \
  --command="cd ${repo_dir} && RCFD_TPU_SLICE=1 TOKENIZERS_PARALLELISM=false ${python} -m rcfd_jax.main${args}"
