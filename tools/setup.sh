#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment in .venv with the pinned requirements and padrec itself.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps recbole==1.2.1
.venv/bin/python -m pip install -q --no-deps -e .
