#!/usr/bin/env bash
# The platform on a GPU host: run_train.sh on 1 GPU and on 2 GPUs (FSDP, TP, PP; NCCL), then
# bit-exact resumes of async_with_pinned_mem runs on 2 GPUs (writer process without and with a
# device snapshot, writer thread). Logs and a summary go to $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_train_check.sh
# On an offline host with a CUDA torch, carry the wheels in .whl (tyro and its deps):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
set -uo pipefail
OUT="${OUT:-/tmp/cairn-gpu}"; LOGS=/tmp/cairn-logs; mkdir -p "$OUT" "$LOGS"
if [[ -d .whl ]] && ! python3 -c "import tyro" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export CAIRN_PYTHON="${CAIRN_PYTHON:-python3}" PYTHONPATH="$PWD:${PYTHONPATH:-}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "import torch; print('torch', torch.__version__)"; } | tee "$OUT/host.txt"
run() {  # name, NGPU, args...
  local name=$1 ngpu=$2; shift 2
  local t0=$SECONDS
  NGPU=$ngpu ./run_train.sh --job.dump_folder "/tmp/cairn-runs/$name" --metrics.log_freq 10 "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local tps=$(python3 - "$name" <<'PY'
import json, sys, statistics
recs = [json.loads(l) for l in open(f"/tmp/cairn-runs/{sys.argv[1]}/metrics.jsonl") if '"loss"' in l]
tail = recs[len(recs) // 2:]
print(f"steps={len(recs)} loss {recs[0]['loss']:.3f}->{recs[-1]['loss']:.3f} "
      f"tok/s(median 2nd half)={statistics.median(r['tokens_per_second'] for r in tail):.0f} "
      f"step_ms={statistics.median(r['step_time_ms'] for r in tail):.1f} mem_gib={recs[-1]['memory_gib']:.2f}")
PY
)
  echo "$name ngpu=$ngpu rc=$rc wall=$((SECONDS - t0))s $tps $*" | tee -a "$OUT/summary.txt"
}
if [[ "${ONLY:-all}" != resume ]]; then
  run debug_1gpu 1 --training.steps 100
  run debug_2gpu_fsdp 2 --training.steps 100 --parallelism.data_parallel_shard_degree 2
  run debug_2gpu_tp 2 --training.steps 50 --parallelism.tensor_parallel_degree 2
  run debug_2gpu_pp 2 --training.steps 50 --parallelism.pipeline_parallel_degree 2
  run 1b_1gpu 1 --config llama3_1b --training.steps 30 --training.local_batch_size 2 --training.seq_len 2048
fi
# Bit-exact resume with pinned async staging on CUDA (deterministic kernels): a run of 20 steps
# against one stopped after step 10 and resumed. ONLY=resume runs just these (NGPU_RESUME GPUs).
ngpu_resume=${NGPU_RESUME:-2}
resume_check() {  # name, extra flags...
  local name=$1; shift
  local resume=(--training.steps 20 --checkpoint.enable --checkpoint.interval 5 --checkpoint.async_mode async_with_pinned_mem
                --checkpoint.no-last_save_model_only --debug.deterministic
                --parallelism.data_parallel_shard_degree "$ngpu_resume" "$@")
  run "${name}_whole" "$ngpu_resume" "${resume[@]}"
  run "${name}_split" "$ngpu_resume" "${resume[@]}" --debug.exit_after_step 10 --job.description split
  NGPU=$ngpu_resume ./run_train.sh --job.dump_folder "/tmp/cairn-runs/${name}_split" --metrics.log_freq 10 "${resume[@]}" \
    > "$LOGS/${name}_resumed.log" 2>&1
  python3 - "$name" "$ngpu_resume" "$*" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
name, ngpu, flags = sys.argv[1:]
def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"/tmp/cairn-runs/{run}/metrics.jsonl")) if "loss" in r}
a, b = losses(f"{name}_whole"), losses(f"{name}_split")
same = [a[s] == b.get(s) for s in range(11, 21)]
print(f"resume {ngpu} GPU async_with_pinned_mem {flags}: steps 11-20 bitwise equal: {all(same)} ({sum(same)}/10)")
PY
}
resume_check resume --checkpoint.device_snapshot off
resume_check resume_snapshot --checkpoint.device_snapshot on
resume_check resume_thread --checkpoint.async_writer thread --checkpoint.device_snapshot off
for d in /tmp/cairn-runs/*/; do cp "$d/metrics.jsonl" "$LOGS/$(basename "$d").metrics.jsonl"; done
tar czf "$OUT/logs.tgz" -C "$LOGS" .
