#!/usr/bin/env bash
# The disaggregated path on one GPU: a prefill and a decode worker (separate
# processes, KV handed over gRPC, or UCX with KV_TRANSPORT=ucx) and the gateway
# with static addresses (no Redis: load-only routing; REDIS_URL=URL gives every process
# that Redis, which --api-server-count above 1 needs), then a greedy check and the
# serving benchmark.
#   bench/serve_gpu.sh MODEL_DIR DTYPE [bench_serving.py flags...]   (DEVICE=cpu to try it without a GPU)
# ROUNDS=N runs the benchmark N times against the same processes (the first round also
# meets whatever the workers' start-up did not warm); GATEWAY_FLAGS adds gateway flags
# (e.g. "--max-local-prefill-length 256"), WORKER_FLAGS both workers' (e.g. "--stream-interval 8"). PYSPY_DIR=DIR runs each process under py-spy (on
# PATH) and leaves its samples there, one raw flamegraph per service, by process and thread (prefill.txt,
# decode.txt, gateway.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1 dtype=$2; shift 2
py=${PYTHON:-python3}
read -ra gateway_flags <<< "${GATEWAY_FLAGS:-}"
read -ra worker_flags <<< "${WORKER_FLAGS:-}"
redis=()
[[ -n "${REDIS_URL:-}" ]] && redis=(--redis-url "$REDIS_URL")
common=(--model "$model" --device "${DEVICE:-cuda}" --dtype "$dtype" --kv-cache-memory-mb 4096 --max-num-seqs 128
        "${redis[@]}" "${worker_flags[@]}")
pids=() stop=TERM
launch() {  # NAME COMMAND...: start one service in the background
    local name=$1; shift
    if [[ -n "${PYSPY_DIR:-}" ]]; then
        mkdir -p "$PYSPY_DIR"; stop=INT
        py-spy record --nonblocking --threads --subprocesses --rate 100 --format raw --output "$PYSPY_DIR/$name.txt" -- "$@" &
    else
        "$@" &
    fi
    pids+=($!)
}
# py-spy writes its samples on SIGINT (and ends its service); the services end on SIGTERM.
trap 'kill -"$stop" "${pids[@]}" 2>/dev/null; wait' EXIT
launch prefill $py -m baton.services.prefill --port 50051 --metrics-port 9100 "${common[@]}"
launch decode $py -m baton.services.decode --port 50061 --metrics-port 9101 --kv-transport "${KV_TRANSPORT:-grpc}" "${common[@]}"
launch gateway $py -m baton.services.gateway --model-dir "$model" --served-model-name m --port 8000 \
    --prefill-addr 127.0.0.1:50051 --decode-addr 127.0.0.1:50061 --log-level warning "${redis[@]}" "${gateway_flags[@]}"
for _ in $(seq 1 300); do
    curl -sf http://127.0.0.1:8000/ready >/dev/null && break
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || { echo "a process exited before ready" >&2; exit 1; }; done
    sleep 1
done
curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "m", "prompt": "JULIET:\nO Romeo", "max_tokens": 12, "temperature": 0}'
echo
for round in $(seq 1 "${ROUNDS:-1}"); do
    echo "round $round"
    $py bench/bench_serving.py --url http://127.0.0.1:8000 "$@"
done
curl -s http://127.0.0.1:8000/metrics | grep -E '^baton_(kv_transfer_bytes_total|kv_transfer_seconds_(sum|count)|prefix_cache_hit_ratio|requests_total|prefills_total)'
# Each worker's engine steps and its RPCs' commands' waits for the engine thread (sums and counts since its start).
for port in 9100 9101; do
    curl -s "http://127.0.0.1:$port/metrics" | grep -E '^baton_worker_engine_(step|command_wait)_seconds_(sum|count)' | sed "s/^/:$port /"
done
