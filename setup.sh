#!/usr/bin/env bash
# Create .venv with the toolkit (editable) and its test dependencies. Safe to re-run.
# torch is installed first and pinned (2.13.0, the CPU build on local disk) so that no later
# requirement can make the resolver pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c "import mobilevlm.export, mobilevlm.benchmarks, torch; print('mobilevlm ready: torch', torch.__version__)"
