#!/usr/bin/env bash
# Sharded training (FSDP2) against one process, for every trainer, then the kill-and-resume check sharded.
#
#   bash bench/dist/check.sh [OUTDIR] [PROCESSES]     (default /tmp/rlhfkit-dist, 2 processes; ~4 min on 2 CPUs)
#
# Prints, per trainer, the max difference of the saved weights and of the logged losses between 1 process
# and PROCESSES sharded ones, and each process's MiB of parameters + gradients + AdamW state (see
# bench/dist/check.py). On a GPU machine: EXTRA_SETS="train.device=cuda" bash bench/dist/check.sh OUT 2.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUTDIR=${1:-/tmp/rlhfkit-dist}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" bench/dist/check.py "$OUTDIR" --processes "${2:-2}"
