"""The layout ablation: for every token layout x data set x seed, a target and five drafts trained at equal budget
(plain EAGLE, PAD-Rec, slot only, step only, PAD-Rec without gates), measured by greedy verification on held-out
users: tau for chain K = 2..8 and tree, acceptance by draft depth and item slot, the target's Recall@10 / NDCG@10
beside the popularity and co-occurrence baselines, and CPU wall-clock per list (AR vs chain, batch 1). One JSON
and two plots.

    python tools/ablation_layouts.py run --out DIR [--device cuda] [--workers N] [--resume OLD.json]
    python tools/ablation_layouts.py run --out DIR --quick --device cpu          # the CPU smoke test
    python tools/ablation_layouts.py plot DIR/ablation_layouts.json --out DIR

Resumable: a cell whose record exists (under --work, or in --resume's JSON) is not run again. Cells start while
--budget-s (less a reserve for the wall-clock stage) lasts; the JSON is rewritten after every cell, so an interrupted
run still leaves a valid one. Chain tau for every K comes from one probe decode per draft (ablation_stats.py says
why that is exact), checked against a real chain decode at the config's check_k (4); tree tau from a real tree
decode.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import click
import numpy as np
import torch

from padrec_export.bench import hardware as cpu_info
from padrec_export.data import load_dataset, make_split
from padrec_runtime import DecodeParams, Recommender

sys.path.insert(0, str(Path(__file__).parent))
from ablation_cell import LAYOUTS, DATASETS, VARIANTS, Cell, GridConfig, log, run_cell  # noqa: E402
from ablation_stats import summarize  # noqa: E402

REPORT = "ablation_layouts.json"
WALLCLOCK_RESERVE_S = 40.0  # the CPU timing stage after the grid
# Measured on one H200 (16 cores) with 3 workers, one cell each: per_level and shared cells 235 s, digits 351 s
# (each record keeps its own seconds). With 8 workers digits cells ran out of the GPU's 140 GB (up to 28 GB a
# worker during the batch-256 probes), hence 4 workers a GPU. The whole grid (18 cells) is 2-3 device calls of
# 9 minutes, each resuming from the last one's JSON (--resume).
GPU_ESTIMATE = {"cell_s_3_workers_h200": {"per_level": 235, "shared": 235, "digits": 351}, "workers": 4,
                "grid_device_calls": "2-3 of 9 minutes, with --resume"}


# ---- the grid: cells in worker processes, records kept under --work, the report rewritten after each ----

def grid(cfg: GridConfig) -> list:
    return [Cell(lay, ds, s) for ds in cfg.datasets for lay in cfg.layouts for s in cfg.seeds]


def load_records(work: Path, resume: str | None, cfg: GridConfig) -> dict:
    """Cell records already made with these settings: --resume's JSON first, then --work/cells/*.json (newer)."""
    records = json.loads(Path(resume).read_text())["cells"] if resume else {}
    for f in sorted((work / "cells").glob("*.json")):
        records[f.stem] = json.loads(f.read_text())
    other = sorted(k for k, r in records.items() if r.get("settings") != cfg.cell_settings())
    if other:
        log(f"not reused (made with other settings): {', '.join(other)}")
    return {k: r for k, r in records.items() if k not in other}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_cells(cfg: GridConfig, todo: list, device: str, workers: int, work: Path, stop_at: float, on_record) -> None:
    """Run the cells (in `workers` processes, spread over the visible GPUs); on_record(cell, record) for each."""
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    devices = [f"cuda:{i % gpus}" if gpus else device for i in range(len(todo))]
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    if workers <= 1:
        _init_worker(threads)
        for cell, dev in zip(todo, devices):
            on_record(cell, _guarded(cfg, cell, dev, str(work), stop_at))
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(_guarded, cfg, c, dev, str(work), stop_at): c for c, dev in zip(todo, devices)}
        for f in as_completed(futures):
            try:
                record = f.result()
            except Exception as exc:  # the worker process died (e.g. out of memory): that cell failed
                record = {"failed": f"worker: {type(exc).__name__}: {exc}"}
            on_record(futures[f], record)


def _guarded(cfg, cell, device, work, stop_at) -> dict:
    """run_cell, with a failure recorded (and retried by a later run) rather than ending the grid."""
    try:
        return run_cell(cfg, cell, device, work, stop_at)
    except Exception as exc:  # a cell's failure is a result to report; the other cells still run
        return {"failed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}


# ---- CPU wall-clock per list, batch 1: AR, EAGLE chain, PAD-Rec chain, alternating in one process ----

def time_lists(engines: Path, histories: list, passes: int) -> dict:
    """ms per list of AR and of each draft's chain (manifest K, fused chain), the three timed in turn per user
    (the order rotating), on ONNX Runtime CPU; and whether every chain list equals AR's."""
    recs = {name: Recommender(engines / name, device="cpu") for name in ("eagle", "padrec")}
    runs = {"ar": (recs["padrec"], "off"), "eagle": (recs["eagle"], "chain"), "padrec": (recs["padrec"], "chain")}
    ms = {k: [] for k in runs}
    tau_sum, lists, same = {k: 0.0 for k in runs}, {}, True
    for name, (rec, mode) in runs.items():  # warm-up
        rec.recommend([histories[0]], params=DecodeParams(speculate=mode))
    for p in range(passes):
        for i, h in enumerate(histories):
            order = list(runs)[(i + p) % 3:] + list(runs)[:(i + p) % 3]
            for name in order:
                rec, mode = runs[name]
                t0 = time.perf_counter()
                res = rec.recommend([h], params=DecodeParams(speculate=mode))
                ms[name].append(1e3 * (time.perf_counter() - t0))
                tau_sum[name] += res.tau
                lists.setdefault(i, {})[name] = res.lists[0].item_ids
            same &= len({tuple(v) for v in lists[i].values()}) == 1
    n = passes * len(histories)
    out = {k: {"ms_per_list_median": float(np.median(v)), "ms_per_list_mean": float(np.mean(v)),
               "tau": tau_sum[k] / n} for k, v in ms.items()}
    for k in ("eagle", "padrec"):
        out[k]["speedup_vs_ar"] = out["ar"]["ms_per_list_median"] / out[k]["ms_per_list_median"]
    out["padrec_vs_eagle_pct"] = 100 * (out["eagle"]["ms_per_list_median"] / out["padrec"]["ms_per_list_median"] - 1)
    return {**out, "lists_equal_ar": bool(same), "users": len(histories), "passes": passes,
            "draft_steps": recs["padrec"].limits["draft_steps"]}


def wallclock(cfg: GridConfig, work: Path, summary: dict, deadline: float, earlier: dict) -> dict:
    """time_lists for every layout x data set with exported seed-0 engines, the largest PAD-Rec chain gain first,
    while time is left; a key this run cannot time (engines made by an earlier run, or no time left) keeps the
    earlier report's timing (`earlier`) where it has one."""
    gain = {k: v.get("gain_vs_eagle", {}).get("padrec", {}).get("chain_K4", {}).get("gain_pct_mean", -1e9)
            for k, v in summary.items()}
    out = {}
    for key in sorted(gain, key=lambda k: -gain[k]):
        layout, dataset = key.split("/")
        engines = work / "engines" / Cell(layout, dataset, min(cfg.seeds)).name
        have = (engines / "padrec").is_dir() and (engines / "eagle").is_dir()
        if not have or time.time() > deadline:
            kept = earlier.get(key, {})
            why = "no time left within --budget-s" if have else "no seed-0 engines in --work (trained in another run)"
            out[key] = kept if "ms_per_list_median" in kept.get("ar", {}) else {"skipped": why}
            continue
        test = make_split(load_dataset(dataset), users=cfg.train_users).test
        out[key] = time_lists(engines, [h for _, h, _ in test[:cfg.wallclock_users]], cfg.wallclock_passes)
        log("wall-clock", key, json.dumps(out[key]))
    return out


# ---- the report and the command line ----

def hardware(device: str) -> dict:
    info = cpu_info()
    if device == "cuda" and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_report(out: Path, cfg: GridConfig, records: dict, meta: dict, wall: dict | None) -> dict:
    """ablation_layouts.json: config, machine, every cell's record, the summary per layout x data set, what is
    missing and why, and the wall-clock stage."""
    done = {k: v for k, v in records.items() if "variants" in v}
    names = [c.name for c in grid(cfg)]
    report = {"format": "padrec-ablation-layouts", "version": 1, "config": asdict(cfg), **meta,
              "variants": {k: dict(zip(("use_slot", "use_step", "use_gates"), v)) for k, v in VARIANTS.items()},
              "summary": summarize([done[n] for n in names if n in done]),
              "missing": {n: {k: v for k, v in records.get(n, {"skipped": "not run"}).items() if k != "traceback"}
                          for n in names if n not in done},
              "wallclock_cpu_batch1": wall or {}, "cells": done}
    (out / (REPORT + ".tmp")).write_text(json.dumps(report, indent=1) + "\n")
    (out / (REPORT + ".tmp")).replace(out / REPORT)
    return report


def try_plots(report: dict, out: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("matplotlib is not installed here: no plots (make them with `ablation_layouts.py plot`)")
        return
    if not report["summary"]:
        log("no cell finished: no plots")
        return
    from ablation_plots import plot_acceptance, plot_tau
    plot_tau(report, out / "ablation_layouts.png")
    plot_acceptance(report, out / "acceptance_by_slot_depth.png")


@click.group()
def main():
    """The layout x draft-variant ablation (see the module docstring)."""


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="ablation_layouts.json and plots")
@click.option("--work", default="/tmp/padrec_ablation", show_default=True, type=click.Path(file_okay=False),
              help="cell records and seed-0 engines (kept out of --out: few files come back from a device call)")
@click.option("--resume", default=None, type=click.Path(dir_okay=False, exists=True),
              help="an earlier ablation_layouts.json: its cells are not run again")
@click.option("--quick", is_flag=True, help="CPU smoke run: one data set and seed, a tiny model, a few users")
@click.option("--device", default="cuda", show_default=True, type=click.Choice(["cuda", "cpu"]))
@click.option("--workers", default=0, show_default=True, help="processes (0: 4 per GPU on cuda, 1 on cpu)")
@click.option("--budget-s", default=None, type=float,
              help="end within this many seconds: a cell starts only if it can end by then less the wall-clock "
                   "stage's reserve [default: 510, none with --quick]")
@click.option("--layouts", default=",".join(LAYOUTS), show_default=True)
@click.option("--datasets", default=",".join(DATASETS), show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
def run(out, work, resume, quick, device, workers, budget_s, layouts, datasets, seeds):
    """Train and measure every cell not yet done, then time the seed-0 engines on the CPU; write the report."""
    t0 = time.time()
    cfg = GridConfig.quick() if quick else GridConfig()
    if not quick:
        cfg = replace(cfg, layouts=tuple(layouts.split(",")), datasets=tuple(datasets.split(",")),
                      seeds=tuple(int(s) for s in seeds.split(",")))
    budget_s = budget_s if budget_s is not None else (float("inf") if quick else 510.0)
    out, work = Path(out), Path(work)
    for p in (out, work / "cells"):
        p.mkdir(parents=True, exist_ok=True)
    workers = workers or (4 * torch.cuda.device_count() if device == "cuda" else 1)
    records = load_records(work, resume, cfg)
    # the resumed report's wall-clock stands until this run's own stage replaces it (a run cut short keeps it)
    earlier = json.loads(Path(resume).read_text()).get("wallclock_cpu_batch1", {}) if resume else {}
    # the longest cells (digits) first, then the others by seed, so that each layout's time is known early
    todo = sorted((c for c in grid(cfg) if "variants" not in records.get(c.name, {})),
                  key=lambda c: (c.layout != "digits", c.seed, cfg.datasets.index(c.dataset), c.layout))
    meta = {"device": device, "workers": workers, "budget_s": budget_s, "hardware": hardware(device),
            "commit": commit(), "gpu_estimate": GPU_ESTIMATE}
    log(f"{len(todo)} of {len(grid(cfg))} cells to run on {device} with {workers} worker(s)")
    durations: dict = {}  # seconds of the cells done, by layout: a cell starts only if it can end in time
    for r in records.values():
        if "variants" in r:
            durations.setdefault(r["layout"], []).append(r["seconds"])
    (work / "durations.json").write_text(json.dumps(durations))

    def on_record(cell, record):
        records[cell.name] = record
        if "variants" in record:
            (work / "cells" / f"{cell.name}.json").write_text(json.dumps(record))
            durations.setdefault(cell.layout, []).append(record["seconds"])
            (work / "durations.json").write_text(json.dumps(durations))
        log(cell.name, "done" if "variants" in record else record)
        write_report(out, cfg, records, {**meta, "elapsed_s": time.time() - t0}, earlier)

    run_cells(cfg, todo, device, workers, work, t0 + budget_s - WALLCLOCK_RESERVE_S, on_record)
    report = write_report(out, cfg, records, {**meta, "elapsed_s": time.time() - t0}, earlier)
    wall = wallclock(cfg, work, report["summary"], t0 + budget_s - 10, earlier)
    report = write_report(out, cfg, records, {**meta, "elapsed_s": time.time() - t0}, wall)
    try_plots(report, out)
    log(f"done in {time.time() - t0:.0f} s: {len(report['cells'])} cells, {len(report['missing'])} missing")


@main.command()
@click.argument("report", type=click.Path(dir_okay=False, exists=True))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="default: the report's folder")
def plot(report, out):
    """ablation_layouts.png and acceptance_by_slot_depth.png from a report."""
    out = Path(out or Path(report).parent)
    out.mkdir(parents=True, exist_ok=True)
    try_plots(json.loads(Path(report).read_text()), out)


if __name__ == "__main__":
    main()
