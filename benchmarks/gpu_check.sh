#!/usr/bin/env bash
# One prepared check for a machine with NVIDIA GPUs, in at most ~8 minutes on one H100-class GPU:
#   (a) the tests that exercise CUDA (tests/test_cuda.py: placement, bf16, fp16 with one GradScaler
#       per model, cuDNN autotuning, pinned-memory copies, torch.compile; NCCL with DDP, FSDP and
#       DeepSpeed when it sees 2 or more GPUs),
#   (b) the throughput sweep of every model of benchmarks/common.py at one GPU, and the DCGAN
#       example's loop against gan_dist's (benchmarks/seed_loop.py),
#   (c) results in benchmarks/results/gpu_<gpu name>_*.{json,md}, printing as it goes.
#
#   benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --dry-run    # print the commands only
#   benchmarks/gpu_check.sh --smoke      # the same commands with tiny settings (runs on a CPU)
#
# Environment: PYTHON (default python3), GPU_CHECK_OUT (default benchmarks/results),
# GPU_CHECK_BUDGET (seconds, default 480): a step never runs past it; steps that find it spent
# are skipped and listed at the end.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

MODE=full
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --smoke) MODE=smoke ;;
  -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
  *) echo "gpu_check.sh: unknown option $1 (use --dry-run, --smoke or nothing)" >&2; exit 2 ;;
esac

PYTHON="${PYTHON:-python3}"
OUT="${GPU_CHECK_OUT:-benchmarks/results}"
START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET:-480}"
FAILED=()
SKIPPED=()

if [ "$MODE" = smoke ]; then  # tiny and CPU-friendly: checks that every command and option works
  MODELS="dcgan-32"; COMPILE_MODEL=""; BATCH=4; TIMING=(--warmup 1 --repeats 1 --iters 1)
  SWEEP=(--precision fp32 --no-channels-last --no-compile); SEED_TIMING=(--warmup 1 --repeats 1 --iters 1)
  TEST_TIMEOUT=300
else
  MODELS="$("$PYTHON" -c 'from benchmarks.common import MODELS; print(" ".join(MODELS))' 2>/dev/null || echo dcgan-64)"
  COMPILE_MODEL="dcgan-64"; BATCH=64; TIMING=(--warmup 3 --repeats 3 --iters 10)
  SWEEP=(--no-compile); SEED_TIMING=(--warmup 3 --repeats 5 --iters 10)
  TEST_TIMEOUT=270
fi

gpu_name() {  # a file-name-safe name of GPU 0, e.g. nvidia_h100_80gb_hbm3; "cpu" without one
  local name
  name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
  [ -n "$name" ] || name="cpu"
  echo "$name" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '_' | sed 's/^_*//; s/_*$//'
}
GPU="$(gpu_name)"
NGPU="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
PREFIX="$OUT/gpu_${GPU}"

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

# step NAME LIMIT_S CMD...: print the command, run it (unless --dry-run) with a time limit, its
# output shown as it comes and kept in $LOG; a failure is remembered and the next step runs, so
# that one broken part does not hide the others' results
LOGS="$(mktemp -d)"; trap 'rm -rf "$LOGS"' EXIT
LOG=""
step() {
  local name="$1" limit="$2"; shift 2
  say "$name: $*"
  [ "$MODE" = dry ] && return 0
  local t0 code left
  t0=$(date +%s)
  left=$(( BUDGET - (t0 - START) ))
  if [ "$left" -lt 20 ]; then
    say "$name: skipped, the ${BUDGET}s budget is spent"; SKIPPED+=("$name"); return 0
  fi
  [ "$limit" -le "$left" ] || limit="$left"
  LOG="$LOGS/${name// /_}.log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOG"
  code=${PIPESTATUS[0]}
  say "$name: exit $code after $(( $(date +%s) - t0 ))s"
  [ "$code" -eq 0 ] || FAILED+=("$name (exit $code)")
}

say "mode=$MODE gpu=$GPU gpus=${NGPU:-0} results=${PREFIX}_*"
[ "$MODE" = dry ] || mkdir -p "$OUT"
if [ "$MODE" = full ] && [ "${NGPU:-0}" -lt 1 ]; then
  echo "gpu_check.sh: nvidia-smi sees no GPU here (use --smoke to try the commands on a CPU)" >&2
  exit 2
fi
[ "$MODE" = dry ] || { nvidia-smi 2>/dev/null | head -n 15; "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())'; }

# (a) the CUDA tests (the 2-GPU ones skip with fewer GPUs); their summary also goes to Markdown
step "tests" "$TEST_TIMEOUT" "$PYTHON" -m pytest tests/test_cuda.py -q -rA -p no:cacheprovider
if [ "$MODE" != dry ]; then
  { echo "# tests/test_cuda.py on $GPU ($NGPU GPUs)"; echo; echo '```'; grep -E '^(PASSED|FAILED|SKIPPED|ERROR)| (passed|failed|skipped|error)' "$LOG"; echo '```'; } > "${PREFIX}_tests.md"
fi

# (b) throughput at one GPU: the headline model and the seed loop first, then its compiled rows,
# then every other model of benchmarks/common.py (without compile)
first="${COMPILE_MODEL:-${MODELS%% *}}"
throughput() {  # MODEL LIMIT SUFFIX ARGS...
  local model="$1" limit="$2" suffix="$3"; shift 3
  local tag="${model//-/}${suffix}"
  step "throughput $model${suffix//_/ }" "$limit" "$PYTHON" benchmarks/throughput.py --model "$model" \
    --batch-size "$BATCH" "$@" "${TIMING[@]}" --json "${PREFIX}_throughput_${tag}.json" --md "${PREFIX}_throughput_${tag}.md"
}
throughput "$first" 120 "" "${SWEEP[@]}"
step "seed loop $first" 90 "$PYTHON" benchmarks/seed_loop.py --model "$first" --batch-size "$BATCH" \
  "${SEED_TIMING[@]}" --json "${PREFIX}_seed_loop_${first//-/}.json" --md "${PREFIX}_seed_loop_${first//-/}.md"
[ -z "$COMPILE_MODEL" ] || throughput "$COMPILE_MODEL" 150 "_compiled" --precision bf16,fp16 --channels-last --compile
for model in $MODELS; do
  [ "$model" = "$first" ] || throughput "$model" 90 "" "${SWEEP[@]}"
done

say "done in $(( $(date +%s) - START ))s"
if [ "$MODE" != dry ]; then
  say "results:"; ls -1 "${PREFIX}"_* 2>/dev/null
fi
[ "${#SKIPPED[@]}" -eq 0 ] || say "SKIPPED (time budget): ${SKIPPED[*]}"
if [ "${#FAILED[@]}" -gt 0 ]; then
  say "FAILED: ${FAILED[*]}"
  exit 1
fi
