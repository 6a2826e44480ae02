# Source this on a lent GPU machine, from the repository root, before the GPU tests or
# benchmarks: it maps the folders onto the ``baton.*`` namespace (no install needed),
# installs wheels carried in .whl/ into /tmp/site (grpcio, protobuf: the image's may be
# older; for the gateway and the e2e tests also fastapi, starlette, uvicorn, sse-starlette,
# h11, click, anyio, httpx, httpcore, prometheus-client, pydantic, redis, xxhash, xgrammar,
# openai with httpx2 and jiter, pytest-asyncio for the async GPU tests, py-spy for serve_gpu.sh's
# PYSPY_DIR (on PATH from /tmp/site/bin), and what they need: the image lacks uvicorn at least),
# points the tests at the demo checkpoint carried in .carry/, and keeps the working
# directory off sys.path, as scripts/test.sh does (kernels/ would shadow the ``kernels``
# package that newer transformers imports).
mkdir -p /tmp/b/baton
for d in engine kernels kvtransfer protos services; do ln -sfn "$PWD/$d" "/tmp/b/baton/$d"; done
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:/tmp/b PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 BATON_DEMO_MODEL=$PWD/.carry/shakespeare-llama-5m
