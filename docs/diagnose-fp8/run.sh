#!/usr/bin/env bash
# dvp-diagnose on the FP8 torch engine (e4m3 128x128-block weights, fp32 compute) vs the
# fp32 trainer, SmolLM2-135M; the same settings as the bf16 run in docs/diagnose.md.
# Usage (from the repository root): bash docs/diagnose-fp8/run.sh [OUT [ROLLOUTS [SEED]]]
#   defaults: docs/diagnose-fp8, 32 rollouts per setting, seed 0
set -u
OUT=${1:-docs/diagnose-fp8}
ROLLOUTS=${2:-32}
SEED=${3:-0}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
nice -n 19 .venv/bin/dvp-serve --engine torch --dtype float32 --quantize fp8 --threads 1 \
    --port 8751 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf http://127.0.0.1:8751/ready > /dev/null; do sleep 5; done
(uptime; lscpu | grep -E "Model name|^CPU\(s\)") > "$OUT/machine.txt"
nice -n 19 .venv/bin/python -c "from dvp_server.diagnose.cli import main; main()" --url http://127.0.0.1:8751 --model smollm2 --rollouts $ROLLOUTS \
    --samples-per-prompt 4 --max-tokens 64 --rho 1e-4,1e-3,1e-2 --vocab-positions 24 \
    --prompts-per-request 8 --seed $SEED --out "$OUT" > "$OUT/diagnose.log" 2>&1
uptime >> "$OUT/machine.txt"
