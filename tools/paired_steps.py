"""Our target step and torch.compile's, timed the same way in one process, in alternating order.

The `steps` part of tools/gpu_llm.py times each side its own way: ours as one synchronised call at a time
(gpu_step_profile.time_calls), torch.compile's as the mean of 20 back-to-back calls (torch_compiled.time_ms),
each measured once. This times every side by both methods, round after round with the order flipped each round,
so a slow spell of the card hits them alike:
- back_to_back: the mean ms of `inner` calls issued back to back and synchronised once at the end (ours
  queued without a wait, as the runtime queues a round's device work);
- per_call: the median ms of `inner` calls, each synchronised before the next.
Ours runs twice: with ONNX Runtime's GEMM tuning, as the runtime's default (`gemm_tuning="session"`) runs it, and
without, as the README's memory settings (`gemm_tuning="off"`) run it. Given a graph with zero query heads added
(fused.build_gqa_target's `query_group`), three times more, tuned: the shipped graph with cuDNN's attention kernels
off (ORT_ENABLE_CUDNN_FLASH_ATTENTION=0: GroupQueryAttention falls back to Flash attention), and the padded graph
with ONNX Runtime's XQA decode kernel (ORT_ENABLE_XQA=1, which takes such groups) and without. The sessions of a
graph share one device copy of its weights, as the runtime's do (with a copy each, three 7B sessions beside
torch.compile's fill an 80 GB card). Per side and method: the median over rounds, and each of
ours against torch.compile's per round.
"""
import time
from pathlib import Path

import numpy as np
import torch

import gpu_step_profile as profile
import torch_compiled
from padrec_runtime.backends.onnxruntime import GEMM_TUNE_ENTRY

METHODS = ("back_to_back", "per_call")
# our sides: (the tuning entry the runtime sets for each, the prefix of its ratios in the report, the environment
# ONNX Runtime reads as it makes the session's kernels); PADDED's run the graph with padded query groups
OURS = {"padrec": ("1", "", {}), "padrec_tuning_off": ("0", "tuning_off_", {})}
FLASH = {"padrec_flash": ("1", "flash_", {"ORT_ENABLE_CUDNN_FLASH_ATTENTION": "0"})}
PADDED = {"padrec_padded": ("1", "padded_", {"ORT_ENABLE_XQA": "0"}),
          "padrec_padded_xqa": ("1", "padded_xqa_", {"ORT_ENABLE_XQA": "1"})}


def _ours(path: Path, cfg, T: int, at: int, max_len: int, device: str, dtype, tune: str, env: dict, weights: dict):
    """A callable running our in-place target once (a static-shape session replaying a CUDA graph, over the
    graph's shared `weights`) without waiting for the device, and what must outlive it (the session and its bound
    device values)."""
    import onnxruntime as ort
    dims = {"batch": 1, "seq": T, "max_seq_len": max_len}
    profile.VARIANT.update({"config": {GEMM_TUNE_ENTRY: tune}, "env": env, "weights": weights})
    try:
        sess = profile.session(path, dims, graph=device == "cuda")
    finally:
        profile.VARIANT.clear()
    io, keep = profile.bound(sess, profile.gqa_feeds_for(cfg, T, at, max_len, dtype))
    for _ in range(20):  # the tuning and capture, then a few replays
        sess.run_with_iobinding(io)
    queued = ort.RunOptions()
    queued.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return (lambda: sess.run_with_iobinding(io, queued)), (sess, io, keep)


def _theirs(ct, T: int, at: int, device: str):
    ids = torch.zeros(1, T, dtype=torch.long, device=device)
    positions = (at + torch.arange(T, device=device))[None]
    return lambda: ct.step(ids, positions)


def _time(fn, device: str, method: str, inner: int) -> float:
    if method == "back_to_back":
        return torch_compiled.time_ms(fn, device, repeats=1, inner=inner, warm=2)
    return torch_compiled.time_ms(fn, device, repeats=inner, inner=1, warm=2)


def _summary(times: dict, T: int, method: str, floor_ms: float, sides: dict) -> dict:
    theirs = np.array(times["torch_compile", T, method])
    row = {"torch_compile_ms": float(np.median(theirs))}
    for side, (_, prefix, _) in sides.items():
        ours = np.array(times[side, T, method])
        row.update({f"{side}_ms": float(np.median(ours)), f"{prefix}ratio_median": float(np.median(ours / theirs)),
                    f"{prefix}ratio_max": float(np.max(ours / theirs)),
                    f"{prefix}x_floor": float(np.median(ours)) / floor_ms})
    return row


def paired_steps(path: Path, target, mode: str, max_len: int, floor_ms: float, at: int = 128,
                 rounds: int = 9, inner: int = 50, padded: Path | None = None) -> dict:
    """Batch 1, 1-token step and 8-token verify at positions `at`..: ours (the in-place graph at `path`, with and
    without GEMM tuning; the graph at `padded`, with padded query groups, with and without XQA) against `target`
    compiled in `mode` ("eager": not compiled, for a CPU smoke run), by both METHODS over `rounds` alternating
    rounds, on the target's device."""
    t0 = time.perf_counter()
    device = next(target.parameters()).device.type
    profile.DEVICE = device  # gpu_step_profile's sessions and bindings follow it, as its own --cpu does
    dtype = next(target.parameters()).dtype
    cache_dtype = np.float16 if dtype == torch.float16 else np.float32  # the exported graph's KV cache
    ct = torch_compiled.CompiledTarget(target, 1, max_len, dtype, None if mode == "eager" else mode)
    compile_s = ct.warm_up((1, 8))
    fns, keep = {}, {}
    ours = {**OURS, **({**FLASH, **PADDED} if padded else {})}
    graphs = {path: profile.device_weights(path), **({padded: profile.device_weights(padded)} if padded else {})}
    with torch.no_grad():
        for T in (1, 8):
            for side, (tune, _, env) in ours.items():
                graph = padded if side in PADDED else path
                fns[side, T], kept = _ours(graph, target.cfg, T, at, max_len, device, cache_dtype, tune, env,
                                           graphs[graph][0])
                keep[side, T] = kept
            fns["torch_compile", T] = _theirs(ct, T, at, device)
        sides = (*ours, "torch_compile")
        times = {(side, T, m): [] for side in sides for T in (1, 8) for m in METHODS}
        for r in range(rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                for T in (1, 8):
                    for m in METHODS:
                        times[side, T, m].append(_time(fns[side, T], device, m, inner))
    out = {"mode": mode, "rounds": rounds, "inner": inner, "at": at, "compile_s": compile_s, "floor_ms": floor_ms,
           "methods": {m: {f"T{T}": _summary(times, T, m, floor_ms, ours) for T in (1, 8)} for m in METHODS},
           "seconds": time.perf_counter() - t0}
    if padded:  # each padded side's last logits against the shipped graph's (the same inputs, run last alike)
        logits = {key: kept[1].get_outputs()[0].numpy() for key, kept in keep.items()}
        out["padded_logits_max_abs_diff"] = {f"{side}_T{T}": float(np.abs(logits[side, T] - logits["padrec", T]).max())
                                             for side in PADDED for T in (1, 8)}
    del fns, keep, ct, graphs
    torch._dynamo.reset()
    return out
