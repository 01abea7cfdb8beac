#!/usr/bin/env bash
# Train with torchrun. Sets up ./.venv on first use (scripts/setup_env.sh).
#   ./run_train.sh                                    debug model, 1 process
#   NGPU=4 ./run_train.sh --parallelism.tensor_parallel_degree 2
#   MODULE=llama3 CONFIG=llama3_8b NGPU=8 ./run_train.sh
#   CONFIG_FILE=train_configs/debug_model.toml ./run_train.sh --checkpoint.enable
# NGPU processes per node: one per GPU on CUDA hosts, NGPU gloo processes on a CPU machine.
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (see docs/multinode.md).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NGPU="${NGPU:-1}"
MODULE="${MODULE:-llama3}"
CONFIG="${CONFIG:-llama3_debugmodel}"
NNODES="${NNODES:-1}"
python="$("$root/scripts/setup_env.sh")"

args=(--module "$MODULE" --config "$CONFIG")
if [[ -n "${CONFIG_FILE:-}" ]]; then args+=(--job.config_file "$CONFIG_FILE"); fi

launch=(--nproc_per_node="$NGPU" --local-ranks-filter "${LOG_RANK:-0}" --role rank --tee 3)
if [[ "$NNODES" -gt 1 ]]; then
  launch+=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK for multi-node runs}"
           --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}")
else
  launch+=(--standalone)
fi
if [[ -n "${MAX_RESTARTS:-}" ]]; then launch+=(--max-restarts="$MAX_RESTARTS"); fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# When the job was launched: each start's `startup` record in metrics.jsonl counts from it.
export CAIRN_LAUNCH_UNIX="${CAIRN_LAUNCH_UNIX:-$(date +%s.%N)}"
# --tee: torchrun prefixes each line with the global rank (its default is the role and the local rank).
export TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE="${TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE:-[rank\$rank]: }"
# cairn.launch is torchrun, ending a run stopped by a user error with that error (cairn/launch.py).
exec "$python" -m cairn.launch "${launch[@]}" -m cairn.train "${args[@]}" "$@"
