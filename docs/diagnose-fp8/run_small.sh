#!/usr/bin/env bash
# dvp-diagnose on the FP8 torch engine (e4m3 128x128-block weights, fp32 compute) vs the
# fp32 trainer, SmolLM2-135M; smaller than run.sh (16 rollouts x 32 tokens per setting, two
# rho), sized for a loaded machine.
# Usage (from the repository root): bash docs/diagnose-fp8/run_small.sh
set -u
mkdir -p docs/diagnose-fp8/small
OUT=docs/diagnose-fp8/small
export OMP_NUM_THREADS=1
nice -n 19 .venv/bin/dvp-serve --engine torch --dtype float32 --quantize fp8 --threads 1 \
    --port 8752 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf http://127.0.0.1:8752/ready > /dev/null; do sleep 5; done
(uptime; lscpu | grep -E "Model name|^CPU\(s\)") > "$OUT/machine.txt"
nice -n 19 .venv/bin/python -c "from dvp_server.diagnose.cli import main; main()" --url http://127.0.0.1:8752 --model smollm2 --rollouts 16 \
    --samples-per-prompt 4 --max-tokens 32 --rho 1e-3,1e-2 --vocab-positions 8 \
    --prompts-per-request 4 --seed 0 --out "$OUT" > "$OUT/diagnose.log" 2>&1
uptime >> "$OUT/machine.txt"
