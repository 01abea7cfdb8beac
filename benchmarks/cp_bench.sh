#!/usr/bin/env bash
# Context parallelism against none, on the same GPUs and the same global batch: tokens/s and peak
# memory per GPU of CP 1 (FSDP over NGPU) and CP NGPU (each attention method), and their first
# losses (which must agree: the same weights and data). A summary goes to $OUT/summary.txt.
#   OUT=/tmp/cp bash benchmarks/cp_bench.sh                                  # 1B, seq_len 16384, 2 GPUs
#   OUT=/tmp/cp CONFIG=llama3_debugmodel SEQ_LEN=256 STEPS=4 METHODS=allgather bash benchmarks/cp_bench.sh   # CPU
# On an offline GPU host, carry the wheels cairn needs besides torch in .whl, as for gpu_train_check.sh.
set -uo pipefail
if [[ -d .whl ]] && ! python3 -c "import tyro" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
OUT="${OUT:-/tmp/cairn-cp}"; NGPU="${NGPU:-2}"; CONFIG="${CONFIG:-llama3_1b}"; SEQ_LEN="${SEQ_LEN:-16384}"
STEPS="${STEPS:-20}"; METHODS="${METHODS:-ring allgather}"; RUNS="$OUT/runs"
mkdir -p "$RUNS"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "${CAIRN_PYTHON:-python3}" -c "import torch; print('torch', torch.__version__)"; } | tee "$OUT/host.txt"
run() {  # name, flags...
  local name=$1; shift
  NGPU=$NGPU ./run_train.sh --config "$CONFIG" --training.seq_len "$SEQ_LEN" --training.steps "$STEPS" \
    --metrics.no-enable_tensorboard --job.dump_folder "$RUNS/$name" "$@" > "$RUNS/$name.log" 2>&1
  local rc=$?
  "${CAIRN_PYTHON:-python3}" - "$RUNS/$name/metrics.jsonl" "$name" "$rc" "$*" <<'PY' | tee -a "$OUT/summary.txt"
import json, statistics, sys
path, name, rc, flags = sys.argv[1:]
try:
    records = [r for r in map(json.loads, open(path)) if "loss" in r]
except OSError:
    records = []
if not records:
    print(f"{name}: rc={rc}, no steps (see {path.rsplit('/', 1)[0]}.log) {flags}")
    sys.exit()
tail = records[len(records) // 2:]
print(f"{name}: rc={rc} steps={len(records)} loss {records[0]['loss']:.4f}->{records[-1]['loss']:.4f} "
      f"tok/s(median, 2nd half)={statistics.median(r['tokens_per_second'] for r in tail):.0f} "
      f"step_ms={statistics.median(r['step_time_ms'] for r in tail):.1f} "
      f"peak_mem_gib={max(r['memory_gib'] for r in records):.2f} {flags}")
PY
}
# The same global batch of NGPU sequences: CP 1 is FSDP over NGPU ranks with one sequence each;
# CP NGPU splits each of NGPU sequences over all ranks (FSDP over the same ranks).
run cp1 --parallelism.data_parallel_shard_degree "$NGPU" --training.local_batch_size 1
for method in $METHODS; do
  run "cp${NGPU}_$method" --parallelism.context_parallel_degree "$NGPU" --parallelism.data_parallel_shard_degree 1 \
    --training.local_batch_size "$NGPU" --parallelism.context_parallel_attention "$method"
done
