#!/usr/bin/env bash
#SBATCH --job-name=rcfd
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#
# Trains on SLURM GPU nodes: one JAX process per node (default) or per GPU.
#
#   sbatch launch/slurm.sh [main's flags...]
#   sbatch --nodes=4 launch/slurm.sh --config=configs/tldr.py --workdir=/shared/runs/tldr
#   sbatch --ntasks-per-node=8 launch/slurm.sh ...       # one process per GPU
#
# srun starts the tasks; rcfd_jax sees SLURM's step variables and calls
# jax.distributed.initialize() without arguments, so JAX takes the
# coordinator (first node), process count and id from SLURM. With one task
# per node, JAX_LOCAL_DEVICE_IDS gives the process all of its node's GPUs
# (JAX's SLURM detection would otherwise give it only GPU SLURM_LOCALID); with
# one task per GPU, each task drives GPU SLURM_LOCALID, so let every task see
# all GPUs (--gpus-per-node, not --gpus-per-task). Submit from the repository
# root with the environment active; --workdir must be on a filesystem all
# nodes share. --kill-on-bad-exit ends the job when one process fails.
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
export TOKENIZERS_PARALLELISM=false
srun --kill-on-bad-exit=1 bash -c '
  if [[ "${SLURM_NTASKS_PER_NODE:-1}" == 1 && -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((SLURM_GPUS_ON_NODE - 1)))
  fi
  exec python -m rcfd_jax.main "$@"' rcfd_jax "$@"
