"""Load on `padrec serve` over loopback: p50/p95/p99 latency and lists/s per concurrency and speculation; JSON + PNG.

Usage: python tools/serve_load.py [--engines DIR] [--device cpu|cuda] [--concurrency 1,4,16,64]
                                  [--speculate auto,off] [--requests 400] [--level-time-s 30] [--passes 2]
                                  [--protocol http|grpc] [--out benchmarks/results/serve_cpu]
First the in-process batch-1 list time of each mode (a Recommender in this process, `auto` calibrated for batch 1
as the server does), then its own server (the interpreter of tools/setup.sh's .venv-serve, or --python) on free
loopback ports. Without --engines the embedded default (ml-100k) is exported to a temporary directory first.
At each concurrency the modes take turns in --passes passes (the order flipped each pass), so a slow spell of a
shared machine falls on both. Bounded: a level stops after --requests requests or --level-time-s seconds.
The JSON holds the server's `auto` plan (from its log), the load average per level and the checks: p50 at
concurrency 1 within 15% of the in-process list time, and `auto` lists/s at least `off`'s at every concurrency.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from padrec_runtime import DecodeParams, Recommender
from padrec_serve import runtime
from padrec_serve.client import Client
from padrec_serve.process import serve_python, start_server

C1_P50_TOLERANCE = 0.15  # p50 at concurrency 1 may exceed the in-process batch-1 list time by this fraction


def export_default(tmp: Path) -> Path:
    from padrec_export.demo import default_model_dir
    from padrec_export.pipeline import export_checkpoints
    model = default_model_dir("ml-100k")
    out = tmp / "engines"
    export_checkpoints(model / "target", model / "draft_padrec", out)
    return out


def make_histories(rec, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    ids, top = rec.catalogue.item_ids, min(20, rec.limits["max_history"])
    return [rng.choice(ids, size=int(rng.integers(min(5, top), top + 1)), replace=False).tolist() for _ in range(n)]


def run_pass(url: str, protocol: str, histories: list, concurrency: int, speculate: str, requests: int,
             time_s: float) -> dict:
    """`concurrency` client threads sending one request at a time until `requests` are sent or time is up;
    raw latencies (s), failures and wall time."""
    latencies, failures, lock = [], [], threading.Lock()
    next_k = iter(range(requests))
    t_end = time.perf_counter() + time_s

    def worker():
        with Client(url, protocol) as c:
            while time.perf_counter() < t_end:
                with lock:
                    k = next(next_k, None)
                if k is None:
                    return
                t0 = time.perf_counter()
                try:
                    c.recommend_one(histories[k % len(histories)], speculate=speculate)
                except Exception as exc:  # counted, not raised: a load test reports failures
                    with lock:
                        failures.append(repr(exc))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies_s": latencies, "failures": failures, "wall_s": time.perf_counter() - t0}


def summarize(speculate: str, concurrency: int, passes: list, loadavg: list) -> dict:
    """One level from its passes: latencies pooled, lists/s over the passes' summed wall time."""
    ms = np.array([x for p in passes for x in p["latencies_s"]]) * 1e3
    failures = [f for p in passes for f in p["failures"]]
    wall = sum(p["wall_s"] for p in passes)
    pct = {q: float(np.percentile(ms, q)) if len(ms) else None for q in (50, 95, 99)}
    return {"speculate": speculate, "concurrency": concurrency, "requests": int(len(ms)), "failures": len(failures),
            "wall_s": wall, "lists_per_s": len(ms) / wall if wall else 0.0, "p50_ms": pct[50], "p95_ms": pct[95],
            "p99_ms": pct[99], "passes": len(passes), "loadavg_1min": loadavg,
            "pass_lists_per_s": [len(p["latencies_s"]) / p["wall_s"] if p["wall_s"] else 0.0 for p in passes],
            "first_failure": failures[0] if failures else None}


def run_levels(url: str, protocol: str, histories: list, concurrency: list, modes: list, requests: int,
               time_s: float, passes: int) -> list:
    """Every (mode, concurrency) level; at each concurrency the modes take turns, the order flipped each pass."""
    levels = []
    for conc in concurrency:
        parts, load = {m: [] for m in modes}, {m: [] for m in modes}
        for k in range(passes):
            for mode in (modes if k % 2 == 0 else modes[::-1]):
                load[mode].append(round(os.getloadavg()[0], 2))
                parts[mode].append(run_pass(url, protocol, histories, conc, mode, -(-requests // passes),
                                            time_s / passes))
        for mode in modes:
            levels.append(summarize(mode, conc, parts[mode], load[mode]))
            print(json.dumps({k: v for k, v in levels[-1].items() if k != "first_failure"}), flush=True)
    return levels


def in_process_ms(rec, histories: list, modes: list, repeats: int = 30) -> dict:
    """Median in-process time of one batch-1 list per mode (the floor the server adds its overhead to); `auto`
    is calibrated for batch 1 the way the server calibrates."""
    if "auto" in modes:
        runtime.calibrate(rec, (1,))
    times = {m: [] for m in modes}
    for m in modes:
        rec.recommend(histories[:1], params=DecodeParams(speculate=m))  # warm
    for k in range(repeats):
        for m in modes:
            t0 = time.perf_counter()
            rec.recommend([histories[k % len(histories)]], params=DecodeParams(speculate=m))
            times[m].append(time.perf_counter() - t0)
    plan = [c.__dict__ for c in rec.plan] if rec.plan else None
    return {"ms": {m: float(np.median(v)) * 1e3 for m, v in times.items()}, "auto_plan_batch1": plan}


def server_plan(log: str) -> list:
    """The `auto` settings each model instance logged after its calibration."""
    return re.findall(r"padrec \S+ auto speculation: [^\"\n]*", log)


def pass_spread(row: dict) -> float:
    """How far a level's passes (same mode, same concurrency) differ in lists/s, as a fraction of their mean: the
    run-to-run noise of this machine at that load."""
    rates = row.get("pass_lists_per_s") or [row["lists_per_s"]]
    mean = sum(rates) / len(rates)
    return (max(rates) - min(rates)) / mean if mean else 0.0


def checks(levels: list, in_process: dict, tolerance: float = C1_P50_TOLERANCE) -> dict:
    """The serving checks, as booleans with the numbers they come from. `auto` against `off` is judged strictly and
    within the noise: the larger pass-to-pass spread of the two levels (where `auto` resolves to AR, as at batch
    sizes where speculation does not pay, the two are the same computation and only noise separates them)."""
    by = {(r["speculate"], r["concurrency"]): r for r in levels}
    c1 = {}
    for mode, ms in in_process.items():
        row = by.get((mode, 1))
        if row and row["p50_ms"] is not None:
            c1[mode] = {"p50_ms": row["p50_ms"], "in_process_ms": ms, "ratio": row["p50_ms"] / ms,
                        "ok": row["p50_ms"] <= ms * (1 + tolerance)}
    auto_off = {}
    for (mode, conc), row in sorted(by.items(), key=lambda kv: kv[0][1]):
        if mode == "auto" and ("off", conc) in by:
            off_row = by[("off", conc)]
            auto, off = row["lists_per_s"], off_row["lists_per_s"]
            noise = max(pass_spread(row), pass_spread(off_row))
            auto_off[str(conc)] = {"auto": auto, "off": off, "ratio": auto / off if off else None, "ok": auto >= off,
                                   "noise": noise, "ok_within_noise": auto >= off * (1 - noise)}
    failures = sum(r["failures"] for r in levels)
    c1_ok = bool(c1) and all(v["ok"] for v in c1.values()) and failures == 0
    return {"c1_p50_within_tolerance_of_in_process": c1, "tolerance": tolerance,
            "auto_lists_per_s_at_least_off": auto_off, "failed_requests": failures,
            "all_ok": c1_ok and all(v["ok"] for v in auto_off.values()),
            "all_ok_within_noise": c1_ok and all(v["ok_within_noise"] for v in auto_off.values())}


def card_name(device: str) -> str:
    if device == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.strip().splitlines()
            return out[0] if out else "unknown GPU"
        except (OSError, subprocess.SubprocessError):
            return "unknown GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from padrec_export.figures import save_png
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in result["speculate"]:
        rows = [r for r in result["levels"] if r["speculate"] == mode]
        conc = [r["concurrency"] for r in rows]
        a.plot(conc, [r["lists_per_s"] for r in rows], "o-", label=f"speculate={mode}")
        b.plot(conc, [r["p50_ms"] for r in rows], "o-", label=f"p50 {mode}")
        b.plot(conc, [r["p99_ms"] for r in rows], "x--", label=f"p99 {mode}")
    for ax, ylabel in ((a, "lists / s"), (b, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
    a.set_ylim(bottom=0)
    fig.suptitle(f"padrec serve on {result['card']} (loopback, {result['engines']})")
    fig.tight_layout()
    save_png(fig, path, dpi=120)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--speculate", default="auto,off")
    ap.add_argument("--requests", type=int, default=400, help="per level")
    ap.add_argument("--level-time-s", type=float, default=30)
    ap.add_argument("--passes", type=int, default=2, help="turns of the modes at each concurrency")
    ap.add_argument("--protocol", choices=["http", "grpc"], default="http")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue-delay-us", type=int, default=2000)
    ap.add_argument("--python", default=None, help="the server's interpreter (default: one with PyTriton)")
    ap.add_argument("--ready-s", type=float, default=600, help="how long the server may take to load and calibrate")
    ap.add_argument("--out", default="benchmarks/results/serve_cpu")
    ap.add_argument("--note", default=None, help="what the JSON should say about the conditions of the run")
    return ap.parse_args()


def main():
    args = parse_args()
    modes, concurrency = args.speculate.split(","), [int(c) for c in args.concurrency.split(",")]
    python = args.python or serve_python()
    if python is None:
        raise SystemExit("no interpreter with PyTriton: run tools/setup.sh (it makes .venv-serve)")
    with tempfile.TemporaryDirectory() as tmp:
        engines = Path(args.engines) if args.engines else export_default(Path(tmp))
        with Recommender(engines, device=args.device) as rec:  # closed (its GPU memory freed) before the server
            histories = make_histories(rec, 256)
            floor = in_process_ms(rec, histories, modes)
        print(json.dumps({"in_process_batch1_ms": floor["ms"]}), flush=True)
        log = Path(tmp) / "serve.log"
        server = start_server(engines, log, python, "--device", args.device, "--max-batch", str(args.max_batch),
                              "--max-queue-delay-us", str(args.max_queue_delay_us), ready_s=args.ready_s)
        try:
            url = server.grpc if args.protocol == "grpc" else server.http
            for mode in modes:  # warm the server's sessions of each mode
                run_pass(url, args.protocol, histories, 4, mode, 40, 60)
            levels = run_levels(url, args.protocol, histories, concurrency, modes, args.requests, args.level_time_s,
                                args.passes)
            batches = {int(b["batch_size"]): int(b["compute_infer"]["count"])
                       for b in server.stats()["model_stats"][0]["batch_stats"]}
        finally:
            server.stop()
        plan = server_plan(log.read_text())
    result = {"note": args.note, "card": card_name(args.device), "host": f"{platform.node()} ({os.cpu_count()} cores)",
              "engines": "embedded default ml-100k" if not args.engines else Path(args.engines).name,
              "device": args.device, "protocol": args.protocol, "python": platform.python_version(),
              "numpy": np.__version__, "max_batch": args.max_batch, "max_queue_delay_us": args.max_queue_delay_us,
              "speculate": modes, "passes": args.passes, "in_process_batch1_ms": floor["ms"],
              "in_process_auto_plan_batch1": floor["auto_plan_batch1"], "server_auto_plan": plan,
              "server_batch_counts": batches, "levels": levels, "checks": checks(levels, floor["ms"])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["checks"], indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    sys.exit(main())
