#!/usr/bin/env bash
# GRPO on the FP8 torch engine (fp32 compute on e4m3 block-rounded weights) vs an fp32
# trainer: three arms, each with its own server, seeds 0 then 1; logs and CSVs here.
# Usage (from the repository root): bash docs/grpo-fp8/run.sh ARM [SEEDS]
#   ARM: nodvp | dvp | tis; SEEDS defaults to "0 1" (run one after the other)
#   STEPS=60 NAME=long bash docs/grpo-fp8/run.sh ARM 0: a longer run, logged as ARM-long-s0
set -u
ARM=$1
SEEDS=${2:-"0 1"}
STEPS=${STEPS:-20}
RUN=$ARM${NAME:+-$NAME}
case $ARM in
  nodvp) PORT=8741; RULE="--no-dvp --correction none" ;;
  dvp)   PORT=8742; RULE="--dvp --min-p 1e-3 --correction none" ;;
  tis)   PORT=8743; RULE="--no-dvp --correction token-tis" ;;
  *) echo "unknown arm $ARM"; exit 2 ;;
esac
OUT=docs/grpo-fp8
ROOT=/tmp/dvp-fp8-weights/$ARM
mkdir -p "$ROOT"
export OMP_NUM_THREADS=1
nice -n 19 .venv/bin/dvp-serve --engine torch --dtype float32 --quantize fp8 --threads 1 \
    --port $PORT --weights-root "$ROOT" > "$OUT/server-$ARM.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null; do sleep 5; done
for SEED in $SEEDS; do
  nice -n 19 .venv/bin/python examples/grpo.py --url "http://127.0.0.1:$PORT" \
      --weights-dir "$ROOT/s$SEED" --steps $STEPS --prompts 8 --n 8 --max-tokens 4 \
      --eval-every 5 --eval-size 64 --lr 1e-4 --train-layers 6 --seed $SEED $RULE \
      --out "$OUT/$RUN-s$SEED" > "$OUT/$RUN-s$SEED.log" 2>&1
done
