#!/usr/bin/env bash
# The serving run on the GPU machine, in one call:
#   bash tools/serve_gpu.sh ENGINE_DIR [--device cuda|cpu] [more tools/serve_load.py options]
# Needs onnxruntime-gpu in /tmp/gpusite (the GPU wheels' install.sh) and the serving venv /tmp/srvvenv
# (tools/stage_serve_wheels.sh's install.sh: numpy 1.26, PyTriton, CuPy 13, tritonclient). Checks first (tools/serve_preflight.py: one line per problem), then
# tools/serve_load.py: the in-process batch-1 list time, `padrec serve` on loopback, concurrency 1, 4, 16, 64 with
# speculate auto and off over gRPC. Writes $OUT/serve_gpu_<card>.json|png (card: h200, h100, ...) and serve_gpu.log.
# `--device cpu` with a small engine directory runs the same steps on a CPU machine (a smoke test of this script).
set -uo pipefail
engines=${1:?usage: bash tools/serve_gpu.sh ENGINE_DIR [--device cuda|cpu] [serve_load options]}
shift
device=cuda
if [ "${1:-}" = "--device" ]; then device=$2; shift 2; fi
out=${OUT:-$PWD/.serve_gpu_out}
mkdir -p "$out"
log="$out/serve_gpu.log"
py=python3
[ -x /tmp/srvvenv/bin/python3 ] && py=/tmp/srvvenv/bin/python3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# CuPy 13 opens libnvrtc and libcudart through the loader: the CUDA library folders this machine has (the toolkit's,
# the nvidia-* wheels') go on LD_LIBRARY_PATH, which the server and its stub inherit
cuda_libs=$("$py" - <<'PY'
import glob, os
dirs = ["/usr/local/cuda/lib64"]
try:
    import nvidia
    dirs += [d for root in nvidia.__path__ for d in sorted(glob.glob(os.path.join(root, "*", "lib")))]
except ImportError:
    pass
print(":".join(d for d in dirs if glob.glob(os.path.join(d, "libnvrtc.so*")) + glob.glob(os.path.join(d, "libcudart.so*"))))
PY
)
[ -n "$cuda_libs" ] && export LD_LIBRARY_PATH=$cuda_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if [ "$device" = cuda ]; then
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -o -i -E '[a-z][0-9]{2,3}' | head -1 | tr 'A-Z' 'a-z')
  name=serve_gpu_${card:-gpu}
else
  name=serve_cpu_smoke
fi
echo "serve_gpu: $py, engines $engines, device $device, CUDA library folders: ${cuda_libs:-none found}" | tee "$log"
"$py" tools/serve_preflight.py --device "$device" 2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "serve_gpu: stopped before the run (see the FAILED line above)"; exit 1; }
# a 0.2 ms batching window: a lone request waits that long for company (a 0.5B list takes 40-75 ms on an H200; the CPU
# default, 2 ms, would add 3-5% at concurrency 1; under load, requests queue during a decode anyway);
# options after ENGINE_DIR override these
"$py" tools/serve_load.py --engines "$engines" --device "$device" --protocol grpc --requests 800 --passes 4 \
  --level-time-s 48 --max-queue-delay-us 200 --ready-s 300 --out "$out/$name" "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
echo "serve_gpu: exit $status; results in $out/$name.json"
exit "$status"
