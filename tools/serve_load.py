"""Load on `padrec serve` over loopback: p50/p95/p99 latency and lists/s per concurrency and speculation; JSON + PNG.

Usage: python tools/serve_load.py [--engines DIR] [--concurrency 1,4,16,64] [--speculate auto,off]
                                  [--requests 400] [--level-time-s 30] [--out benchmarks/results/serve_cpu]
Starts its own server (the interpreter of tools/setup.sh's .venv-serve) on free ports, or uses --url. Without
--engines the embedded default (ml-100k) is exported to a temporary directory first. Bounded: each level stops
after --requests requests or --level-time-s seconds, whichever comes first.
"""
import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from padrec_runtime import DecodeParams, Recommender
from padrec_serve.client import Client
from padrec_serve.process import serve_python, start_server


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
    return [rng.choice(ids, size=int(rng.integers(5, top + 1)), replace=False).tolist() for _ in range(n)]


def run_level(url: str, histories: list, concurrency: int, speculate: str, requests: int, time_s: float) -> dict:
    """`concurrency` client threads sending one request at a time until `requests` are sent or time is up."""
    latencies, failures, lock = [], [], threading.Lock()
    next_k = iter(range(requests))
    t_end = time.perf_counter() + time_s

    def worker():
        with Client(url) as c:
            while time.perf_counter() < t_end:
                with lock:
                    k = next(next_k, None)
                if k is None:
                    return
                t0 = time.perf_counter()
                try:
                    c.recommend_one(histories[k % len(histories)], speculate=speculate)
                except Exception as exc:  # counted, not raised: a load test reports failures
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
    wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1e3
    return {"speculate": speculate, "concurrency": concurrency, "requests": len(latencies), "failures": len(failures),
            "wall_s": wall, "lists_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
            "first_failure": failures[0] if failures else None}


def in_process_ms(rec, histories: list, repeats: int = 20) -> float:
    """Median in-process time of one batch-1 list (the floor the server adds its overhead to)."""
    rec.recommend(histories[:1], params=DecodeParams(speculate="chain"))
    times = []
    for k in range(repeats):
        t0 = time.perf_counter()
        rec.recommend([histories[k % len(histories)]], params=DecodeParams(speculate="chain"))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.suptitle(f"padrec serve on {result['host']} (loopback, {result['engines']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default=None)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--speculate", default="auto,off")
    ap.add_argument("--requests", type=int, default=400, help="per level")
    ap.add_argument("--level-time-s", type=float, default=30)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue-delay-us", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/results/serve_cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engines = Path(args.engines) if args.engines else export_default(Path(tmp))
        rec = Recommender(engines)
        histories = make_histories(rec, 256)
        python = serve_python()
        if python is None:
            raise SystemExit("no interpreter with PyTriton: run tools/setup.sh (it makes .venv-serve)")
        server = start_server(engines, Path(tmp) / "serve.log", python, "--max-batch", str(args.max_batch),
                              "--max-queue-delay-us", str(args.max_queue_delay_us))
        try:
            levels = []
            run_level(server.http, histories, 4, "auto", 40, 30)  # warm the sessions of both modes
            run_level(server.http, histories, 4, "off", 40, 30)
            for mode in args.speculate.split(","):
                for conc in map(int, args.concurrency.split(",")):
                    levels.append(run_level(server.http, histories, conc, mode, args.requests, args.level_time_s))
                    print(json.dumps(levels[-1]))
            batches = {int(b["batch_size"]): int(b["compute_infer"]["count"])
                       for b in server.stats()["model_stats"][0]["batch_stats"]}
        finally:
            server.stop()
        result = {"host": f"{platform.node()} ({platform.processor() or platform.machine()}, "
                          f"{__import__('os').cpu_count()} cores)",
                  "engines": "embedded default ml-100k" if not args.engines else str(args.engines),
                  "device": "cpu", "max_batch": args.max_batch, "max_queue_delay_us": args.max_queue_delay_us,
                  "speculate": args.speculate.split(","), "in_process_batch1_chain_ms": in_process_ms(rec, histories),
                  "server_batch_counts": batches, "levels": levels}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
