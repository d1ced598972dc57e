"""Soak: many requests in one process, RSS (and GPU memory with --device cuda) sampled over time; JSON + PNG.

Usage: python tools/soak.py --requests 20000 [--engines DIR] [--device cpu|cuda] [--out benchmarks/results/soak_cpu]
Without --engines the embedded default (ml-100k) is exported to a temporary directory first.
"""
import argparse
import json
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--engines", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-items", type=int, default=3)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/soak_cpu")
    args = ap.parse_args()
    from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
    tmp = tempfile.TemporaryDirectory()
    engines = args.engines
    if engines is None:
        from padrec_export.demo import default_model_dir
        from padrec_export.pipeline import export_checkpoints
        model = default_model_dir("ml-100k")
        engines = Path(tmp.name) / "eng"
        export_checkpoints(model / "target", model / "draft_padrec", engines)
    rec = Recommender(engines, device=args.device)
    rng = np.random.default_rng(0)
    ids = rec.catalogue.item_ids
    modes = ["off", "chain", "tree"]
    every = max(1, args.requests // args.samples)
    trace, t0 = [], time.perf_counter()
    for k in tqdm(range(args.requests), desc="soak", mininterval=5):
        hist = rng.choice(ids, size=int(rng.integers(1, 21)), replace=False).tolist()
        res = rec.recommend([hist], n_items=args.n_items, params=DecodeParams(speculate=modes[k % 3], greedy=bool(k % 2), seed=k))
        assert len(res.lists[0].item_ids) == args.n_items
        if k % every == 0 or k == args.requests - 1:
            trace.append({"request": k + 1, "seconds": time.perf_counter() - t0, "rss_mib": rss_mib(),
                          "gpu_mib": gpu_mib() if args.device == "cuda" else None})
    warm = next(p for p in trace if p["request"] >= args.requests // 10)
    growth = 100 * (trace[-1]["rss_mib"] / warm["rss_mib"] - 1)
    out = {"requests": args.requests, "device": args.device, "n_items": args.n_items, "modes": modes,
           "rss_after_warmup_mib": warm["rss_mib"], "rss_final_mib": trace[-1]["rss_mib"],
           "rss_growth_after_warmup_pct": growth, "seconds": trace[-1]["seconds"], "trace": trace}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from padrec_export.figures import save_png
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([p["request"] for p in trace], [p["rss_mib"] for p in trace], label="RSS (MiB)")
    if args.device == "cuda":
        ax.plot([p["request"] for p in trace], [p["gpu_mib"] or np.nan for p in trace], label="GPU memory (MiB)")
    ax.axvline(warm["request"], color="grey", ls=":", lw=1)
    ax.set_xlabel("requests")
    ax.set_ylabel("MiB")
    ax.set_title(f"soak: {args.requests} requests on {args.device}, RSS growth after warm-up {growth:+.2f}%", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, args.out + ".png", dpi=120)
    print(json.dumps({k: v for k, v in out.items() if k != "trace"}))


if __name__ == "__main__":
    main()
