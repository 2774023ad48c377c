#!/usr/bin/env bash
# examples/grpo.py on SmolLM2-135M against an fp32 server of one engine (issue 22's table):
# 4 prompts x 4 rollouts, lr 1e-4, fp32 trainer, DVP min-p 1e-3, 6 steps, a weight push
# before every step. K3 (engine vs trainer) per step lands in OUT/steps.csv.
# Usage (from the repository root): bash docs/weights-grpo/run.sh vllm|torch [OUT]
set -u
ENGINE=${1:?engine: vllm or torch}
OUT=${2:-docs/weights-grpo/$ENGINE}
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8754}
ROOT=$(mktemp -d /tmp/dvp-weights-grpo.XXXXXX)
mkdir -p "$OUT"
"$PY" -m dvp_server --engine "$ENGINE" --dtype float32 --port "$PORT" \
    --weights-root "$ROOT" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER; wait $SERVER; rm -rf "$ROOT"' EXIT
until curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null; do
  kill -0 $SERVER 2> /dev/null || { echo "server exited; see $OUT/server.log"; exit 1; }
  sleep 5
done
(date -u; uptime; lscpu | grep -E "Model name|^CPU\(s\)") > "$OUT/machine.txt"
"$PY" examples/grpo.py --url "http://127.0.0.1:$PORT" --weights-dir "$ROOT/run" \
    --prompts 4 --n 4 --lr 1e-4 --steps 6 --dvp --min-p 1e-3 --eval-every 0 \
    --out "$OUT" > "$OUT/grpo.log" 2>&1
echo "grpo exit $?" >> "$OUT/grpo.log"
uptime >> "$OUT/machine.txt"
