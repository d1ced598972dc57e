"""Where batch-1 GPU idle time goes: CUPTI traces (torch.profiler) of our runtime's AR, fused-chain and
device-round requests, each GPU idle gap matched with the CUDA runtime calls the host was in meanwhile.

    bash tools/gpu_bench.sh --stages train,export     # engines under /tmp/padrec_llm (the bench's work dir)
    PYTHONPATH=/tmp/gpusite:/tmp/site:$PWD python3 tools/gpu_trace.py --out "$OUT"   # -> gpu_trace.json
"""
import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_bench import each, union  # noqa: E402

from padrec_export.data import load_dataset, make_split  # noqa: E402
from padrec_runtime.recommender import Recommender  # noqa: E402

MODES = {"off": dict(speculate="off"), "chain": dict(speculate="chain", device_rounds=False),
         "chain-dev": dict(speculate="chain", device_rounds=True)}


def idle_report(prof, wall_ms: float, min_gap_us: float = 10.0) -> dict:
    """GPU busy and idle time; for the idle gaps, how long the host spent in each CUDA runtime call during them
    (a blocking call there is the host waiting on work that is not on the GPU) and outside any call."""
    gpu, api = [], []
    for e in prof.events():
        span = (e.time_range.start, e.time_range.end)
        if e.device_type == torch.autograd.DeviceType.CUDA:
            gpu.append(span)
        elif e.name.startswith("cuda"):
            api.append((*span, e.name))
    busy = union(gpu)
    gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] - a[1] >= min_gap_us]
    in_call = defaultdict(float)
    uncovered = 0.0
    totals = defaultdict(lambda: [0, 0.0])
    for a, b, name in api:
        totals[name][0] += 1
        totals[name][1] += (b - a) / 1e3
    api.sort()
    for g0, g1 in gaps:
        covered = []
        for a, b, name in api:
            if a >= g1:
                break
            lo, hi = max(a, g0), min(b, g1)
            if hi > lo:
                in_call[name] += (hi - lo) / 1e3
                covered.append((lo, hi))
        uncovered += (g1 - g0 - sum(b - a for a, b in union(covered))) / 1e3
    busy_ms = sum(b - a for a, b in busy) / 1e3
    return {"wall_ms": wall_ms, "gpu_busy_ms": busy_ms, "gaps": len(gaps),
            "idle_in_gaps_ms": sum(b - a for a, b in gaps) / 1e3,
            "idle_gaps_by_cuda_call_ms": dict(sorted(in_call.items(), key=lambda kv: -kv[1])),
            "idle_gaps_host_outside_cuda_calls_ms": uncovered,
            "cuda_calls": {k: {"count": n, "ms": ms}
                           for k, (n, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="/tmp/padrec_llm/eng_padrec")
    ap.add_argument("--users", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = make_split(load_dataset("ml-100k"))
    users = [h[-20:] for _, h, _ in split.test if len(h) >= 20][:args.users]
    rec = Recommender(args.engines, device="cuda", io_binding=True)
    report = {"gpu": torch.cuda.get_device_name(0), "users": len(users), "modes": {}}
    for mode, opts in MODES.items():
        for _ in range(2):  # sessions built, graphs captured
            each(rec, users, **opts)
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            t0 = time.perf_counter()
            each(rec, users, **opts)
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - t0) * 1e3
        report["modes"][mode] = idle_report(prof, wall_ms)
        prof.export_chrome_trace(str(out / f"trace_{mode}.json"))
        print(mode, json.dumps(report["modes"][mode])[:1500], flush=True)
    (out / "gpu_trace.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
