"""Draft and target ablations on the GPU: draft variants (slot / step / both / neither, unroll depth, seeds)
against the committed ml-100k target, and an ml-9k target sweep selected by validation Recall@10.

    python tools/gpu_ablation.py drafts --out DIR      # -> DIR/ablation_drafts.json
    python tools/gpu_ablation.py targets --out DIR     # -> DIR/sweep_ml9k.json (+ DIR/ml-9k.tar.gz of the pick)
"""
import argparse
import json
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from padrec_export.checkpoint import load_target, save_draft, save_target
from padrec_export.data import load_dataset, make_split
from padrec_export.demo import default_model_dir
from padrec_export.models import DraftConfig, TargetConfig
from padrec_export.pipeline import baseline_lists, ranking_metrics
from padrec_export.reference import reference_generate
from padrec_export.train import TrainConfig, encode_example, train_draft, train_target
from padrec_runtime.loop import DecodeConfig
from padrec_runtime.grammar import Catalogue, ListConstraint, TokenLayout

VARIANTS = {  # name: (use_slot, use_step, unrolled steps, seed)
    "eagle": (False, False, 4, 0), "padrec": (True, True, 4, 0),
    "eagle-seed1": (False, False, 4, 1), "padrec-seed1": (True, True, 4, 1),
    "slot-only": (True, False, 4, 0), "step-only": (False, True, 4, 0), "padrec-unroll6": (True, True, 6, 0),
}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def decode_all(target, draft, histories, con, cfg, batch=64):
    tokens, committed = [], []
    for s in range(0, len(histories), batch):
        g = reference_generate(target, draft, histories[s:s + batch], con, cfg)
        tokens += g.tokens
        committed += [c for row in g.committed for c in row]
    return tokens, float(np.mean(committed))


def drafts(args, device):
    model = default_model_dir("ml-100k")
    layout = TokenLayout(4, 64)
    cat = Catalogue.load(model / "catalogue.json", layout)
    target = load_target(model / "target").to(device)
    data = load_dataset("ml-100k")
    split = make_split(data, users=args.users)
    seqs = [encode_example(cat, h, t) for h, t in split.train]
    hist = [h for _, h, _ in split.test]
    con = ListConstraint(cat, n_items=10)
    ar, _ = decode_all(target, None, hist, con, DecodeConfig(speculate="off"))
    rows = []
    variants = dict(list(VARIANTS.items())[:2]) if device == "cpu" else VARIANTS  # CPU: a smoke run
    for name, (use_slot, use_step, unroll, seed) in variants.items():
        dc = DraftConfig(hidden_size=target.cfg.hidden_size, vocab_size=target.cfg.vocab_size,
                         n_heads=target.cfg.n_heads, n_kv_heads=target.cfg.n_kv_heads,
                         intermediate_size=target.cfg.intermediate_size, n_slots=layout.n_slots,
                         use_slot=use_slot, use_step=use_step)
        cfg = TrainConfig(epochs=args.epochs, batch_size=256, lr=3e-3, seed=seed, draft_steps=unroll, device=device)
        t0 = time.perf_counter()
        draft, curve = train_draft(target, dc, seqs, cfg, cat, progress=False)
        row = {"variant": name, "use_slot": use_slot, "use_step": use_step, "unroll": unroll, "seed": seed,
               "train_s": time.perf_counter() - t0, "loss_last": float(np.mean(curve[-20:])),
               "alpha": draft.alpha.item() if use_slot else None}
        for mode, K in (("chain", 4), ("tree", 4), ("chain", 6)):
            toks, tau = decode_all(target, draft, hist, con, DecodeConfig(speculate=mode, draft_steps=K))
            row[f"tau_{mode}_K{K}"] = tau
            row[f"identical_{mode}_K{K}"] = toks == ar
        rows.append(row)
        log(json.dumps(row))
        (Path(args.out) / "ablation_drafts.json").write_text(json.dumps(
            {"dataset": "ml-100k", "users": len(hist), "draft_epochs": args.epochs, "device": str(device),
             "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "rows": rows}, indent=2) + "\n")


@dataclass(frozen=True)
class SweepData:
    """What every configuration of the ml-9k target sweep trains on and is scored against."""

    cat: Catalogue
    seqs: list  # encoded training windows at the default stride (5); train + valid windows with --final
    dense: dict  # stride (1, 2) -> encoded training windows at that stride
    valid: list  # encoded validation examples (the per-epoch validation loss)
    con: ListConstraint
    v_hist: list  # validation histories and their held-out items (selection)
    v_truth: list
    t_hist: list  # test histories and their held-out items (only reported)
    t_truth: list
    popularity_test: dict  # the popularity baseline's test metrics


def sweep_data(args) -> SweepData:
    """The ml-9k split encoded with the catalogue of --catalogue (--users: the first users only)."""
    data = load_dataset("ml-9k")
    split = make_split(data, users=args.users)
    cat = Catalogue.load(Path(args.catalogue), TokenLayout(4, 64))
    seqs = [encode_example(cat, h, t) for h, t in split.train]
    dense = {stride: [encode_example(cat, h, t) for h, t in
                      make_split(data, users=args.users, stride=stride, final=args.final).train]
             for stride in (1, 2)}
    if args.final:  # refit of a chosen configuration on train + valid windows: fixed epochs, no selection
        seqs = [encode_example(cat, h, t) for h, t in make_split(data, users=args.users, final=True).train]
    t_truth = [t for _, _, t in split.test]
    return SweepData(cat, seqs, dense, [encode_example(cat, h, t) for _, h, t in split.valid],
                     ListConstraint(cat, n_items=10), [h for _, h, _ in split.valid], [t for _, _, t in split.valid],
                     [h for _, h, _ in split.test], t_truth,
                     ranking_metrics(baseline_lists(data, split, 10)["popularity"], t_truth, 10))


def sweep_grid(args, device) -> list:
    """The configurations: (hidden, layers, lr, weight decay, epochs, window stride[, dropout]) each."""
    grid = [(128, 4, 3e-3, 0.01, 10, 5), (128, 2, 1e-3, 0.1, 12, 5), (64, 2, 3e-3, 0.1, 12, 5),
            (256, 2, 1e-3, 0.1, 8, 5), (128, 4, 1e-3, 0.1, 12, 5),
            ] if args.sweep is None else [tuple(x) for x in json.loads(args.sweep)]
    return [(32, 1, 3e-3, 0.01, 1, 5)] if device == "cpu" else grid  # CPU: a smoke run of this script


def fit_target(d: SweepData, config: tuple, args, device):
    """Train one configuration; returns its row (validation and test metrics of its greedy lists), the target and
    its config."""
    hidden, layers, lr, wd, epochs, stride, *rest = config
    dropout = rest[0] if rest else 0.0
    tc = TargetConfig(vocab_size=d.cat.layout.vocab_size, hidden_size=hidden, n_layers=layers,
                      n_heads=max(2, hidden // 32), n_kv_heads=2, intermediate_size=int(hidden * 2.6875 / 8) * 8)
    cfg = TrainConfig(epochs=epochs, batch_size=256, lr=lr, weight_decay=wd, device=device, dropout=dropout)
    t0 = time.perf_counter()
    train_seqs = d.seqs if stride == 5 else d.dense[stride]
    target, curves = train_target(tc, train_seqs, cfg, progress=False, valid=None if args.final else d.valid,
                                  list_len=50)
    if args.final:
        curves["valid"] = [0.0] * epochs
    vt, _ = decode_all(target, None, d.v_hist, d.con, DecodeConfig(speculate="off"))
    tt, _ = decode_all(target, None, d.t_hist, d.con, DecodeConfig(speculate="off"))
    row = {"hidden": hidden, "layers": layers, "lr": lr, "weight_decay": wd, "epochs": epochs, "stride": stride,
           "dropout": dropout,
           "examples": len(train_seqs),
           "best_epoch": int(np.argmin(curves["valid"])) + 1, "train_s": time.perf_counter() - t0,
           "valid": ranking_metrics([d.cat.decode_list(t) for t in vt], d.v_truth, 10),
           "test": ranking_metrics([d.cat.decode_list(t) for t in tt], d.t_truth, 10)}
    return row, target, tc


def pack_pick(row: dict, target, tc: TargetConfig, d: SweepData, args, device) -> None:
    """Retrain both drafts for the chosen target (the default budget) and pack the model directory as
    --out/ml-9k.tar.gz."""
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "ml-9k").mkdir(parents=True)
    shutil.copy(args.catalogue, work / "ml-9k" / "catalogue.json")
    save_target(target.cpu().float(), work / "ml-9k" / "target", extra={"layout": {"levels": 4, "codebook": 64},
                                                                        "dataset": "ml-9k"})
    target = target.to(device)
    train_report = {"dataset": "ml-9k", "examples": len(d.seqs), "target": row}
    for name, on in (("padrec", True), ("eagle", False)):
        dc = DraftConfig(hidden_size=tc.hidden_size, vocab_size=tc.vocab_size, n_heads=tc.n_heads,
                         n_kv_heads=tc.n_kv_heads, intermediate_size=tc.intermediate_size, n_slots=6,
                         use_slot=on, use_step=on)
        dcfg = TrainConfig(epochs=12 if device != "cpu" else 1, batch_size=256, lr=3e-3, device=device)
        draft, curve = train_draft(target, dc, d.seqs, dcfg, d.cat, progress=False)
        save_draft(draft.cpu().float(), work / "ml-9k" / f"draft_{name}", extra={"dataset": "ml-9k"})
        train_report[f"draft_{name}"] = {"train": dcfg.to_dict(), "loss_last": float(np.mean(curve[-20:])),
                                         "alpha": draft.alpha.item() if on else None}
        log("draft", name, train_report[f"draft_{name}"]["loss_last"])
    (work / "ml-9k" / "train_report.json").write_text(json.dumps(train_report, indent=2))
    with tarfile.open(Path(args.out) / "ml-9k.tar.gz", "w:gz") as tar:
        tar.add(work / "ml-9k", arcname="ml-9k")


def targets(args, device):
    """The ml-9k target sweep, selected by validation recall@10 (report rewritten after every row), then the
    pick's drafts and model directory."""
    d = sweep_data(args)
    rows, best = [], None
    for config in sweep_grid(args, device):
        row, target, tc = fit_target(d, config, args, device)
        rows.append(row)
        log(json.dumps(row))
        if best is None or row["valid"]["recall@10"] > best[0]["valid"]["recall@10"]:
            best = (row, target, tc)
        report = {"dataset": "ml-9k", "final_refit": args.final,
                  "selection": "validation recall@10 (the test split is only reported)",
                  "popularity_test": d.popularity_test, "rows": rows, "chosen": best[0]}
        (Path(args.out) / "sweep_ml9k.json").write_text(json.dumps(report, indent=2) + "\n")
    pack_pick(*best, d, args, device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["drafts", "targets"])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default="ml9k_pick", help="scratch directory for the chosen ml-9k models (targets)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--catalogue", default="padrec_export/default_models/ml-9k/catalogue.json")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--sweep", default=None, help="JSON list of [hidden, layers, lr, wd, epochs, stride(, dropout)]")
    ap.add_argument("--final", action="store_true", help="refit on train + valid windows (epochs as given)")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.cpu else "cuda"
    drafts(args, device) if args.part == "drafts" else targets(args, device)


if __name__ == "__main__":
    main()
