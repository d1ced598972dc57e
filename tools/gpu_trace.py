"""Where batch-1 GPU idle time goes: CUPTI traces (torch.profiler) of our runtime's AR, fused-chain and
device-round requests, each GPU idle gap matched with the CUDA runtime calls the host was in meanwhile.

    bash tools/gpu_bench.sh --work DIR --stages train,export     # engines under DIR/eng_padrec
    PYTHONPATH=/tmp/gpusite:/tmp/site:$PWD python3 tools/gpu_trace.py --out "$OUT"   # -> gpu_trace.json

Each idle gap is also split among the runtime's phases (PHASES: the innermost one the host was in).
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
from padrec_runtime import Recommender, RuntimeOptions  # noqa: E402

MODES = {"off": dict(speculate="off"), "chain": dict(speculate="chain", device_rounds=False),
         "chain-dev": dict(speculate="chain", device_rounds=True)}

# the runtime's phases, marked in the trace (torch.profiler.record_function around each call): an idle gap's
# time goes to the innermost phase the host was in meanwhile
PHASES = {"api.recommender": ["Recommender.recommend", "Recommender.start"],
          "loop.session": ["DecodeSession.step", "DecodeSession._prefill", "DecodeSession._verify",
                           "DecodeSession._commit", "chain_states"],
          "loop.propose": ["FusedChain.propose", "DeviceChain.propose"],
          "loop.accept": ["ChainPicks.accept"],
          "cache.rounds": ["DeviceRounds.queue"],
          "cache.device": ["DeviceCache.launch", "DeviceCache.forward"],
          "cache.buckets": ["Pending.result"]}


def mark_phases() -> None:
    """Wrap the PHASES functions so that each call is a named range in the profiler's trace."""
    import functools
    import importlib

    def wrap(fn, name):
        @functools.wraps(fn)
        def marked(*args, **kwargs):
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)
        return marked
    for mod_name, names in PHASES.items():
        mod = importlib.import_module(f"padrec_runtime.{mod_name}")
        for name in names:
            owner, _, attr = name.rpartition(".")
            holder = getattr(mod, owner) if owner else mod
            setattr(holder, attr, wrap(getattr(holder, attr), name))


def phase_of_gaps(gaps: list, ranges: list) -> dict:
    """ms of the gaps (start, end) spent in each phase, the innermost range (start, end, name) open at each
    moment (ranges nest on the one host thread: the latest started wins); 'none' outside every range."""
    out = defaultdict(float)
    ranges = sorted(ranges)
    for g0, g1 in gaps:
        inside = [r for r in ranges if r[0] < g1 and r[1] > g0]
        cuts = sorted({g0, g1, *(t for a, b, _ in inside for t in (a, b) if g0 < t < g1)})
        for lo, hi in zip(cuts, cuts[1:]):
            mid = (lo + hi) / 2
            open_ = [r for r in inside if r[0] <= mid < r[1]]
            out[max(open_)[2] if open_ else "none"] += (hi - lo) / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def idle_report(prof, wall_ms: float, min_gap_us: float = 3.0) -> dict:
    """GPU busy and idle time; for the idle gaps, how long the host spent in each CUDA runtime call during them
    (a blocking call there is the host waiting on work that is not on the GPU) and outside any call."""
    gpu, api, phases = [], [], []
    marked = {n for names in PHASES.values() for n in names}
    for e in prof.events():
        span = (e.time_range.start, e.time_range.end)
        if e.device_type == torch.autograd.DeviceType.CUDA:
            gpu.append(span)
        elif e.name.startswith("cuda"):
            api.append((*span, e.name))
        elif e.name in marked:
            phases.append((*span, e.name))
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
            "idle_gaps_by_phase_ms": phase_of_gaps(gaps, phases),
            "cuda_calls": {k: {"count": n, "ms": ms}
                           for k, (n, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", required=True, help="fp16 engine directory (gpu_bench.py --work DIR: DIR/eng_padrec)")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = make_split(load_dataset("ml-100k"))
    users = [h[-20:] for _, h, _ in split.test if len(h) >= 20][:args.users]
    mark_phases()
    rec = Recommender(args.engines, device="cuda", options=RuntimeOptions(device_cache=True))
    report = {"gpu": torch.cuda.get_device_name(0), "users": len(users), "modes": {}}
    for mode, opts in MODES.items():
        for _ in range(2):  # sessions built, graphs captured
            each(rec, users, **opts)
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            t0 = time.perf_counter()
            res = each(rec, users, **opts)
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - t0) * 1e3
        report["modes"][mode] = {"lists": len(users), "rounds": res.rounds, "tau": res.tau,
                                 **idle_report(prof, wall_ms)}
        prof.export_chrome_trace(str(out / f"trace_{mode}.json"))
        print(mode, json.dumps(report["modes"][mode])[:1500], flush=True)
    (out / "gpu_trace.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
