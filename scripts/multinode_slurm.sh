#!/usr/bin/env bash
# Multi-node training on SLURM: one torchrun per node, rendezvous on the first node.
#   sbatch --nodes=2 --gpus-per-node=8 scripts/multinode_slurm.sh --module llama3 --config llama3_8b
#SBATCH --job-name=cairn
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
set -euo pipefail
root="${CAIRN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
nodes=( $(scontrol show hostnames "$SLURM_JOB_NODELIST") )
head_node="${nodes[0]}"
head_ip="$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address | awk '{print $1}')"
gpus_per_node="${SLURM_GPUS_ON_NODE:-${NGPU:-8}}"
python="$("$root/scripts/setup_env.sh")"
export PYTHONUNBUFFERED=1
# NCCL over the cluster network; keep NVLink multicast off where the site requires it.
srun --kill-on-bad-exit=1 "$python" -m torch.distributed.run \
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$gpus_per_node" \
  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head_ip:${MASTER_PORT:-29500}" \
  --max-restarts="${MAX_RESTARTS:-0}" \
  -m cairn.train "$@"
