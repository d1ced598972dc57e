"""Soak through `padrec serve`: many requests from client threads, the server's RSS sampled; JSON.

Usage: python tools/serve_soak.py --requests 20000 [--engines DIR] [--concurrency 16]
                                  [--out benchmarks/results/serve_soak_cpu.json]
Starts its own server on free loopback ports (.venv-serve's interpreter). RSS is the server's process tree
(padrec serve, tritonserver, the Python-backend stub holding the engines). Growth is measured from the sample
after the warm-up (the first tenth of the requests) to the last; every request is a good one and must succeed.
"""
import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from padrec_runtime.api.recommender import Recommender
from padrec_serve.client import Client
from padrec_serve.process import descendants, rss_mib, serve_python, start_server

from serve_load import export_default, make_histories


def soak(server, histories: list, requests: int, concurrency: int, samples: int = 40) -> dict:
    lock, done, failures, trace = threading.Lock(), [0], [], []
    next_k = iter(range(requests))
    bar = tqdm(total=requests, desc="soak", unit="req")
    every = max(1, requests // samples)

    def worker(t: int):
        with Client(server.http) as c:
            while True:
                with lock:
                    k = next(next_k, None)
                if k is None:
                    return
                speculate = ("auto", "off", "chain")[k % 3]
                try:
                    c.recommend_one(histories[k % len(histories)], speculate=speculate)
                except Exception as exc:  # counted: a soak reports failures
                    failures.append(repr(exc))
                with lock:
                    done[0] += 1
                    bar.update(1)
                    if done[0] % every == 0:
                        pids = {server.proc.pid} | descendants(server.proc.pid)
                        trace.append({"requests": done[0], "rss_mib": rss_mib(pids), "t_s": time.time() - t0})

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    warm = next(s for s in trace if s["requests"] >= requests // 10)
    last = trace[-1]
    return {"requests": done[0], "failures": len(failures), "first_failure": failures[0] if failures else None,
            "concurrency": concurrency, "wall_s": time.time() - t0, "warm_rss_mib": warm["rss_mib"],
            "last_rss_mib": last["rss_mib"], "rss_growth": last["rss_mib"] / warm["rss_mib"] - 1,
            "max_rss_mib": max(s["rss_mib"] for s in trace), "trace": trace}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default=None)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/serve_soak_cpu.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engines = Path(args.engines) if args.engines else export_default(Path(tmp))
        histories = make_histories(Recommender(engines), 512, seed=1)
        python = serve_python()
        if python is None:
            raise SystemExit("no interpreter with PyTriton: run tools/setup.sh (it makes .venv-serve)")
        server = start_server(engines, Path(tmp) / "serve.log", python)
        try:
            result = soak(server, histories, args.requests, args.concurrency)
            result["server_requests"] = {line.split("outcome=")[1].split('"')[1]: float(line.split()[-1])
                                         for line in server.get("metrics", "/metrics").splitlines()
                                         if line.startswith("padrec_requests{")}
        finally:
            result_code = server.stop()
        result.update(engines="embedded default ml-100k" if not args.engines else str(args.engines),
                      server_exit_code=result_code,
                      passed=bool(result["failures"] == 0 and result["rss_growth"] < 0.05))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "trace"}, indent=1))


if __name__ == "__main__":
    main()
