"""Acceptance length of the PAD-Rec and plain-EAGLE drafts by speculation depth K (chain, greedy, PyTorch).

Usage: python tools/tau_by_depth.py ml-100k [--users 192] -> benchmarks/results/tau_by_depth_<dataset>.json
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from padrec_export.checkpoint import load_draft
from padrec_export.data import load_dataset, make_split
from padrec_export.demo import default_model_dir
from padrec_export.pipeline import DRAFTS, load_trained
from padrec_export.reference import reference_generate
from padrec_runtime.loop import DecodeConfig
from padrec_runtime.grammar import ListConstraint


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", choices=["ml-100k", "ml-9k"])
    ap.add_argument("--users", type=int, default=192)
    ap.add_argument("--depths", default="2,4,6,8")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = default_model_dir(args.dataset)
    cat, target, _, _ = load_trained(model, draft=None)
    drafts = {n: load_draft(model / f"draft_{n}", target) for n in DRAFTS}
    hist = [h for _, h, _ in make_split(load_dataset(args.dataset)).test[:args.users]]
    con = ListConstraint(cat, n_items=10)
    rows = []
    for K in map(int, args.depths.split(",")):
        for mode in ("chain", "tree"):
            row = {"K": K, "mode": mode}
            for name, draft in drafts.items():
                committed = []
                for s in range(0, len(hist), 64):
                    g = reference_generate(target, draft, hist[s:s + 64], con, DecodeConfig(speculate=mode, draft_steps=K))
                    committed += [c for r in g.committed for c in r]
                row[f"tau_{name}"] = float(np.mean(committed))
            row["padrec_gain_pct"] = 100 * (row["tau_padrec"] / row["tau_eagle"] - 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path("benchmarks/results") / f"tau_by_depth_{args.dataset}.json"
    out.write_text(json.dumps({"dataset": args.dataset, "users": len(hist), "n_items": 10, "greedy": True,
                               "tree": {"topk": 4, "size": 16}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
