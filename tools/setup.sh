#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment in .venv with the pinned requirements and padrec itself.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps recbole==1.2.1
# the Triton client: its ml-dtypes<=0.5.4 pin only guards bf16 tensors, which padrec does not send
.venv/bin/python -m pip install -q --no-deps tritonclient==2.73.0
.venv/bin/python -m pip install -q --no-deps -e .
# the server's own venv: PyTriton (which ships Triton) pins numpy<2; Triton's Python-backend stub embeds this
# interpreter's shared libpython (`padrec serve` puts its directory first on LD_LIBRARY_PATH)
[ -x .venv-serve/bin/python ] || python3 -m venv .venv-serve
.venv-serve/bin/python -m pip install -q -e '.[serve]'
