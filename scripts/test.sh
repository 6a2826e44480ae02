#!/usr/bin/env bash
# The test command: every CPU tier; GPU tests skip themselves without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# Keep the checkout's root off sys.path in pytest and every process a test starts: its kernels/
# folder would shadow the installed ``kernels`` package that transformers imports.
export PYTHONSAFEPATH=1
exec .venv/bin/python -m pytest -q -ra "$@"
