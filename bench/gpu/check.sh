#!/usr/bin/env bash
# One-shot GPU check of rlhfkit: no network, under 8 minutes on an H200.
#
#   bash bench/gpu/check.sh OUTDIR [WHEELS_DIR]
#
# WHEELS_DIR (made here, with network, by `bash bench/gpu/fetch_wheels.sh bench/gpu/carry`): TRL 1.16.0 and
# the packages of its the GPU image lacks, plus SmolLM2's tokenizer in WHEELS_DIR/tokenizer. Through the
# device tool: carry ["bench/gpu/carry"], command `bash bench/gpu/check.sh $OUT bench/gpu/carry`, timeout
# 540 s. Steps, each of which may fail without stopping the next (its error goes to the results):
#   1. pip-install the carried wheels into /tmp/site ($SITE) (--no-deps: exactly those), then check imports;
#   2. `pytest -m cuda` over tests/ (the CUDA tests; modules that cannot be imported there are reported,
#      not fatal), into OUTDIR/pytest.log;
#   3. bench/gpu/gpu_bench.py: rollout tokens/s and SFT / RM / DPO / GRPO step times against TRL for two
#      random-weight model shapes, into OUTDIR/results.json and OUTDIR/results.md (see its docstring); with
#      the peak GPU memory of every rollout variant and trainer (each stage's also in check.log), and the
#      sampler/trainer log-prob mismatch the rlhfkit trainers log (bench/gpu/gpu_report.py).
# GPU_CHECK_BUDGET (seconds, default 450) bounds the whole script; the bench skips the stages that would
# pass it, saying so. Output files: results.json, results.md, pytest.log, check.log. GPU_BENCH_ARGS adds
# options to the bench (`--dry-run`: the CPU rehearsal of the whole script, tiny model, ~1 min).
set -uo pipefail
OUTDIR=${1:?usage: bench/gpu/check.sh OUTDIR [WHEELS_DIR]}
WHEELS=${2:-}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-450}
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
cd "$(dirname "$0")/../.."
mkdir -p "$OUTDIR"
LOG="$OUTDIR/check.log"
log() { echo "[check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export RLHFKIT_CACHE=/tmp/rlhfkit-cache

log "start: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH="$SITE"
        log "wheels installed: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
    else
        log "wheel install FAILED (see above); TRL stages will fail"
    fi
else
    log "no wheels given: TRL stages will fail unless TRL is installed"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
$PY - >>"$LOG" 2>&1 <<'PYEOF'
import importlib
for name in ("torch", "transformers", "accelerate", "peft", "datasets", "trl", "pyarrow", "fsspec", "rlhfkit"):
    try:
        m = importlib.import_module(name)
        print(f"import {name}: {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"import {name}: FAILED {type(exc).__name__}: {exc}")
PYEOF
tail -n 9 "$LOG"

log "pytest -m cuda"
timeout 150 $PY -m pytest -m cuda -q -p no:cacheprovider --continue-on-collection-errors -o addopts="" -rfE \
    tests/ >"$OUTDIR/pytest.log" 2>&1
PYTEST_RC=$?
log "pytest exit $PYTEST_RC: $(tail -n 1 "$OUTDIR/pytest.log")"

NOW=$(date +%s)
TOKENIZER=""
[ -n "$WHEELS" ] && [ -f "$WHEELS/tokenizer/tokenizer.json" ] && TOKENIZER="$WHEELS/tokenizer"
log "bench (deadline in $((START + BUDGET - NOW)) s)"
$PY bench/gpu/gpu_bench.py --out "$OUTDIR" --tokenizer "$TOKENIZER" --deadline $((START + BUDGET)) \
    --pytest-log "$OUTDIR/pytest.log" --pytest-rc "$PYTEST_RC" \
    --command "bash bench/gpu/check.sh OUTDIR ${WHEELS:-}" ${GPU_BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
log "done: $OUTDIR/results.md"
