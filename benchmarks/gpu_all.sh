#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one call of a lent GPU machine (~9 minutes on an
# H200), results under $OUT (at most 8 files come back). Run from the repository root:
#
#   device run:  bash benchmarks/gpu_all.sh        (timeout_s 600; nothing to carry)
#
# Then copy $OUT's files into benchmarks/results/ and commit them. Each part has its own time limit and
# writes its results as it goes, so a part cut short keeps what it measured; later parts still run.
# Not here (too big for one call): the quality suite on the real SmolLM2 (#33 item 3 needs the 98 MB
# GGUF carried in two halves over two calls), 70B/8-GPU sharding (#30, one GPU is lent), gates latency (#34).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
LOG="$OUT/gpu_all.log"
cd benchmarks
part() {  # part SECONDS NAME COMMAND...: one measurement, cut at SECONDS
    local limit=$1 name=$2; shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1
python -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)" >>"$LOG" 2>&1

# 1. #29 goal: the default command's stages on the Llama-3-8B shape, bf16 checkpoint, batch 2 x 1024,
#    gradient checkpointing (goal: <= 22 GiB, and no stage above train-rows); 16 calibration examples
#    (the peak does not depend on their number, the time does: 64 would take ~4x longer)
part 240 memory-8b python memory.py --model llama-3-8b --grad-ckpt yes --calib-examples 16 \
    --stages load score-taylor train-rows train-lora eval --out "$OUT" --runs /tmp/bench-memory
# 2. #29 item 6: a fair LoRA baseline (PEFT's autocast_adapter_dtype=False beside its default), 3 repeats
part 180 gpu-step python gpu_step.py --models llama-3-8b --precisions bf16 --methods rows-auto rows-peft lora lora-nocast \
    --repeats 3 --steps 8 --warmup 2 --out "$OUT"
# 3. #29 item 6: end to end with the default scorer (where did rows' 2.5 s first step go?)
part 110 finetune-speed python finetune_speed.py --model llama-3.2-1b --scorer taylor --steps 20 \
    --out "$OUT" --runs /tmp/bench-finetune-speed
# 4. #29 item 5: every stage at the Llama-3.2-1B shape, with and without checkpointing
part 60 memory-1b python memory.py --model llama-3.2-1b --grad-ckpt both --calib-examples 16 --append \
    --stages load score-magnitude score-wanda score-taylor score-fisher score-zo-taylor train-rows train-lora train-full eval merge export \
    --out "$OUT" --runs /tmp/bench-memory
ls -la "$OUT" >>"$LOG"
