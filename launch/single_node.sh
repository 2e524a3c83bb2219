#!/usr/bin/env bash
# Train on one machine: one process per visible GPU, or NPROC CPU processes where there is no GPU.
#
#   launch/single_node.sh [--config FILE] [key=value ...]
#   NPROC=2 launch/single_node.sh train.steps=30          # 2 processes (CPU, or 2 of the GPUs)
#   ACCELERATE_CONFIG=configs/accelerate/fsdp.yaml launch/single_node.sh
#
# Every argument goes to gan_dist/train.py unchanged. The exit code is train.py's.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

NGPU="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
if [ "$NGPU" -gt 0 ]; then
  NPROC="${NPROC:-$NGPU}"
else
  NPROC="${NPROC:-1}"
fi
PORT="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

ARGS=(--num_machines 1 --num_processes "$NPROC" --main_process_port "$PORT" --dynamo_backend no)
if [ -n "${ACCELERATE_CONFIG:-}" ]; then
  ARGS=(--config_file "$ACCELERATE_CONFIG" "${ARGS[@]}")
else
  ARGS+=(--mixed_precision no)   # precision comes from gan_dist's config (train.precision)
fi
if [ "$NPROC" -gt 1 ] && [ -z "${ACCELERATE_CONFIG:-}" ]; then
  ARGS+=(--multi_gpu)            # on a CPU machine this starts NPROC processes; gan_dist joins them with gloo
fi
echo "single_node: $NPROC process(es), $NGPU GPU(s), port $PORT" >&2
exec "$PYTHON" -m accelerate.commands.launch "${ARGS[@]}" "$REPO/gan_dist/train.py" "$@"
