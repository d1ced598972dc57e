#!/usr/bin/env bash
# GPU machine wrapper for tools/gpu_bench.py: data package from the carried wheel, onnxruntime-gpu from the
# staged parts (installed into /tmp/gpusite beforehand), results under $OUT.
set -euo pipefail
[ -d /tmp/site/recbole ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_in/wheels/*.whl
export PYTHONPATH=/tmp/gpusite:/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 tools/gpu_bench.py --out "$OUT" "$@" 2>&1 | grep --line-buffered -v "it/s]" | tee "$OUT/gpu_bench.log" | tail -60
