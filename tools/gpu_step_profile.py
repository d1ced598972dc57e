"""Where a target step's time goes on a GPU: a Qwen2.5-shaped target (--shape, default 0.5B; --layers deep) with
random weights, exported fp16, run as the runtime runs it (a static-shape session replaying a CUDA graph,
device-resident inputs and outputs) for a 1-token step and an 8-token verify over a 256-position cache. Reports ms
per call against the weight-bandwidth floor, and kernels per call, GPU busy time per call and the largest kernels
(CUPTI through torch.profiler, on a session without CUDA graphs, whose kernels are the same).

    PYTHONPATH=/tmp/gpusite:$PWD python3 tools/gpu_step_profile.py --out "$OUT"    # -> step_profile.json
    ... --shape qwen-7b --layers 4 --graphs gqa,compiled   # a 7B layer's kernels, ours and torch.compile's
"""
import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from torch_compiled import copy_bandwidth_gbs  # noqa: E402

import padrec_export.models as models  # noqa: E402
from padrec_export.fused import KV_IN_PLACE, export_gqa_target  # noqa: E402
from padrec_export.gate_up import fuse_gate_up_graph  # noqa: E402
from padrec_export.onnx_export import export_graph, slim_graph  # noqa: E402
from padrec_export.sizes import SIZES  # noqa: E402
from padrec_runtime.cache.host import KV_INPUT  # noqa: E402

CUDA_OPTIONS = {}  # --cuda-options
DEVICE = "cuda"  # --cpu: a smoke run of this script on CPU (no timings worth reading, no kernel profile)
GEMM_TUNE = {"ep.cuda.enable_gemm_auto_tune": "1"}  # ONNX Runtime >= 1.31: per shape, the fastest of cuBLAS and
# its small-M GEMV kernels, measured when a session first runs the shape
# --variants: the fused target's forms and ONNX Runtime settings timed in one process, each against the default.
# env: variables ONNX Runtime reads when it makes a session's kernels; config: session config entries;
# disabled: graph optimizers turned off; gate_up False: the MLP's gate and up projections as two MatMuls; weights:
# initializers as device OrtValues (device_weights), given to the session instead of its own copy.
NO_GEMM = ["MatMulAddFusion"]  # keeps the QKV projection a MatMul (+ bias Add) instead of a Gemm, which is untuned
VARIANTS = {
    "default": {},
    "gemm_tune": {"config": GEMM_TUNE},
    "gemm_tune_replay": {"config": GEMM_TUNE, "env": {"ORT_CUDA_GEMM_GRAPH_REPLAY_TUNING": "1"}},
    "gemm_tune_no_gemm_fusion": {"config": GEMM_TUNE, "disabled": NO_GEMM},
    "small_n_gemv": {"env": {"ORT_ENABLE_SMALL_N_GEMV": "1"}},
    "small_n_gemv_no_gemm_fusion": {"env": {"ORT_ENABLE_SMALL_N_GEMV": "1"}, "disabled": NO_GEMM},
    "separate_gate_up": {"gate_up": False},
    "no_flash_decode": {"env": {"ORT_DISABLE_FLASH_DECODE": "1"}},
    "gemm_tune_no_flash": {"config": GEMM_TUNE, "env": {"ORT_DISABLE_FLASH_ATTENTION": "1"}},
}
VARIANT: dict = {}  # the one being timed


def session(path: Path, dims: dict, graph: bool):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for name, size in dims.items():
        opts.add_free_dimension_override_by_name(name, size)
    for key, value in VARIANT.get("config", {}).items():
        opts.add_session_config_entry(key, value)
    for name, value in VARIANT.get("weights", {}).items():
        opts.add_initializer(name, value)
    cuda = dict(CUDA_OPTIONS, **({"enable_cuda_graph": "1"} if graph else {}))
    providers = [("CUDAExecutionProvider", cuda)] if DEVICE == "cuda" else []
    with mock.patch.dict(os.environ, VARIANT.get("env", {})):  # ONNX Runtime reads them as it makes its kernels
        return ort.InferenceSession(str(path), opts, providers=providers + ["CPUExecutionProvider"],
                                    disabled_optimizers=VARIANT.get("disabled") or None)


def device_weights(path: Path) -> tuple[dict, list]:
    """Every initializer of the graph at `path` (its external data read) as one OrtValue on DEVICE: sessions given
    them share that copy, as the runtime's sessions share theirs (padrec_runtime/backends/weights.py). With the
    arrays whose memory they wrap, which must outlive them (numpy's on the CPU, cupy's on the device)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    arrays = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    if DEVICE == "cpu":
        host = {name: ort.OrtValue.ortvalue_from_numpy(a, "cpu", 0) for name, a in arrays.items()}
        return host, list(arrays.values())
    # ONNX Runtime takes a device initializer only from memory it does not own (ortvalue_from_numpy on CUDA
    # allocates with its own allocator): cupy's arrays through DLPack, as the runtime's pool does
    import cupy
    held = {name: cupy.asarray(a) for name, a in arrays.items()}
    return {name: ort.OrtValue.from_dlpack(a) for name, a in held.items()}, list(held.values())


def bound(sess, feeds: dict):
    """An IO binding with every input and output on the device (fixed addresses, as CUDA graphs need); the
    fused target's cache is bound as its input and its output, and its total_sequence_length on the host."""
    import onnxruntime as ort
    io = sess.io_binding()
    keep = {}
    for name, value in feeds.items():
        v = ort.OrtValue.ortvalue_from_numpy(value, "cpu" if name == "total_sequence_length" else DEVICE, 0)
        keep[name] = v
        io.bind_ortvalue_input(name, v)
    for o in sess.get_outputs():
        if o.name.endswith(".out"):  # the fused target's in-place cache
            io.bind_ortvalue_output(o.name, keep[o.name[:-len(".out")]])
        else:
            io.bind_output(o.name, DEVICE, 0)
    sess.run_with_iobinding(io)  # first run allocates (and with a CUDA graph, captures)
    return io, keep


def gqa_feeds_for(cfg, T: int, past: int, max_len: int, dtype=np.float16) -> dict:
    """The fused target's feeds: T tokens behind `past` cached ones in a max_len cache (of `dtype`)."""
    rng = np.random.default_rng(0)
    f = {"input_ids": rng.integers(4, cfg.vocab_size, (1, T)).astype(np.int32),
         "seqlens_k": np.array([past + T - 1], np.int32), "total_sequence_length": np.array(max_len, np.int32)}
    for i in range(cfg.n_layers):
        for tmpl in KV_IN_PLACE:
            f[tmpl % i] = (rng.standard_normal((1, cfg.n_kv_heads, max_len, cfg.head_dim)) * 0.5).astype(dtype)
    return f


def feeds_for(cfg, T: int, past: int) -> dict:
    rng = np.random.default_rng(0)
    f = {"input_ids": rng.integers(4, cfg.vocab_size, (1, T)).astype(np.int32),
         "position_ids": (past + np.arange(T, dtype=np.int32))[None],
         "attention_mask": np.concatenate([np.ones((1, T, past), bool), np.tril(np.ones((1, T, T), bool))], -1)}
    for i in range(cfg.n_layers):
        for part in ("key", "value"):
            f[KV_INPUT[part == "value"] % i] = (rng.standard_normal((1, cfg.n_kv_heads, past, cfg.head_dim)) * 0.5
                                     ).astype(np.float16)
    return f


def kernel_profile(sess, feeds: dict, calls: int = 20) -> dict:
    """Kernels per call and GPU busy ms per call (sum of kernel durations) of a session without CUDA graphs."""
    if DEVICE != "cuda":
        return {}
    io, _keep = bound(sess, feeds)
    return kernel_stats(lambda: sess.run_with_iobinding(io), calls)


def kernel_stats(call, calls: int = 20) -> dict:
    """CUPTI's kernels of `calls` calls of `call` (after 3 unprofiled): kernels and GPU busy ms per call, and the
    largest kernels by busy time per call with their launches per call."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy, count = Counter(), Counter()
    for e in kernels:
        busy[e.name[:80]] += e.device_time
        count[e.name[:80]] += 1
    return {"kernels_per_call": len(kernels) / calls,
            "gpu_busy_ms_per_call": sum(busy.values()) / calls / 1e3,
            "top_kernels_us_per_call": {k: v / calls for k, v in busy.most_common(16)},
            "top_kernels_launches_per_call": {k: count[k] / calls for k, _ in busy.most_common(16)}}


def profile_or_note(path, dims, feeds) -> dict:
    try:
        return kernel_profile(session(path, dims, graph=False), feeds)
    except Exception as exc:  # a diagnostic: the timings above stand without it
        return {"profile_error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def time_calls(path, dims: dict, feeds: dict, repeats: int, floor_ms: float) -> dict:
    """Median ms per replayed call, its multiple of the floor, and the kernel profile."""
    sess = session(path, dims, graph=DEVICE == "cuda")
    io, _keep = bound(sess, feeds)
    for _ in range(20):
        sess.run_with_iobinding(io)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run_with_iobinding(io)
        times.append(time.perf_counter() - t0)
    ms = float(np.median(times)) * 1e3
    host_ms = None
    if DEVICE == "cuda":  # host time of a run call that does not wait for the device (as the runtime queues):
        import onnxruntime as ort  # 10 calls from an idle device; more in a row fill the device's queue and
        queued = ort.RunOptions()  # then each launch waits for room (50 in a row: ~0.8 ms per 8-token call)
        queued.add_run_config_entry("disable_synchronize_execution_providers", "1")
        host = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                sess.run_with_iobinding(io, queued)
            host.append((time.perf_counter() - t0) / 10 * 1e3)
        host_ms = float(np.median(host))
        torch.cuda.synchronize()
    return {"ms": ms, "ms_p10": float(np.percentile(times, 10)) * 1e3, "x_floor": ms / floor_ms,
            "host_ms_per_queued_call": host_ms, **profile_or_note(path, dims, feeds)}


def time_variants(paths: dict, variants: list, cases: dict, repeats: int, floor_ms: float, rounds: int = 10) -> dict:
    """The fused target's variants, each timed at every case (T -> dims, feeds) as a replayed call: every session
    is made and warmed first, then all are timed in turn over `rounds` rounds (a slow spell of the machine hits
    them alike). Per variant and T: median ms, its multiple of the floor, and the kernel profile."""
    live = {}
    for name in variants:
        VARIANT.clear()
        VARIANT.update(VARIANTS[name])
        for T, (dims, feeds) in cases.items():
            sess = session(paths[VARIANT.get("gate_up", True)], dims, graph=DEVICE == "cuda")
            io, keep = bound(sess, feeds)
            for _ in range(20):
                sess.run_with_iobinding(io)
            live[name, T] = (sess, io, keep)
    times = {key: [] for key in live}
    for _ in range(rounds):
        for key, (sess, io, _keep) in live.items():
            for _ in range(max(1, repeats // rounds)):
                t0 = time.perf_counter()
                sess.run_with_iobinding(io)
                times[key].append(time.perf_counter() - t0)
    live.clear()
    out: dict = {}
    for (name, T), ts in times.items():
        VARIANT.clear()
        VARIANT.update(VARIANTS[name])
        ms = float(np.median(ts)) * 1e3
        out.setdefault(name, {})[f"T{T}"] = {
            "ms": ms, "ms_p10": float(np.percentile(ts, 10)) * 1e3, "x_floor": ms / floor_ms,
            **profile_or_note(paths[VARIANT.get("gate_up", True)], *cases[T])}
        print("gqa", name, f"T{T}", json.dumps(out[name][f"T{T}"]), flush=True)
    VARIANT.clear()
    return out


def verify_parity(path, cfg, past: int, max_len: int, T: int = 8, dtype=np.float16) -> dict:
    """Whether a T-token verify pass computes what T one-token steps compute, over the same cache (the runtime's
    in-place IO binding, no CUDA graph: the same kernels): per output (logits, hidden), the largest difference and
    the positions equal bit for bit; and the positions whose argmax agrees."""
    feeds = gqa_feeds_for(cfg, 1, past, max_len, dtype)  # `past` cached positions of random KV
    tokens = np.random.default_rng(1).integers(4, cfg.vocab_size, T).astype(np.int32)
    names = ("logits", "hidden")
    step = session(path, {"batch": 1, "seq": 1, "max_seq_len": max_len}, graph=False)
    io, keep = bound(step, feeds)
    at = [[o.name for o in step.get_outputs()].index(n) for n in names]
    steps = {n: [] for n in names}
    for i in range(T):
        keep["input_ids"].update_inplace(tokens[i:i + 1][None])
        keep["seqlens_k"].update_inplace(np.array([past + i], np.int32))
        step.run_with_iobinding(io)
        for n, j in zip(names, at):
            steps[n].append(io.get_outputs()[j].numpy()[0, 0].copy())  # on CPU the bound output is reused
    verify = session(path, {"batch": 1, "seq": T, "max_seq_len": max_len}, graph=False)
    io, keep = bound(verify, dict(feeds, input_ids=tokens[None], seqlens_k=np.array([past + T - 1], np.int32)))
    verify.run_with_iobinding(io)
    out = {"T": T}
    for n in names:
        each_step = np.stack(steps[n])
        once = io.get_outputs()[[o.name for o in verify.get_outputs()].index(n)].numpy()[0]
        out[n] = {"max_abs_diff": float(np.abs(once.astype(np.float32) - each_step.astype(np.float32)).max()),
                  "bitwise_equal_positions": int(sum(np.array_equal(a, b) for a, b in zip(once, each_step)))}
        if n == "logits":
            out["argmax_equal_positions"] = int((once.argmax(-1) == each_step.argmax(-1)).sum())
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shape", default="qwen-0.5b", choices=sorted(s for s in SIZES if s.startswith("qwen")),
                    help="the target's layer shape (padrec_export/sizes.py); --layers sets its depth")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=1100)
    ap.add_argument("--past", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=512, help="the fused target's cache length")
    ap.add_argument("--graphs", default="standard,gqa",
                    help="target forms to time: standard, gqa (fused), compiled (torch.compile's step, GPU only)")
    ap.add_argument("--variants", default="default",
                    help="the fused target's variants to time, comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--parity", action="store_true",
                    help="per variant, only whether an 8-token verify pass gives the 8 one-token steps' logits")
    ap.add_argument("--cuda-options", default="{}", help="CUDA execution provider options, JSON")
    ap.add_argument("--cpu", action="store_true", help="smoke run on CPU")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown} | choose from {', '.join(VARIANTS)}")
    for form in args.graphs.split(","):
        if form not in ("standard", "gqa", "compiled"):
            ap.error(f"--graphs: {form!r} | expected standard, gqa or compiled")
    return args


def random_target(shape: str, layers: int, vocab: int):
    """A target of `shape`'s layers, `layers` deep, with random weights on DEVICE; returns (config, target)."""
    s = SIZES[shape]
    cfg = models.TargetConfig(vocab_size=vocab, hidden_size=s.hidden, n_layers=layers, n_heads=s.heads,
                              n_kv_heads=s.kv_heads, intermediate_size=s.intermediate, qkv_bias=True)
    torch.manual_seed(0)
    target = models.Target(cfg).to(DEVICE)
    for name, p in target.named_parameters():  # norms away from 1 (onnxslim folds a weight of ones away)
        if "norm" in name:
            torch.nn.init.normal_(p, 1.0, 0.1)
    return cfg, target


def floor_report(target, args) -> dict:
    """The report's head: the card, the shape, and the weight-bandwidth floor of one fp16 step."""
    n_bytes = sum(p.numel() for p in target.parameters()) * 2
    bw = copy_bandwidth_gbs(DEVICE) * 1e9  # bytes/s
    return {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "shape": args.shape,
            "layers": args.layers,
            "past": args.past, "weight_bytes": n_bytes, "copy_bandwidth_gbs": bw / 1e9, "floor_ms": n_bytes / bw * 1e3}


def profile_standard(target, cfg, args, tmp: Path, floor_ms: float) -> dict:
    """The standard target graph exported fp16 and timed at 1 and 8 tokens: export_s, T1, T8."""
    path = tmp / "standard.onnx"
    t0 = time.perf_counter()
    export_graph(target, False, "fp16", path)
    slim_graph(path)
    fuse_gate_up_graph(path, target, torch.float16, None)  # the shipped form: gate|up as one MatMul
    res = {"export_s": time.perf_counter() - t0}
    for T in (1, 8):
        dims = {"batch": 1, "seq": T, "past": args.past, "past_plus_seq": args.past + T}
        res[f"T{T}"] = time_calls(path, dims, feeds_for(cfg, T, args.past), args.repeats, floor_ms)
        print("standard", f"T{T}", json.dumps(res[f"T{T}"]), flush=True)
    return res


def profile_gqa(target, cfg, args, tmp: Path, floor_ms: float) -> dict:
    """The fused target exported in the forms the variants need, then per variant either its verify parity
    (--parity) or its timings (the default variant's keys at the top, the others under "variants")."""
    variants = args.variants.split(",")
    t0 = time.perf_counter()
    paths = {}
    for gate_up in sorted({VARIANTS[v].get("gate_up", True) for v in variants}):
        paths[gate_up] = tmp / f"gqa{'_gate_up' * gate_up}.onnx"
        export_gqa_target(target, "fp16", args.max_len, paths[gate_up], gate_up=gate_up)
    into = {"export_s": time.perf_counter() - t0}
    if args.parity:
        into["verify_parity"] = {}
        for name in variants:
            VARIANT.clear()
            VARIANT.update(VARIANTS[name])
            into["verify_parity"][name] = verify_parity(paths[VARIANT.get("gate_up", True)], cfg, args.past,
                                                        args.max_len)
            print("parity", name, json.dumps(into["verify_parity"][name]), flush=True)
        VARIANT.clear()
        return into
    cases = {T: ({"batch": 1, "seq": T, "max_seq_len": args.max_len},
                 gqa_feeds_for(cfg, T, args.past, args.max_len)) for T in (1, 8)}
    timed = time_variants(paths, variants, cases, args.repeats, floor_ms)
    into.update(timed.pop("default", {}))  # the default's keys where they always were
    if timed:
        into["variants"] = timed
    return into


def profile_compiled(target, args, floor_ms: float, mode: str = "reduce-overhead") -> dict:
    """torch.compile's static-KV-cache step (tools/torch_compiled.py) on the same weights, last (it moves the
    target to fp16 in place): per number of tokens its ms back to back, multiple of the floor and kernels
    (CUPTI sees the kernels of a CUDA graph's replay)."""
    import torch_compiled
    ct = torch_compiled.CompiledTarget(target, 1, args.max_len, torch.float16, mode)
    into = {"mode": mode, "compile_s": ct.warm_up((1, 8))}
    times = torch_compiled.step_times(ct, at=args.past, repeats=max(3, args.repeats // 40))
    with torch.no_grad():
        for T in (1, 8):
            ids = torch.zeros(1, T, dtype=torch.long, device=DEVICE)
            positions = (args.past + torch.arange(T, device=DEVICE))[None]
            ms = times[f"step_ms_{T}"]
            into[f"T{T}"] = {"ms": ms, "x_floor": ms / floor_ms, **kernel_stats(lambda: ct.step(ids, positions))}
            print("compiled", f"T{T}", json.dumps(into[f"T{T}"]), flush=True)
    return into


def main(argv=None):
    args = parse_args(argv)
    CUDA_OPTIONS.update(json.loads(args.cuda_options))
    global DEVICE
    DEVICE = "cpu" if args.cpu else "cuda"
    cfg, target = random_target(args.shape, args.layers, args.vocab)
    report = floor_report(target, args)
    tmp = Path(tempfile.mkdtemp())
    forms = args.graphs.split(",")
    for form in sorted(forms, key=lambda f: f == "compiled"):  # compiled last: it moves the target to fp16
        if form == "standard":  # its keys at the top level, as before
            report.update(profile_standard(target, cfg, args, tmp, report["floor_ms"]))
        elif form == "gqa":
            report["gqa"] = profile_gqa(target, cfg, args, tmp, report["floor_ms"])
        elif DEVICE == "cuda":
            report["compiled"] = profile_compiled(target, args, report["floor_ms"])
        # after each form: a later one that fails or runs out of time leaves the ones before it
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "step_profile.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
