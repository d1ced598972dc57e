#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment in .venv with the pinned requirements and padrec itself.
# Each step prints one line first (the requirements step takes minutes on a cold pip cache).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "setup: $*"; }
if [ -x .venv/bin/python ]; then
  step "reusing the virtual environment in .venv"
else
  step "creating a virtual environment in .venv"
  python3 -m venv .venv
fi
step "upgrading pip"
.venv/bin/python -m pip install -q --upgrade pip
step "installing the pinned requirements (torch CPU, onnxruntime, onnx, test tools; minutes on a cold cache)"
.venv/bin/python -m pip install -q -r requirements.txt
step "installing recbole (its bundled MovieLens-100K files only, no dependencies)"
.venv/bin/python -m pip install -q --no-deps recbole==1.2.1
step "installing the Triton client (no dependencies)"
# the Triton client: its ml-dtypes<=0.5.4 pin only guards bf16 tensors, which padrec does not send
.venv/bin/python -m pip install -q --no-deps tritonclient==2.73.0
step "installing padrec itself (editable)"
.venv/bin/python -m pip install -q --no-deps -e .
# the server's own venv: PyTriton (which ships Triton) pins numpy<2; Triton's Python-backend stub embeds this
# interpreter's shared libpython (`padrec serve` puts its directory first on LD_LIBRARY_PATH)
if [ -x .venv-serve/bin/python ]; then
  step "reusing the server's virtual environment in .venv-serve"
else
  step "creating the server's virtual environment in .venv-serve"
  python3 -m venv .venv-serve
fi
step "installing padrec with the serve extra (PyTriton) in .venv-serve, pinned by requirements-serve.txt"
.venv-serve/bin/python -m pip install -q -c requirements-serve.txt -e '.[serve]'
step "done: run .venv/bin/padrec demo"
