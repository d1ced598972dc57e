"""`padrec bench`: AR vs chain vs tree speculation on one backend (plus PyTorch eager), same inputs, JSON + plot."""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import os
import platform
import resource
import time

import numpy as np
from tqdm import tqdm

from padrec_runtime import DecodeParams, Recommender

MODES = ("off", "chain", "tree")


def hardware() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
    for pkg in ("onnxruntime", "onnxruntime-gpu", "numpy", "torch"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return info


def bench_histories(rec: Recommender, n: int, dataset: str | None, seed: int = 0) -> tuple[list, str]:
    """(histories, where they come from): held-out users' histories when the data package is there and the engines'
    catalogue holds their items, else fixed random catalogue histories."""
    source = "random catalogue histories"
    if dataset:
        from padrec_runtime.errors import InputError, PadrecError

        from .data import DATASETS, load_dataset, make_split
        if dataset not in DATASETS:  # a typo must not pass for "data package absent" below
            raise InputError(f"bench dataset: got {dataset!r} | expected one of {', '.join(DATASETS)} | "
                             "e.g. --dataset ml-100k")
        try:
            data = load_dataset(dataset)
        except PadrecError:  # its data package is not installed: random histories instead
            data, source = None, f"random catalogue histories ({dataset}'s data package is not installed)"
        if data is not None:
            test = make_split(data).test
            hists = [h[-rec.limits["max_history"]:] for _, h, _ in (test * (1 + n // len(test)))[:n]]
            missing = {i for h in hists for i in h} - {int(i) for i in rec.catalogue.item_ids}
            if not missing:
                return hists, f"{dataset} held-out users"
            # engines for another catalogue: its ids would be refused as unknown items
            source = (f"random catalogue histories (the engines' catalogue lacks {len(missing)} of the item ids of "
                      f"{dataset}'s held-out users)")
    rng = np.random.default_rng(seed)
    ids = rec.catalogue.item_ids
    longest = min(20, rec.limits["max_history"])
    return [rng.choice(ids, size=int(rng.integers(min(5, longest), longest + 1)), replace=False).tolist()
            for _ in range(n)], source


def _measure(run, repeats: int) -> dict:
    run()  # warm-up
    times, last = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        last = run()
        times.append(time.perf_counter() - t0)
    return {"times": times, "result": last}


def run_bench(engine_dir, backend: str = "onnxruntime", device: str = "cpu", batches=(1, 8, 32), repeats: int = 5,
              target_dir=None, draft_dir=None, dataset: str | None = "ml-100k", progress: bool = True,
              options=None) -> dict:
    """Every mode at every batch size on the same histories (the runtime with RuntimeOptions `options`); PyTorch
    eager too when checkpoints are given."""
    if repeats < 1 or not batches or min(batches) < 1:
        from padrec_runtime.errors import InputError
        raise InputError(f"bench: got repeats {repeats}, batches {list(batches)} | expected repeats >= 1 and "
                         "batch sizes >= 1 | e.g. --repeats 5 --batch 1,8,32")
    if draft_dir and not target_dir:
        from padrec_runtime.errors import InputError
        raise InputError("bench: a draft checkpoint without --target | the PyTorch timing needs its target; pass "
                         "--target too, or drop --draft")
    rec = Recommender(engine_dir, backend=backend, device=device, options=options)
    if max(batches) > rec.limits["max_batch"]:  # before any history is drawn or any point timed
        from padrec_runtime.errors import InputError
        raise InputError(f"bench: batch {max(batches)} | the engines take at most {rec.limits['max_batch']}; "
                         f"pass --batch sizes up to {rec.limits['max_batch']}")
    hist_all, hist_source = bench_histories(rec, max(batches), dataset)
    torch_models = None
    if target_dir:
        from .checkpoint import load_draft, load_target
        t = load_target(target_dir)
        torch_models = (t, load_draft(draft_dir, t) if draft_dir else None)
    rows = []
    jobs = [(b, m, eng) for b in batches for m in MODES for eng in (["runtime"] + (["pytorch"] if torch_models else []))]
    for batch, mode, engine in tqdm(jobs, desc="bench", disable=not progress):
        hist = hist_all[:batch]
        if engine == "runtime":
            run = lambda: rec.recommend(hist, params=DecodeParams(speculate=mode))  # noqa: E731
        else:
            from padrec_runtime.grammar import ListConstraint

            from .reference import reference_generate
            con = ListConstraint(rec.catalogue, n_items=rec.limits["n_items"])
            cfg = rec.decode_config(DecodeParams(speculate=mode), len(hist))
            run = lambda: reference_generate(torch_models[0], torch_models[1], hist, con, cfg)  # noqa: E731
        m = _measure(run, repeats)
        res = m["result"]
        split = res.time_s if engine == "runtime" else {"draft": res.time_draft_s, "verify": res.time_verify_s,
                                                          "host": res.time_host_s, "total": res.time_total_s}
        ms = np.array(m["times"]) * 1e3  # one batch call: `batch` lists
        rows.append({"engine": engine, "backend": backend if engine == "runtime" else "pytorch-eager",
                     "mode": mode, "batch": batch, "ms_per_call_median": float(np.median(ms)),
                     "ms_per_call_p90": float(np.percentile(ms, 90)),
                     "ms_per_list_median": float(np.median(ms)) / batch,
                     "lists_per_s": batch / float(np.median(ms)) * 1e3,
                     "tau": float(res.tau), "time_split_ms": {k: v * 1e3 for k, v in split.items()}})
    for r in rows:
        base = next(x for x in rows if x["engine"] == r["engine"] and x["batch"] == r["batch"] and x["mode"] == "off")
        r["speedup_vs_ar"] = base["ms_per_call_median"] / r["ms_per_call_median"]
    return {"engines": str(engine_dir), "histories": hist_source, "precision": rec.manifest.precision,
            "quantization": rec.manifest.quantization("target"), "device": device, "repeats": repeats,
            "runtime": dataclasses.asdict(rec.settings),
            "hardware": hardware(), "n_items": rec.limits["n_items"], "draft_steps": rec.limits["draft_steps"],
            "tree": {"topk": rec.limits["tree_topk"], "size": rec.limits["tree_size"]},
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows}


def bench_table(report: dict) -> str:
    """Markdown table: the batch call's latency (median, p90), per list, throughput, tau, speed-up vs AR."""
    lines = ["| engine | batch | mode | ms/call (median) | ms/call p90 | ms/list | lists/s | tau | speed-up vs AR |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['backend']} | {r['batch']} | {r['mode']} | {r['ms_per_call_median']:.1f} | "
                     f"{r['ms_per_call_p90']:.1f} | {r['ms_per_list_median']:.2f} | {r['lists_per_s']:.1f} | "
                     f"{r['tau']:.2f} | {r['speedup_vs_ar']:.2f}x |")
    return "\n".join(lines)


def require_plot() -> None:
    """--plot's package, checked before a run rather than after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from padrec_runtime.errors import BackendError
        raise BackendError("bench --plot: matplotlib is not installed | expected the plot extra | "
                           "pip install '.[plot]' (in the padrec checkout) (or leave out --plot)") from None


def bench_plot(report: dict, path) -> None:
    """One figure: ms per list against batch size (log scales), a line per engine and mode, each speculative
    point labelled with its speed-up over AR and its tau; the title names the machine in full."""
    require_plot()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .figures import save_png

    rows = report["rows"]
    engines = sorted({r["backend"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"off": ("AR", "o", "-"), "chain": ("chain", "s", "--"), "tree": ("tree", "^", ":")}
    for e, eng in enumerate(engines):
        for mode, (label, marker, line) in styles.items():
            pts = sorted((r["batch"], r) for r in rows if r["backend"] == eng and r["mode"] == mode)
            if not pts:
                continue
            xs, ys = [b for b, _ in pts], [r["ms_per_list_median"] for _, r in pts]
            ax.plot(xs, ys, marker=marker, linestyle=line, color=f"C{e * 3 + list(styles).index(mode)}",
                    label=f"{eng} {label}")
            if mode == "off":
                continue
            for x, (_, r) in zip(xs, pts):
                ax.annotate(f"{r['speedup_vs_ar']:.2f}x, tau {r['tau']:.1f}", (x, r["ms_per_list_median"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (histories per call)")
    ax.set_ylabel("ms per list (batch call / batch, median)")
    hw = report["hardware"]
    ax.set_title(f"{hw['cpu']} ({hw.get('cpu_count')} cores) | {report['device']}, {report['precision']}, "
                 f"K {report['draft_steps']}, {report['repeats']} repeats\nlabels: speed-up vs AR, tau "
                 "(tokens per target pass)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    plt.close(fig)
