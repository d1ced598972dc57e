"""The batch-1 headline on one card: AR and the default speculation timed in turn, per list, for one or more
source trees of padrec (a checkout's root: its padrec_runtime is imported from there), alternating the trees.

    python tools/gpu_headline.py --engines DIR --trees .,/path/to/other/checkout --json OUT.json

Each tree runs in its own process (`--worker`), `--passes` times in alternation, so a slow spell of the machine
hits every tree alike; within a process AR and speculation are timed in turn over `--rounds` rounds, each a
request per user for `--users` held-out ml-100k users (their last 20 items). Lists are compared with AR's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def histories(n_users: int) -> list:
    from padrec_export.data import load_dataset, make_split
    test = [h for _, h, _ in make_split(load_dataset("ml-100k")).test]
    return [h[-20:] for h in test if len(h) >= 20][:n_users]


def _request(rec, hist: list, mode: str):
    """One list; checkouts from before the typed DecodeParams take the mode as a keyword."""
    import padrec_runtime
    if hasattr(padrec_runtime, "DecodeParams"):
        return rec.recommend([hist], params=padrec_runtime.DecodeParams(speculate=mode))
    return rec.recommend([hist], speculate=mode)


def worker(engines: str, users: list, rounds: int, device: str) -> dict:
    """Time AR and chain speculation in turn with the padrec_runtime on sys.path."""
    import padrec_runtime
    Recommender = getattr(padrec_runtime, "Recommender", None)
    if Recommender is None:  # trees from before the typed API export it from padrec_runtime.recommender
        from padrec_runtime.recommender import Recommender
    rec = Recommender(engines, device=device)
    runs = {"off": [], "chain": []}
    last = {}
    for mode in runs:  # warm-up: sessions, CUDA graph captures
        for h in users:
            _request(rec, h, mode)
    for _ in range(rounds):
        for mode in runs:
            t0 = time.perf_counter()
            last[mode] = [_request(rec, h, mode) for h in users]
            runs[mode].append((time.perf_counter() - t0) / len(users) * 1e3)
    lists = {m: [r.lists[0].tokens for r in res] for m, res in last.items()}
    tau = float(np.mean([r.tau for r in last["chain"]]))
    return {"runtime_file": padrec_runtime.__file__, "ms_per_list": runs, "tau": tau,
            "identical_to_ar": lists["chain"] == lists["off"],
            "ar_ms": float(np.median(runs["off"])), "sd_ms": float(np.median(runs["chain"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", required=True, help="engine directory (fp16 on CUDA)")
    ap.add_argument("--trees", default=".", help="comma-separated checkout roots to compare")
    ap.add_argument("--names", default=None, help="comma-separated labels of the trees (default: the paths)")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--passes", type=int, default=2, help="processes per tree, alternating between trees")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", required=True)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        users = json.loads(os.environ["PADREC_AB_USERS"])
        print(json.dumps(worker(args.engines, users, args.rounds, args.device)))
        return
    users = histories(args.users)
    trees = args.trees.split(",")
    names = args.names.split(",") if args.names else trees
    out = {"engines": args.engines, "users": len(users), "rounds": args.rounds, "trees": dict(zip(names, trees)),
           "passes": {n: [] for n in names}}
    try:
        import torch
        out["gpu"] = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    except Exception:  # the name is a label only
        out["gpu"] = None
    for p in range(args.passes):
        for name, tree in zip(names, trees):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tree).resolve()), os.environ.get("PYTHONPATH", "")]),
                       PADREC_AB_USERS=json.dumps(users))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--engines", args.engines, "--rounds", str(args.rounds),
                   "--device", args.device, "--json", "-"]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
            if res.returncode:
                raise SystemExit(f"{name}: worker failed\n{res.stderr[-3000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            out["passes"][name].append(row)
            print(f"pass {p} {name}: AR {row['ar_ms']:.2f} ms, SD {row['sd_ms']:.2f} ms, tau {row['tau']:.2f}, "
                  f"identical {row['identical_to_ar']}", flush=True)
    out["summary"] = {n: {"ar_ms": float(np.median([r["ar_ms"] for r in rows])),
                          "sd_ms": float(np.median([r["sd_ms"] for r in rows])),
                          "tau": rows[-1]["tau"], "identical_to_ar": all(r["identical_to_ar"] for r in rows)}
                      for n, rows in out["passes"].items()}
    if len(names) == 2:
        a, b = (out["summary"][n] for n in names)
        out["summary"]["ratio"] = {"ar": b["ar_ms"] / a["ar_ms"], "sd": b["sd_ms"] / a["sd_ms"]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["summary"], indent=2))


if __name__ == "__main__":
    main()
