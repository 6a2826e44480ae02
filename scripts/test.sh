#!/usr/bin/env bash
# The test command: every CPU tier; GPU tests skip themselves without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q -ra "$@"
