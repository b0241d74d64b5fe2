#!/usr/bin/env bash
# posttrain on one lent GPU, without vLLM or Ray: the trainer path, the weight hand-off and the MoE
# kernels, in about 8 minutes (GPU_CHECK_TOTAL_S, default 470 s, kept by the script).
#
#   bash bench/gpu_check.sh [OUT_DIR]     # device run; OUT_DIR default bench/results
#   bash bench/gpu_check.sh --smoke       # CPU, gloo, tiny shapes, into a temporary directory (CI)
#
# Each part runs in its own process under its own timeout and writes OUT_DIR/gpu_<part>.json
# (name, device, date, ok, figures) as soon as it ends; a part that crashes or times out before
# writing gets a record with ok=false, its exit status and the tail of its log. Exit status: 0 when
# every part that ran is ok, 1 when any failed, 2 when not run from the repository root.
#
# Parts, in order:
#   fsdp_bf16        FSDP2 on nccl at world size 1, bf16 mixed precision, small Llama: loss vs fp32 CPU
#   packing          packed attention path (also shared prefixes) vs padded: per-token logprobs
#   logprob_memory   chunked logprobs: memory beyond the logits flat in the batch (max_memory_allocated)
#   offload          trainer offload releases the bytes it reports (memory_allocated); step after onload
#   ipc_roundtrip    python bench/gpu/ipc_roundtrip.py OUT_DIR (weight-sync side; missing = failed)
#   probe_floor      python bench/gpu/probe_floor.py OUT_DIR   (weight-sync side; missing = failed)
#   moe              bash bench/moe/gpu_check.sh with GPU_CHECK_OUT=OUT_DIR/moe (kernels; last, takes
#                    the time left). Skipped in --smoke: its CPU mode interprets every Triton kernel
#                    and takes up to 25 minutes (tests/kernels cover it in CI).
set -u
START=$(date +%s)
SMOKE=0
ARGS=()
for a in "$@"; do
  if [ "$a" = "--smoke" ]; then SMOKE=1; else ARGS+=("$a"); fi
done
if [ ! -f posttrain/engine/trainer.py ]; then echo "run from the posttrain repository root" >&2; exit 2; fi
REPO=$(pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
[ -x "$REPO/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$REPO/.venv/bin/python"
if [ "$SMOKE" = 1 ]; then
  OUT=${ARGS[0]:-$(mktemp -d /tmp/gpu_check_smoke.XXXXXX)}
  TOTAL=${GPU_CHECK_TOTAL_S:-400}
  FLAG=--smoke
  export GPU_CHECK_SMOKE=1 CUDA_VISIBLE_DEVICES=""
else
  OUT=${ARGS[0]:-bench/results}
  TOTAL=${GPU_CHECK_TOTAL_S:-470}
  FLAG=
fi
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline TRANSFORMERS_VERBOSITY=error
echo "[gpu_check] out: $OUT  smoke: $SMOKE  budget: ${TOTAL}s"

left() { echo $(( TOTAL - ($(date +%s) - START) )); }
FAILED=0

# record_failure PART RC SECONDS CAP LOG: the JSON of a part that ended without writing its own
record_failure() {
  local part=$1 rc=$2 secs=$3 cap=$4 log=$5 why
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then why="timed out after ${cap}s"; else why="exited with status $rc"; fi
  "$PY" - "$OUT/gpu_$part.json" "$part" "$why" "$rc" "$secs" "$log" "$SMOKE" <<'PYEOF'
import datetime, json, sys
path, part, why, rc, secs, log, smoke = sys.argv[1:]
try:
    tail = open(log, errors="replace").read()[-3000:]
except OSError:
    tail = ""
device = "cpu"
if smoke != "1":
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        device = "unknown"
json.dump({"name": part, "device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "ok": False, "error": why, "rc": int(rc), "seconds": int(secs), "log_tail": tail}, open(path, "w"), indent=1)
PYEOF
}

# part "NAME [NAME...]" CAP cmd...: run under min(CAP, time left); each NAME's JSON must be written
# during the run (the parts of one process write theirs one after another)
part() {
  local names=$1 cap=$2; shift 2
  local l t s rc e name log
  l=$(left); t=$(( cap < l ? cap : l ))
  log="$OUT/logs/${names// /+}.txt"
  for name in $names; do rm -f "$OUT/gpu_$name.json"; done
  if [ "$t" -lt 10 ]; then
    for name in $names; do record_failure "$name" 124 0 0 "$log"; echo "[gpu_check] $name: FAILED (no time left)"; done
    FAILED=1; return
  fi
  s=$(date +%s)
  timeout -k 5 "$t" "$@" > "$log" 2>&1
  rc=$?
  e=$(( $(date +%s) - s ))
  for name in $names; do
    if [ ! -f "$OUT/gpu_$name.json" ]; then record_failure "$name" "$rc" "$e" "$t" "$log"; fi
    if "$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get('ok') is not False else 1)" "$OUT/gpu_$name.json"; then
      echo "[gpu_check] $name: ok (${e}s, rc $rc)"
    else
      FAILED=1; echo "[gpu_check] $name: FAILED (${e}s, rc $rc; see $OUT/gpu_$name.json)"
    fi
  done
  if [ "$rc" != 0 ] && [ "$FAILED" = 0 ]; then FAILED=1; echo "[gpu_check] $names: exited $rc"; fi
}

# external PART SCRIPT CAP: a python part owned elsewhere; a missing script is a failure
external() {
  local name=$1 script=$2 cap=$3
  if [ ! -f "$script" ]; then
    rm -f "$OUT/gpu_$name.json"
    echo "$script is missing" > "$OUT/logs/$name.txt"
    record_failure "$name" 127 0 0 "$OUT/logs/$name.txt"; FAILED=1
    echo "[gpu_check] $name: FAILED ($script is missing)"; return
  fi
  part "$name" "$cap" "$PY" "$script" "$OUT"
}

if [ "$SMOKE" = 1 ]; then  # one process for the four (one import of torch + transformers, ~10 s, not four)
  part "fsdp_bf16 packing logprob_memory offload" 150 "$PY" bench/gpu/trainer_checks.py "$OUT" fsdp_bf16 packing logprob_memory offload $FLAG
else  # a process each: a crash or a hang costs one part, and each starts with a clean CUDA allocator
  for p in fsdp_bf16:120 packing:60 logprob_memory:60 offload:90; do
    part "${p%%:*}" "${p##*:}" "$PY" bench/gpu/trainer_checks.py "$OUT" "${p%%:*}" $FLAG
  done
fi
external ipc_roundtrip bench/gpu/ipc_roundtrip.py 90
external probe_floor bench/gpu/probe_floor.py 120

if [ "$SMOKE" = 1 ]; then
  "$PY" - "$OUT/gpu_moe.json" <<'PYEOF'
import datetime, json, sys
json.dump({"name": "moe", "device": "cpu", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "ok": None, "skipped": "smoke mode: bench/moe/gpu_check.sh interprets every Triton kernel on CPU (up to 25 min); "
           "tests/kernels check the kernels in CI"}, open(sys.argv[1], "w"), indent=1)
PYEOF
  echo "[gpu_check] moe: skipped in smoke mode"
else
  l=$(left); MOE_BUDGET=$(( l - 20 ))
  if [ "$MOE_BUDGET" -lt 60 ]; then MOE_BUDGET=60; fi
  s=$(date +%s)
  GPU_CHECK_OUT="$OUT/moe" GPU_CHECK_BUDGET_S=$MOE_BUDGET timeout -k 10 $(( MOE_BUDGET + 30 )) bash bench/moe/gpu_check.sh > "$OUT/logs/moe.txt" 2>&1
  rc=$?; e=$(( $(date +%s) - s ))
  "$PY" - "$OUT/gpu_moe.json" "$rc" "$e" "$MOE_BUDGET" "$OUT/moe" <<'PYEOF'
import datetime, json, os, sys
path, rc, secs, budget, moe_out = sys.argv[1:]
import torch
summary = os.path.join(moe_out, "summary.json")
record = {"name": "moe", "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "ok": rc == "0",
          "rc": int(rc), "seconds": int(secs), "budget_s": int(budget), "out": moe_out}
if os.path.isfile(summary):
    record["summary"] = json.load(open(summary))
json.dump(record, open(path, "w"), indent=1)
PYEOF
  if [ "$rc" = 0 ]; then echo "[gpu_check] moe: ok (${e}s)"; else FAILED=1; echo "[gpu_check] moe: FAILED (rc $rc, ${e}s)"; fi
fi

echo "[gpu_check] done in $(( $(date +%s) - START ))s; records: $OUT/gpu_*.json"
exit $FAILED
