"""LLM-sized targets on one GPU: Qwen2.5-0.5B / 1.5B / 7B-shaped targets (random weights, our 1,029-token
vocabulary) exported fp16 with their weights external, then on the same card, by --parts:

- steps: our target step (the in-place target as the runtime runs it: a static-shape session replaying a CUDA
  graph) for a 1-token step and an 8-token verify at batch 1, beside torch.compile's static-KV-cache step on the
  same weights (tools/torch_compiled.py) in the same process, and the weight-bandwidth floor;
- steps-paired: the same two steps, both sides timed by the same methods in alternating rounds
  (tools/paired_steps.py), per torch.compile mode of --modes ("eager" on the CPU smoke run);
- decode: the runtime loaded as a user loads it (`Recommender(..., device="cuda")`), AR and chain at batch 1, 8,
  32 and 64, with GPU memory by component: weights (one copy, shared by every session), KV caches and the rest
  (ONNX Runtime's workspace and arenas), against the ceiling weights + KV caches + 25%;
- decode-graph-max: the same with CUDA graphs for buckets of at most --graph-max-tokens tokens only (prefill
  sessions then share one arena);
- adaptive: a fresh recommender calibrated (`Recommender.calibrate`), `speculate="auto"` against AR per batch.

    PYTHONPATH=/tmp/gpusite:$PWD python3 tools/gpu_llm.py --shapes qwen-0.5b,qwen-1.5b --out "$OUT"
    ... --shapes qwen-7b --work /tmp/w7 --parts decode-graph-max,adaptive   # a later call: engines reused
    python tools/gpu_llm.py --small --out /tmp/o        # CPU smoke run of this script (tiny shape)

Writes OUT/llm_steps.json after every part of every shape (a call cut short keeps the parts it finished; --work
keeps the engines, so a 7B shape's parts can be spread over 10-minute calls, each writing its own report).
"""
import argparse
import dataclasses
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_step_profile as profile  # noqa: E402
from bench_timing import log  # noqa: E402
from paired_steps import paired_steps  # noqa: E402
from torch_compiled import copy_bandwidth_gbs  # noqa: E402

from padrec_export.fused import export_gqa_target  # noqa: E402
from padrec_export.models import Draft, DraftConfig, Target, TargetConfig  # noqa: E402
from padrec_export.onnx_export import ExportLimits, export_engines  # noqa: E402
from padrec_export.quantize import parse_quantize  # noqa: E402
from padrec_export.sizes import SIZES  # noqa: E402
from padrec_runtime import DecodeParams, Recommender, RuntimeOptions  # noqa: E402
from padrec_runtime.grammar import Catalogue, TokenLayout  # noqa: E402

CATALOGUE = "padrec_export/default_models/ml-100k/catalogue.json"
LIMITS = ExportLimits(max_seq_len=256, max_history=20, max_batch=64, draft_steps=7)
HEADROOM = 1.25  # the memory ceiling we hold to: weights + KV caches + 25%


def random_pair(size, vocab: int, n_slots: int, device: str, dtype):
    """A target of `size` with random weights (norms away from 1: onnxslim folds a weight of ones away) and a
    one-layer draft over it, in `dtype` on `device`."""
    torch.manual_seed(0)
    cfg = TargetConfig(vocab_size=vocab, hidden_size=size.hidden, n_layers=size.layers, n_heads=size.heads,
                       n_kv_heads=size.kv_heads, intermediate_size=size.intermediate, qkv_bias=True)
    with torch.device(device):
        target = Target(cfg).to(dtype).eval()
        for name, p in target.named_parameters():
            if "norm" in name:
                torch.nn.init.normal_(p, 1.0, 0.1)
        dc = DraftConfig(hidden_size=size.hidden, vocab_size=vocab, n_heads=size.heads, n_kv_heads=size.kv_heads,
                         intermediate_size=size.intermediate, n_slots=n_slots)
        draft = Draft(dc, target).to(dtype).eval()
    return target, draft


def device_used() -> int:
    """Bytes in use on the GPU (every process and allocator: what nvidia-smi shows)."""
    free, total = torch.cuda.mem_get_info()
    return total - free


def our_steps(engines: Path, cfg, floor_ms: float, repeats: int) -> dict:
    """The in-place target's 1-token step and 8-token verify (batch 1, 128 cached positions), timed as the
    runtime runs them (gpu_step_profile.time_calls: a static-shape session replaying a CUDA graph) under
    gemm_tuning="off" (the session sets no tuning entry; steps-paired times the tuned session too)."""
    out = {}
    for T in (1, 8):
        dims = {"batch": 1, "seq": T, "max_seq_len": LIMITS.max_seq_len}
        feeds = profile.gqa_feeds_for(cfg, T, 128, LIMITS.max_seq_len)
        out[f"T{T}"] = profile.time_calls(engines / "target_gqa.onnx", dims, feeds, repeats, floor_ms)
    return out


def compiled_steps(target, dtype, modes: list) -> dict:
    """torch.compile's static-KV-cache step on the same weights (tools/torch_compiled.py), per compile mode."""
    import torch_compiled
    return torch_compiled.time_modes(target, dtype, "cuda", modes, LIMITS.max_seq_len, at=128)


def histories(cat: Catalogue, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [[int(i) for i in rng.choice(cat.item_ids, 20, replace=False)] for _ in range(n)]


TIMED_CALLS = 3  # a list's time is the median of this many calls


def timed(call, n: int) -> tuple:
    """(the last result, median ms) of `n` calls."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        res = call()
        times.append(time.perf_counter() - t0)
    return res, float(np.median(times)) * 1e3


def static_sessions(rec: Recommender) -> dict:
    """{graph: [static sessions, of which replay a CUDA graph]} so far (ONNX Runtime backends)."""
    return {name: [len(getattr(b, "_static", {})), len(getattr(b, "_graphed", ()))]
            for name, b in rec.backends.items()}


def decode_memory(engines: Path, cat: Catalogue, batches: list, device: str,
                  options: RuntimeOptions | None = None) -> dict:
    """The runtime as a user loads it (with `options`): ms per list (AR and chain) and GPU memory by component
    per batch."""
    base = device_used() if device == "cuda" else 0
    t0 = time.perf_counter()
    options = options or RuntimeOptions()
    rec = Recommender(engines, device=device, options=options)
    asked = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
             if getattr(options, f.name) != f.default}  # what the caller set; `settings`: every choice resolved
    out = {"load_s": time.perf_counter() - t0, "options": asked, "settings": dataclasses.asdict(rec.settings),
           "batches": {}}
    if device == "cuda":  # weights, the CUDA context, the sessions opened at load: what no batch adds
        out["after_load_gb"] = (device_used() - base) / 1e9
    for b in batches:
        hist = histories(cat, b, seed=b)
        row = {}
        for mode in ("off", "chain"):
            rec.recommend(hist, params=DecodeParams(speculate=mode))  # warm: sessions, CUDA graphs
            res, ms = timed(lambda: rec.recommend(hist, params=DecodeParams(speculate=mode)), TIMED_CALLS)
            row[f"{mode}_ms_per_list"], row[f"{mode}_tau"] = ms / b, res.tau
            if device == "cuda":  # what each mode's sessions added: the rest, attributed
                row[f"after_{mode}_gb"] = (device_used() - base) / 1e9
        row["static_sessions"] = static_sessions(rec)
        mem = rec.memory()
        used = device_used() - base if device == "cuda" else None
        row.update({"weights_gb": mem["weights"] / 1e9, "weights_unshared_gb": mem["weights_unshared"] / 1e9,
                    "kv_caches_gb": mem["kv_caches"] / 1e9, "gpu_used_gb": used / 1e9 if used else None})
        if used:
            row["rest_gb"] = (used - mem["weights"] - mem["kv_caches"]) / 1e9
            row["within_ceiling"] = used <= HEADROOM * (mem["weights"] + mem["kv_caches"])
        out["batches"][b] = row
        log(b, json.dumps(row))
    rec.close()
    return out


def adaptive(engines: Path, cat: Catalogue, batches: list, device: str, options: RuntimeOptions,
             repeats: int = 3) -> dict:
    """`speculate="auto"` after `Recommender.calibrate` against AR per batch (a fresh recommender with `options`,
    histories the calibration did not see): median ms per list over `repeats` alternating calls, and lists/s."""
    rec = Recommender(engines, device=device, options=options)
    t0 = time.perf_counter()
    plan = rec.calibrate(histories(cat, 2 * max(batches), seed=1), batches)
    out = {"options": dataclasses.asdict(options), "calibrate_s": time.perf_counter() - t0,
           "plan": [dataclasses.asdict(c) for c in plan], "batches": {}}
    for b in batches:
        hist, times = histories(cat, b, seed=100 + b), {"off": [], "auto": []}
        for _ in range(repeats + 1):  # the first round warms
            for mode, ts in times.items():
                t0 = time.perf_counter()
                rec.recommend(hist, params=DecodeParams(speculate=mode))
                ts.append(time.perf_counter() - t0)
        row = {f"{mode}_ms_per_list": float(np.median(ts[1:])) * 1e3 / b for mode, ts in times.items()}
        row.update({f"{mode}_lists_per_s": 1e3 / row[f"{mode}_ms_per_list"] for mode in times})
        row["auto_vs_off"] = row["off_ms_per_list"] / row["auto_ms_per_list"]
        out["batches"][b] = row
        log(b, "adaptive", json.dumps(row))
    rec.close()
    return out


PARTS = ("steps", "steps-paired", "decode", "decode-graph-max", "adaptive")


def check_reusable(engines: Path, precision: str, quantize: str) -> None:
    """Refuse engines in --work made with other limits, precision or quantization than this script's (their
    numbers would be reported under this script's settings)."""
    from padrec_runtime.manifest import load_manifest
    m = load_manifest(engines, verify=False)
    have = {k: m.data["model"][k] for k in ("max_seq_len", "max_history", "max_batch", "draft_steps")}
    have["precision"] = m.data["precision"]
    have["quantize"] = (m.quantization("target") or {}).get("kind", "none")
    want = {"max_seq_len": LIMITS.max_seq_len, "max_history": LIMITS.max_history, "max_batch": LIMITS.max_batch,
            "draft_steps": LIMITS.draft_steps, "precision": precision, "quantize": quantize}
    if have != want:
        sys.exit(f"{engines}: made with {have} | this script uses {want} | remove it, or give another --work")


def engines_for(name: str, size, cat: Catalogue, args, work: Path, bw: float):
    """(target, row, engines): the random pair, its row (size, weight floor) and its engine directory, exported
    unless an earlier call on the same --work left it complete (a 7B export takes minutes). With --quantize the
    directory is <shape>_<kind> and the floor stays the fp16 weights' (the torch.compile baseline's bytes)."""
    device, dtype = ("cpu", torch.float32) if args.small else ("cuda", torch.float16)
    t0 = time.perf_counter()
    target, draft = random_pair(size, cat.layout.vocab_size, cat.layout.n_slots, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in target.parameters())
    row = {"size": size.__dict__, "weight_bytes": weight_bytes, "floor_ms": weight_bytes / bw * 1e3}
    quantization = parse_quantize(args.quantize)
    engines = work / (name if quantization is None else f"{name}_{args.quantize}")
    precision = "fp32" if args.small else "fp16"
    if quantization is not None:
        row["quantization"] = {k: v for k, v in quantization.record(0).items() if k != "matmuls"}  # the manifest counts
    if (engines / "manifest.json").exists():  # the manifest is written last: its directory is complete
        check_reusable(engines, precision, args.quantize)
        row["export_reused"] = str(engines)
        log(name, f"engines in {engines} reused")
    else:
        export_engines(target, draft, cat, engines, precision, LIMITS, progress=False, external_data=True,
                       quantization=quantization)
        row["export_s"] = time.perf_counter() - t0
        log(name, f"exported in {row['export_s']:.0f} s")
    return target, row, engines


def padded_graph(target, engines: Path, group: int | None, device: str) -> Path | None:
    """With --query-group, the fused target with zero query heads added up to `group` per KV head (for XQA),
    written beside the engines unless an earlier call did."""
    if group is None:
        return None
    path = engines / f"target_gqa_group{group}.onnx"
    if not path.exists():
        t0 = time.perf_counter()
        export_gqa_target(target, "fp32" if device == "cpu" else "fp16", LIMITS.max_seq_len, path, query_group=group)
        log("padded", path.name, f"exported in {time.perf_counter() - t0:.0f} s")
    return path


def measure(name: str, size, cat: Catalogue, args, work: Path, bw: float, save) -> dict:
    """The row of one shape: its export, then each of --parts, `save(row)` after each (a call cut short by the
    device's limit keeps the parts it finished). Each part opens its own recommender, but parts of one call share
    the process: the shared CUDA arena (share_cuda_arena) and torch's allocations outlive a part and count in the
    next part's baseline, so compare the memory of decode and decode-graph-max from separate calls."""
    target, row, engines = engines_for(name, size, cat, args, work, bw)
    save(row)
    if args.export_only:
        return row
    parts, device = args.parts.split(","), "cpu" if args.small else "cuda"
    modes = [m for m in args.modes.split(",") if m]  # --modes "": our step alone (a baseline timed in another call)
    if "steps-paired" in parts:  # ours and torch.compile's timed alike, alternating
        padded = padded_graph(target, engines, args.query_group, device)
        for mode in modes:
            row.setdefault("steps_paired", {})[mode] = paired_steps(
                engines / "target_gqa.onnx", target, mode, LIMITS.max_seq_len, row["floor_ms"], padded=padded)
            log(name, "paired", mode, json.dumps(row["steps_paired"][mode]["methods"]))
            save(row)
    if "steps" in parts and not args.small and modes:
        row["torch_compile"] = compiled_steps(target, next(target.parameters()).dtype, modes)
        log(name, "torch.compile", json.dumps(row["torch_compile"]))
        save(row)
    cfg = target.cfg
    del target
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    if "steps" in parts and device == "cuda":
        row["padrec"] = our_steps(engines, cfg, row["floor_ms"], args.repeats)
        log(name, "padrec", json.dumps({k: v["ms"] for k, v in row["padrec"].items()}))
        save(row)
    batches = [int(b) for b in args.batches.split(",")]
    options = RuntimeOptions(**json.loads(args.runtime_options))
    if "decode" in parts:
        row["runtime"] = decode_memory(engines, cat, batches, device, options)
        save(row)
    if "decode-graph-max" in parts and device == "cuda":  # prefill sessions without graphs, on the shared arena
        row["runtime_graph_max_tokens"] = decode_memory(
            engines, cat, batches, device,
            dataclasses.replace(options, cuda_graph_max_tokens=args.graph_max_tokens))
        save(row)
    if "adaptive" in parts:
        row["adaptive"] = adaptive(engines, cat, batches, device, options)
        save(row)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen-0.5b,qwen-1.5b,qwen-7b", help=f"comma-separated: {', '.join(SIZES)}")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--modes", default="reduce-overhead,max-autotune", help="torch.compile modes of the baseline (\"\": none, our step alone)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default=None, help="where engines are written (default: a temporary directory); "
                    "engines already there are reused, so a call cut short can be repeated")
    ap.add_argument("--small", action="store_true", help="CPU smoke run with a tiny shape")
    ap.add_argument("--export-only", action="store_true",
                    help="export into --work and stop: the export is CPU-bound and can run beside other work, and "
                    "a later call on the same --work times the engines it finds there")
    ap.add_argument("--parts", default="steps,decode",
                    help=f"comma-separated, of {', '.join(PARTS)}: steps (ours and torch.compile's, batch 1), "
                    "steps-paired (the same, both timed alike in alternating rounds: tools/paired_steps.py), "
                    "decode (ms per list and GPU memory per batch), decode-graph-max (the same with "
                    "RuntimeOptions(cuda_graph_max_tokens=--graph-max-tokens)), adaptive (speculate='auto' "
                    "calibrated, against AR); split them over calls where one call is too short for all")
    ap.add_argument("--quantize", choices=("none", "int4", "int8"), default="none",
                    help="weight-only quantization of the target's decoder layers (MatMulNBits, block 32); the "
                    "report is llm_steps_<kind>.json")
    ap.add_argument("--graph-max-tokens", type=int, default=16, help="for the decode-graph-max part")
    ap.add_argument("--query-group", type=int, default=None,
                    help="steps-paired also times the fused target with zero query heads added up to this many per "
                    "KV head, with ONNX Runtime's XQA decode kernel and without (XQA takes groups dividing 64)")
    ap.add_argument("--runtime-options", default="{}",
                    help='RuntimeOptions of the decode, decode-graph-max and adaptive parts, as JSON, e.g. '
                    '\'{"graph_sessions": "per_graph"}\'')
    args = ap.parse_args()
    shapes = ["tiny"] if args.small else args.shapes.split(",")
    unknown = [s for s in shapes if s not in SIZES]
    if unknown:
        ap.error(f"--shapes: unknown {unknown} | choose from {', '.join(SIZES)}")
    if not set(args.parts.split(",")) <= set(PARTS):
        ap.error(f"--parts: got {args.parts!r} | choose from {', '.join(PARTS)}")
    if args.graph_max_tokens < 1:
        ap.error(f"--graph-max-tokens: got {args.graph_max_tokens} | expected at least 1")
    if args.export_only and not args.work:
        ap.error("--export-only needs --work: the engines are for a later call")
    from padrec_runtime.integrity import parse_json
    cat = Catalogue.from_json(parse_json(Path(CATALOGUE).read_bytes(), CATALOGUE), TokenLayout())
    device = "cpu" if args.small else "cuda"
    bw = copy_bandwidth_gbs(device) * 1e9
    report = {"gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "copy_bandwidth_gbs": bw / 1e9,
              "precision": "fp32" if args.small else "fp16", "limits": LIMITS.__dict__, "shapes": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp())

    def save(name: str, row: dict) -> None:
        report["shapes"][name] = row
        (out / f"llm_steps{'' if args.quantize == 'none' else '_' + args.quantize}.json").write_text(json.dumps(report, indent=2) + "\n")

    for name in shapes:
        measure(name, SIZES[name], cat, args, work, bw, lambda row, name=name: save(name, row))


if __name__ == "__main__":
    main()
