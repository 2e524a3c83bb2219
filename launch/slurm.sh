#!/usr/bin/env bash
# Train on a SLURM cluster: one `accelerate launch` per node, started by srun.
#
#   sbatch [--nodes N] launch/slurm.sh [--config FILE] [key=value ...]
#
# The job's output goes to slurm-<job name>-<job id>.out in the submit directory (SLURM opens
# it before this script runs, so it must not name a folder that may not exist).
#
# Near the time limit SLURM sends USR1 to this script (--signal=B:USR1@...); on preemption it
# sends TERM. Either way every rank finishes its step, writes a checkpoint and exits with the
# retry code; this script then requeues the job, and the requeued job resumes from that
# checkpoint by itself (run.dir defaults to runs/slurm-<job id>, which survives a requeue).
#
# ---- defaults: edit here, or override on the sbatch command line -------------------------
#SBATCH --job-name=gan_dist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# GPU clusters: request the node's GPUs, e.g.
##SBATCH --gpus-per-node=8
# ------------------------------------------------------------------------------------------
# Environment knobs: PYTHON (interpreter with gan_dist installed), NPROC_PER_NODE (processes
# per node; default: the GPUs SLURM gave us, else 1), GAN_DIST_REPO (checkout; default: the
# submit directory), MASTER_PORT (default: derived from the job id).
set -uo pipefail

REPO="${GAN_DIST_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
PYTHON="${PYTHON:-python3}"
EXIT_RETRY=75   # gan_dist.train's code for "checkpoint written, run me again"
SUBMIT_DIR="${SLURM_SUBMIT_DIR:-$(pwd)}"
# Relative paths (--config, data.urls, run.dir) mean the directory the job was submitted from.
cd "$SUBMIT_DIR" || { echo "slurm.sh: cannot enter $SUBMIT_DIR" >&2; exit 1; }
[ -f "$REPO/gan_dist/train.py" ] || { echo "slurm.sh: no gan_dist checkout at $REPO (set GAN_DIST_REPO)" >&2; exit 1; }
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

log() { echo "[slurm.sh $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*" >&2; }

# Fail fast on a config mistake (unknown key, missing file), before any node starts.
if ! "$PYTHON" -m gan_dist.train --print-config "$@" > /dev/null; then
  log "config rejected (see the error above); not starting"
  exit 2
fi

# A stable run directory across requeues, unless the user chose one.
ARGS=("$@")
if ! printf '%s\n' "$@" | grep -q '^run\.dir='; then
  ARGS+=("run.dir=$SUBMIT_DIR/runs/slurm-${SLURM_JOB_ID}")
fi

NNODES="${SLURM_JOB_NUM_NODES:-1}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE="${SLURM_GPUS_ON_NODE:-0}"
  [ "$NPROC_PER_NODE" -gt 0 ] 2>/dev/null || NPROC_PER_NODE=1
fi
WORLD=$(( NNODES * NPROC_PER_NODE ))
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
export MASTER_ADDR MASTER_PORT
log "nodes=$NNODES processes/node=$NPROC_PER_NODE world=$WORLD master=$MASTER_ADDR:$MASTER_PORT"

LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_machines "$NNODES" --num_processes "$WORLD"
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
        --rdzv_backend static --same_network --mixed_precision no --dynamo_backend no)
[ "$WORLD" -gt 1 ] && LAUNCH+=(--multi_gpu)

STOP=""
on_signal() {  # USR1: time limit near; TERM: preemption. Ranks save and exit with EXIT_RETRY.
  STOP="$1"
  log "received $1: asking every rank to checkpoint and stop"
  scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || kill -TERM "$SRUN_PID" 2>/dev/null
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# One launcher per node; each inserts its own node rank before the script path.
# shellcheck disable=SC2016  # $SLURM_NODEID must expand on each node, not here
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  launch=(); while [ "$1" != "--" ]; do launch+=("$1"); shift; done; shift
  exec "${launch[@]}" --machine_rank "$SLURM_NODEID" "$@"' _ "${LAUNCH[@]}" -- "$REPO/gan_dist/train.py" "${ARGS[@]}" &
SRUN_PID=$!

code=0
while :; do
  wait "$SRUN_PID"; code=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break   # a trapped signal interrupted wait: keep waiting
done

if [ "$code" -eq 0 ]; then
  log "training finished"
  exit 0
fi
if [ -n "$STOP" ] || [ "$code" -eq "$EXIT_RETRY" ]; then
  log "stopped by $STOP with a checkpoint; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  log "scontrol requeue failed"
  exit "$EXIT_RETRY"
fi
log "training failed with exit code $code"
exit "$code"
