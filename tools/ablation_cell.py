"""One cell of the layout ablation (a token layout x data set x seed): its data, the target and five draft
variants trained at equal budget, and their measurements by greedy verification; runs in a worker process."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from padrec_export.data import load_dataset, make_split
from padrec_export.demo import default_model_dir
from padrec_export.models import DraftConfig, TargetConfig
from padrec_export.onnx_export import ExportLimits, export_engines
from padrec_export.pipeline import baseline_lists, ranking_metrics
from padrec_export.reference import reference_generate, reference_session
from padrec_export.train import TrainConfig, encode_example, train_draft, train_target
from padrec_runtime.errors import InputError
from padrec_runtime.grammar import Catalogue, ListConstraint, TokenLayout
from padrec_runtime.loop import DecodeConfig
from padrec_runtime.loop.state import Verdict

sys.path.insert(0, str(Path(__file__).parent))
from ablation_stats import AcceptanceCounts, simulate_chain, tau  # noqa: E402

VARIANTS = {  # name: (use_slot, use_step, use_gates)
    "eagle": (False, False, True), "padrec": (True, True, True), "slot-only": (True, False, True),
    "step-only": (False, True, True), "padrec-no-gates": (True, True, False)}
LAYOUTS = ("per_level", "shared", "digits")
DATASETS = ("ml-100k", "ml-9k")


@dataclass(frozen=True)
class GridConfig:
    """What is trained and measured; every draft variant gets the same budget."""

    layouts: tuple = LAYOUTS
    datasets: tuple = DATASETS
    seeds: tuple = (0, 1, 2)  # the target's and every draft's seed: variants of a cell share init and batches
    levels: int = 4  # the committed catalogues' semantic IDs (4 x 64), spelled by each layout
    codebook: int = 64
    hidden: int = 128  # target as the committed defaults: 4 layers, hidden 128, 4 heads, 2 KV heads
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 344
    target_epochs: int = 6
    draft_epochs: int = 3
    lr: float = 3e-3
    batch_size: int = 256
    unroll: int = 4  # draft training unrolled over this many steps (every variant)
    dtype: str = "float32"
    train_users: int | None = None  # None: every user's windows
    eval_users: int = 128  # held-out users for tau and acceptance
    quality_users: int | None = None  # held-out users for Recall / NDCG (None: all)
    decode_batch: int = 256
    probe_depth: int = 8
    chain_ks: tuple = (2, 3, 4, 5, 6, 7, 8)
    check_k: int = 4  # a real chain decode at this K checks the probe's simulated rounds
    wallclock_users: int = 16
    wallclock_passes: int = 3
    reductions: tuple = (  # against the committed defaults, to fit the grid into one 9-minute GPU call
        "target: 6 epochs, fixed, no validation selection, stride-5 windows, no dropout (committed defaults: ml-100k "
        "10 epochs validation-selected; ml-9k 8 epochs over stride-1 windows with dropout 0.2)",
        "drafts: 3 epochs (the committed defaults and the earlier draft ablation: 12)",
        "tau and acceptance on the first 128 held-out users of each data set; Recall / NDCG on all of them",
        "chain K = 2..8 not decoded one by one: the probe's per-position acceptance gives every K's rounds, "
        "checked against a real chain decode at K = 4")

    def __post_init__(self):
        if max(self.chain_ks) > self.probe_depth or self.check_k > self.probe_depth:
            raise InputError(f"GridConfig: chain_ks {self.chain_ks}, check_k {self.check_k} | got probe_depth "
                             f"{self.probe_depth} | expected every K <= probe_depth | raise probe_depth")
        unknown = set(self.layouts) - set(LAYOUTS) or set(self.datasets) - set(DATASETS)
        if unknown:
            raise InputError(f"GridConfig: unknown {sorted(unknown)} | expected layouts of {LAYOUTS}, data sets of "
                             f"{DATASETS} | pick from those")

    def cell_settings(self) -> dict:
        """What a cell's numbers depend on (not which cells make the grid, nor the wall-clock stage): records made
        with other settings are not reused."""
        skip = ("layouts", "datasets", "seeds", "wallclock_users", "wallclock_passes", "reductions")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k not in skip}

    @classmethod
    def quick(cls) -> "GridConfig":
        """A CPU smoke run: one data set and seed, a tiny model, a few users, one epoch."""
        return cls(datasets=("ml-100k",), seeds=(0,), hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64,
                   target_epochs=1, draft_epochs=1, batch_size=64, train_users=24, eval_users=6, quality_users=12,
                   decode_batch=6, chain_ks=(2, 4, 8), wallclock_users=3, wallclock_passes=1,
                   reductions=("--quick smoke run: tiny model, 24 users, 1 epoch; numbers mean nothing",))


@dataclass(frozen=True)
class Cell:
    layout: str
    dataset: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.layout}_{self.dataset}_s{self.seed}"


class LayoutUnavailable(Exception):
    """The installed padrec_runtime has no such token layout yet."""


def make_layout(kind: str, levels: int, codebook: int):
    if "kind" in TokenLayout.__dataclass_fields__:
        return TokenLayout(levels=levels, codebook=codebook, kind=kind)
    if kind != "per_level":
        raise LayoutUnavailable(f"layout {kind!r}: this padrec_runtime's TokenLayout has no `kind` (per_level only)")
    return TokenLayout(levels=levels, codebook=codebook)


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def expected_s(work: Path, layout: str, default: float = 300.0) -> float:
    """How long a cell of this layout takes here: the longest one so far in this run (durations.json), else a
    guess."""
    path = work / "durations.json"
    seen = json.loads(path.read_text()).get(layout, []) if path.exists() else []
    return max(seen) if seen else default


def cell_data(cfg: GridConfig, dataset: str, layout) -> dict:
    """The catalogue in this layout, the training sequences and the held-out users of one data set."""
    data = load_dataset(dataset)
    split = make_split(data, users=cfg.train_users)
    cat = Catalogue.load(default_model_dir(dataset) / "catalogue.json", layout)
    test = split.test[:cfg.quality_users] if cfg.quality_users else split.test
    return {"data": data, "split": split, "catalogue": cat, "constraint": ListConstraint(cat, n_items=10),
            "seqs": [encode_example(cat, h, t) for h, t in split.train], "test": test,
            "histories": [h for _, h, _ in test], "truth": [t for _, _, t in test]}


def train_cell_target(cfg: GridConfig, d: dict, seed: int, device: str):
    """The cell's target: fixed epochs, no selection (every layout alike)."""
    tc = TargetConfig(vocab_size=d["catalogue"].layout.vocab_size, hidden_size=cfg.hidden, n_layers=cfg.layers,
                      n_heads=cfg.heads, n_kv_heads=cfg.kv_heads, intermediate_size=cfg.intermediate)
    train = TrainConfig(epochs=cfg.target_epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, device=device,
                        dtype=cfg.dtype)
    t0 = time.perf_counter()
    target, curves = train_target(tc, d["seqs"], train, progress=False)
    return target, {"train_s": time.perf_counter() - t0, "loss_last": float(np.mean(curves["loss"][-20:]))}


def train_variant(cfg: GridConfig, target, d: dict, flags: tuple, seed: int, device: str):
    """One draft variant at the shared budget (same epochs, lr, batch, unroll and seed for all)."""
    use_slot, use_step, use_gates = flags
    tc, cat = target.cfg, d["catalogue"]
    dc = DraftConfig(hidden_size=tc.hidden_size, vocab_size=tc.vocab_size, n_heads=tc.n_heads,
                     n_kv_heads=tc.n_kv_heads, intermediate_size=tc.intermediate_size, n_slots=cat.layout.n_slots,
                     use_slot=use_slot, use_step=use_step, use_gates=use_gates)
    train = TrainConfig(epochs=cfg.draft_epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                        draft_steps=cfg.unroll, device=device, dtype=cfg.dtype)
    t0 = time.perf_counter()
    draft, curve = train_draft(target, dc, d["seqs"], train, cat, progress=False)
    return draft, {"use_slot": use_slot, "use_step": use_step, "use_gates": use_gates,
                   "train_s": time.perf_counter() - t0, "loss_last": float(np.mean(curve[-20:])),
                   "alpha": draft.alpha.item() if use_slot and use_gates else None}


class ProbeAcceptor:
    """Greedy chain verification that records, per row, how many draft tokens the target accepts from the
    round's start, then commits one token only (the target's own choice): the next round starts one position
    later, so every position of the list is probed as a round start."""

    def __init__(self, inner, constraint):
        self.inner, self.constraint, self.runs = inner, constraint, {}

    def accept(self, scored, b, root, tree):
        verdict = self.inner.accept(scored, b, root, tree)
        self.runs.setdefault(b, []).append(len(verdict.path) - 1)
        token = verdict.tokens[0]
        return Verdict([0], [token], self.constraint.advance(root.state, token))


def probe_acceptance(target, draft, histories: list, constraint, depth: int, batch: int) -> tuple[list, list]:
    """Per list: the accepted-run length at every output position (chain of `depth`), and the list's tokens."""
    runs, tokens = [], []
    for s in range(0, len(histories), batch):
        session = reference_session(target, draft, histories[s:s + batch], constraint,
                                    DecodeConfig(speculate="chain", draft_steps=depth))
        probe = ProbeAcceptor(session.acceptor, constraint)
        session.acceptor = probe
        while not session.done:
            session.step()
        out = session.result()
        runs += [probe.runs.get(b, []) for b in range(len(out.tokens))]
        tokens += out.tokens
    return runs, tokens


def decode(target, draft, histories: list, constraint, batch: int, **cfg):
    """Greedy lists and per-round committed tokens of a real decode (reference loop over the torch models)."""
    tokens, committed = [], []
    for s in range(0, len(histories), batch):
        g = reference_generate(target, draft, histories[s:s + batch], constraint, DecodeConfig(**cfg))
        tokens += g.tokens
        committed += g.committed
    return tokens, committed


def measure_variant(cfg: GridConfig, target, draft, d: dict, ar_tokens: list) -> dict:
    """tau for every chain K (from the probe) and tree, acceptance by depth and slot at the deepest K, and the
    probe's rounds checked against a real chain decode at cfg.check_k."""
    hist, con, lay = d["histories"][:cfg.eval_users], d["constraint"], d["catalogue"].layout
    t0 = time.perf_counter()
    runs, tokens = probe_acceptance(target, draft, hist, con, cfg.probe_depth, cfg.decode_batch)
    out = {"tau_chain": {str(k): tau([simulate_chain(r, k) for r in runs]) for k in cfg.chain_ks},
           "probe_identical_to_ar": tokens == ar_tokens[:len(hist)]}
    K = max(cfg.chain_ks)
    counts = AcceptanceCounts.zeros(K, lay.n_slots)
    for r, toks in zip(runs, tokens):
        counts.add(simulate_chain(r, K), lay.slots(np.asarray(toks)))
    out["acceptance_K"], out["acceptance"] = K, counts.to_json()
    toks, committed = decode(target, draft, hist, con, cfg.decode_batch, speculate="chain", draft_steps=cfg.check_k)
    simulated = [[x.committed for x in simulate_chain(r, cfg.check_k)] for r in runs]
    out["check"] = {"K": cfg.check_k, "tau_decoded": tau_of(committed),
                    "tau_simulated": out["tau_chain"].get(str(cfg.check_k), tau_of(simulated)),
                    "rows_equal": float(np.mean([a == b for a, b in zip(committed, simulated)])),
                    "identical_to_ar": toks == ar_tokens[:len(hist)]}
    toks, committed = decode(target, draft, hist, con, cfg.decode_batch, speculate="tree")
    out["tau_tree"], out["tree_identical_to_ar"] = tau_of(committed), toks == ar_tokens[:len(hist)]
    out["measure_s"] = time.perf_counter() - t0
    return out


def tau_of(committed: list) -> float:
    flat = [c for row in committed for c in row]
    return float(np.mean(flat)) if flat else 0.0


def measure_quality(target, d: dict, batch: int) -> tuple[list, dict, dict]:
    """The target's greedy (AR) lists of every quality user, their Recall@10 / NDCG@10, and the baselines'."""
    cat = d["catalogue"]
    tokens, _ = decode(target, None, d["histories"], d["constraint"], batch, speculate="off")
    quality = ranking_metrics([cat.decode_list(t) for t in tokens], d["truth"], 10)
    base = {k: ranking_metrics(v[:len(d["test"])], d["truth"], 10)
            for k, v in baseline_lists(d["data"], d["split"], 10).items()}
    return tokens, quality, base


def export_pair(target, drafts: dict, cat, engines: Path) -> None:
    """fp32 ONNX engines of the target with each draft (engines/<draft>/) for the CPU wall-clock stage."""
    limits = ExportLimits(max_seq_len=512, max_history=20, max_batch=4, n_items=10, draft_steps=4)
    target = target.cpu().float()
    for name, draft in drafts.items():
        export_engines(target, draft.cpu().float(), cat, engines / name, "fp32", limits, progress=False)


def run_cell(cfg: GridConfig, cell: Cell, device: str, work: str, stop_at: float) -> dict:
    """Train and measure one cell; returns its record ({"skipped": why} when it would not end by stop_at)."""
    if time.time() + expected_s(Path(work), cell.layout) > stop_at:
        return {"skipped": f"would not end within --budget-s (a {cell.layout} cell takes about "
                           f"{expected_s(Path(work), cell.layout):.0f} s here)"}
    try:
        layout = make_layout(cell.layout, cfg.levels, cfg.codebook)
    except LayoutUnavailable as exc:
        return {"skipped": str(exc)}
    t0 = time.perf_counter()
    d = cell_data(cfg, cell.dataset, layout)
    target, target_info = train_cell_target(cfg, d, cell.seed, device)
    ar_tokens, quality, baselines = measure_quality(target, d, cfg.decode_batch)
    record = {**asdict(cell), "settings": cfg.cell_settings(), "device": device, "n_slots": layout.n_slots,
              "vocab_size": layout.vocab_size,
              "train_examples": len(d["seqs"]), "eval_users": min(cfg.eval_users, len(d["histories"])),
              "quality_users": len(d["histories"]), "target": {**target_info, "quality": quality},
              "baselines": baselines, "variants": {}}
    keep = {}
    for name, flags in VARIANTS.items():
        draft, info = train_variant(cfg, target, d, flags, cell.seed, device)
        record["variants"][name] = {**info, **measure_variant(cfg, target, draft, d, ar_tokens)}
        log(cell.name, name, json.dumps({k: record["variants"][name][k] for k in ("tau_chain", "tau_tree")}))
        if cell.seed == min(cfg.seeds) and name in ("eagle", "padrec"):
            keep[name] = draft
        del draft
    if keep:
        export_pair(target, keep, d["catalogue"], Path(work) / "engines" / cell.name)
    record["seconds"] = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return record
