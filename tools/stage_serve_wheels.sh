#!/usr/bin/env bash
# Stages the serving wheels for the GPU machine (Python 3.12, nothing downloadable there) as parts of at most
# 48 MiB (the tree that travels with a call is at most 64 MiB), one ignored folder per part at the repository root: .srv1/ .. .srvN/; the last holds install.sh.
#   nvidia-pytriton    Triton server 2.51 and its Python backend (the stub)
#   numpy 1.26         the stub copies tensors wrongly with numpy 2 (`padrec serve` refuses numpy 2)
#   cupy-cuda13x 13.6  the runtime's device cache; CuPy 14, the machine's own, needs numpy 2 (+ fastrlock, its need)
#   scipy 1.14         CuPy 13 imports SciPy at `import cupy`; the machine's own SciPy is built for numpy 2
#   tritonclient       the load generator's gRPC client (+ python-rapidjson, grpcio, protobuf at the versions its
#                      generated code checks for)
# install.sh joins the parts, installs them into /tmp/srvsite and makes the venv /tmp/srvvenv that sees them first
# (then onnxruntime-gpu's /tmp/gpusite, then python3's own packages); tools/serve_gpu.sh runs in it. Prints the
# `run` calls to make.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
part_mib=${PART_MIB:-48}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp/wheels" \
  nvidia-pytriton==0.7.0 numpy==1.26.4 cupy-cuda13x==13.6.0 fastrlock==0.8.3 scipy==1.14.1 \
  tritonclient==2.73.0 python-rapidjson==1.25 grpcio==1.85.3 protobuf==6.33.5
(cd "$tmp/wheels" && tar cf - ./*.whl) | split -b "${part_mib}M" - "$tmp/srv.part."
rm -rf .srv[0-9]*
parts=("$tmp"/srv.part.*)
n=${#parts[@]}
for i in $(seq 1 "$n"); do
  mkdir -p ".srv$i"
  grep -qx "/.srv$i/" .git/info/exclude 2>/dev/null || echo "/.srv$i/" >> .git/info/exclude
  mv "${parts[$((i-1))]}" ".srv$i/"
done
cat > ".srv$n/install.sh" <<'INSTALL'
# Joins the staged parts (copied to /tmp/srvstage by the earlier calls), installs the wheels into /tmp/srvsite and
# makes /tmp/srvvenv: a venv of python3's base whose packages are /tmp/srvsite, then /tmp/gpusite (onnxruntime-gpu),
# then python3's own. Triton's Python-backend stub sees only the packages of the interpreter that runs
# `padrec serve` (not PYTHONPATH), so numpy 1.26 must come first there, not merely on PYTHONPATH.
set -euo pipefail
mkdir -p /tmp/srvstage/wheels
cat /tmp/srvstage/srv.part.* | tar xf - -C /tmp/srvstage/wheels
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/srvsite \
  /tmp/srvstage/wheels/*.whl
own=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python3 -m venv --without-pip /tmp/srvvenv
site=$(/tmp/srvvenv/bin/python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
printf '%s\n' /tmp/srvsite /tmp/gpusite "import site; site.addsitedir('$own')" > "$site/padrec_serving.pth"
/tmp/srvvenv/bin/python3 -E -c "import importlib.util, numpy, cupy; assert importlib.util.find_spec('pytriton'); \
  print('serving venv /tmp/srvvenv: numpy', numpy.__version__, '| cupy', cupy.__version__)"
echo "serving wheels: $(cd /tmp/srvstage/wheels && ls ./*.whl | tr '\n' ' ')"
INSTALL
sizes=$(du -sm .srv[0-9]* | awk '{printf "%s %s MiB; ", $2, $1}')
echo "staged the serving wheels in $n parts: $sizes"
echo "run calls, in ONE batch after the onnxruntime-gpu parts (each carry one folder):"
for i in $(seq 1 $((n-1))); do
  echo "  carry [\".srv$i\"]: mkdir -p /tmp/srvstage && cp .srv$i/* /tmp/srvstage/"
done
echo "  carry [\".srv$n\"]: mkdir -p /tmp/srvstage && cp .srv$n/srv.part.* /tmp/srvstage/ && bash .srv$n/install.sh &&" \
  "bash tools/serve_gpu.sh ENGINE_DIR"
