"""Bring your own target: a draft trained against an existing target checkpoint (`padrec train-draft`),
resumable epoch by epoch, written as a draft directory `padrec export` pairs with that target."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from padrec_runtime.errors import InputError
from padrec_runtime.grammar import Catalogue

from .checkpoint import save_draft, target_digest
from .data import load_dataset, make_split
from .models import DraftConfig
from .pipeline import DRAFTS, load_target_dir
from .train import TrainConfig, encode_example, train_draft
from .trainer import load_state, save_state


def draft_examples(cat: Catalogue, dataset: str, users: int | None) -> list:
    """Training sequences (prompt + list) of a data set over a target's catalogue; windows naming items the
    catalogue lacks are skipped."""
    split = make_split(load_dataset(dataset), users=users)
    known = set(cat.item_ids.tolist())
    seqs = [encode_example(cat, h, t) for h, t in split.train if known.issuperset(h) and known.issuperset(t)]
    if not seqs:
        raise InputError(f"{dataset}: no training window whose items are all in the target's catalogue "
                         f"({len(split.train)} windows) | train on the data set the catalogue was made for")
    return seqs


def train_draft_for(target_dir, dataset: str, out, kind: str = "padrec", cfg: TrainConfig = TrainConfig(epochs=4),
                    users: int | None = None, progress: bool = True) -> dict:
    """`padrec train-draft`: a draft of `kind` trained against an existing target checkpoint, written to out/ as
    a draft directory `padrec export --target target_dir --draft out` pairs with it. Resumable: each epoch
    saves out/train_state.pt (weights, optimizer, schedule); a rerun with the same settings continues."""
    if kind not in DRAFTS:
        raise InputError(f"draft kind: got {kind!r} | expected one of {', '.join(DRAFTS)}")
    out = Path(out)
    cat, target, _ = load_target_dir(target_dir)  # fp32: the draft trains against fp32 features
    digest = target_digest(target_dir)
    settings = {"kind": kind, "dataset": dataset, "users": users, "target_digest": digest,
                "train": {k: v for k, v in cfg.to_dict().items() if k not in ("epochs", "device")}}
    state = _resume_state(out, settings)
    seqs = draft_examples(cat, dataset, users)
    t = target.cfg
    use_slot, use_step = DRAFTS[kind]
    dc = DraftConfig(hidden_size=t.hidden_size, vocab_size=t.vocab_size, n_heads=t.n_heads, n_kv_heads=t.n_kv_heads,
                     intermediate_size=t.intermediate_size, n_slots=cat.layout.n_slots, use_slot=use_slot,
                     use_step=use_step, rope_theta=t.rope_theta, rms_eps=t.rms_eps)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    draft, curve = train_draft(target, dc, seqs, cfg, cat, progress, resume=state,
                               on_epoch=lambda p: _save_state(out, settings, p))
    save_draft(draft.cpu().float(), out, extra={"dataset": dataset, "kind": kind, "target_digest": digest})
    report = {"target": str(target_dir), "dataset": dataset, "kind": kind, "examples": len(seqs),
              "epochs": cfg.epochs, "resumed_from_epoch": state["epochs_done"] if state else 0,
              "steps": len(curve), "loss_first": curve[0] if curve else None,
              "loss_last": float(np.mean(curve[-20:])) if curve else None, "seconds": time.perf_counter() - t0,
              "alpha": draft.alpha.item() if use_slot else None}
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    return report


STATE = "train_state.pt"  # a draft directory's training progress (see train_draft_for)


def _save_state(out: Path, settings: dict, progress) -> None:
    save_state(out / STATE, settings, progress.state())


def _resume_state(out: Path, settings: dict) -> dict | None:
    """The saved progress in out/ (None when there is none); refused when it was made with other settings."""
    return load_state(out / STATE, settings)
