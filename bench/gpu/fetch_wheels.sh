#!/usr/bin/env bash
# Fetch here (with network) what bench/gpu/check.sh needs on the GPU machine (no network there):
# TRL 1.16.0 and the packages of its that the machine's image lacks, as wheels for its Python 3.12,
# plus SmolLM2-135M's tokenizer files (the models there are random-weight, the tokenizer is real).
#
#   bash bench/gpu/fetch_wheels.sh bench/gpu/carry          # ~6 MiB; bench/gpu/carry/ is git-ignored
#
# Then, on the device tool: carry ["bench/gpu/carry"], command `bash bench/gpu/check.sh $OUT bench/gpu/carry`.
#
# Which wheels: trl's and datasets' Requires-Dist checked against the image's package list
# (/work/.library/device/KINDS.md: accelerate, transformers, huggingface-hub, pandas, pyarrow, psutil,
# pyyaml, xxhash, fsspec, requests, httpx, tqdm are there; datasets, dill, multiprocess are not).
# datasets 4.7.0 rather than the newest 5.x: 5.x wants pyarrow >= 24, which the image may not have; 4.7.0
# wants >= 21, as TRL does. Installed with --no-deps, so exactly these versions and nothing else.
set -euo pipefail
DEST=${1:?usage: fetch_wheels.sh DEST_DIR}
PY=${PY:-python3}
PY_VERSION=${PY_VERSION:-3.12}
TOKENIZER_FROM=${TOKENIZER_FROM:-$HOME/.cache/rlhfkit/models/smollm2-135m-instruct}
mkdir -p "$DEST/tokenizer"
WHEELS=(trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
if [ -f "$TOKENIZER_FROM/tokenizer.json" ]; then
    for f in tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json; do
        [ -f "$TOKENIZER_FROM/$f" ] && cp "$TOKENIZER_FROM/$f" "$DEST/tokenizer/"
    done
else
    echo "no tokenizer at $TOKENIZER_FROM (run 'rlhfkit' once to convert SmolLM2, or set TOKENIZER_FROM);" \
        "check.sh will fall back to rlhfkit's character-level tiny tokenizer" >&2
fi
ls -la "$DEST" "$DEST/tokenizer"
du -sh "$DEST"
