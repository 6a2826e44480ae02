#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with Baton and its test tools,
# plus Debian's redis-server when no redis-server is on the PATH.
#   TORCH_SPEC   the torch requirement to install first (default: torch==2.13.0;
#                on a GPU machine set it to the CUDA build you want)
#   UCX_EXTRA    the ucxx build to install (default: ucx, for CUDA 12 and CPU-only machines;
#                ucx-cu13 beside a CUDA 13 torch)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server
    else
        echo "install.sh: redis-server not found; install it, or give baton a REDIS_URL" >&2
    fi
fi

python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch first, so that no dependency's loose requirement pulls a multi-GB CUDA build.
pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -e ".[dev,${UCX_EXTRA:-ucx}]"
echo "installed: run '.venv/bin/baton up' to serve, 'scripts/test.sh' to test"
