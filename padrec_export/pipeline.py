"""End-to-end jobs: prepare semantic IDs, train target and drafts, evaluate, export checkpoints."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from padrec_runtime.loop import DecodeConfig
from padrec_runtime.errors import CheckpointError, InputError
from padrec_runtime.grammar import LAYOUT_KINDS, Catalogue, ListConstraint, TokenLayout

from .checkpoint import check_draft_pairing, load_draft, load_target, read_json_object, save_draft, save_target
from .data import Interactions, item_titles, load_dataset, make_split
from .models import DraftConfig, TargetConfig
from .onnx_export import TORCH_DTYPES, ExportLimits, export_engines
from .reference import reference_generate
from .semantic_ids import embed_texts, residual_kmeans
from .sizes import ModelSize  # noqa: F401  (re-exported: callers import it from here)
from .train import TrainConfig, check_device, encode_example, train_draft, train_target
from .vocab_map import compact_target, vocab_map

DRAFTS = {"padrec": (True, True), "eagle": (False, False)}  # name -> (use_slot, use_step)


def prepare_catalogue(data: Interactions, out: Path, layout: TokenLayout, seed: int = 0,
                      progress: bool = True) -> Catalogue:
    """Semantic IDs for every item (reused from out/catalogue.json when present); titles never stored. The codes
    do not depend on the layout's kind (only how they are spelled as tokens does)."""
    path = out / "catalogue.json"
    if path.exists():
        return Catalogue.load(path, layout)
    emb = embed_texts(data.item_text, progress=progress)
    sid = residual_kmeans(emb, layout.levels, layout.codebook, seed)
    cat = Catalogue(layout, data.item_ids, sid.sids)
    out.mkdir(parents=True, exist_ok=True)
    cat.save(path)
    (out / "semantic_ids.json").write_text(json.dumps(sid.report, indent=2))
    return cat


@dataclass(frozen=True)
class Examples:
    """A data set's training material over a catalogue."""

    cat: Catalogue
    seqs: list  # prompt + list sequences, windows every 5 items (the drafts')
    valid: list  # one validation sequence per user
    dense: list  # the target's windows (every `stride` items; seqs when stride is 5)
    list_len: int = 0  # `train_target`'s: 0, each list is the tokens after its <list> (items vary in length)


def training_examples(dataset: str, out: Path, levels: int = 4, codebook: int = 64, users: int | None = None,
                      stride: int = 5, seed: int = 0, progress: bool = True,
                      layout: TokenLayout | None = None) -> Examples:
    """The catalogue (out/catalogue.json, made when missing) and the encoded training sequences. layout: the
    token layout (None: per_level of `levels` and `codebook`)."""
    data = load_dataset(dataset)
    cat = prepare_catalogue(data, Path(out), layout or TokenLayout(levels, codebook), seed, progress)
    split = make_split(data, users=users)
    seqs = [encode_example(cat, h, t) for h, t in split.train]
    valid = [encode_example(cat, h, t) for _, h, t in split.valid]
    dense = seqs if stride == 5 else [encode_example(cat, h, t) for h, t in
                                      make_split(data, users=users, stride=stride).train]
    return Examples(cat, seqs, valid, dense)


def target_config(size: ModelSize, cat: Catalogue) -> TargetConfig:
    return TargetConfig(vocab_size=cat.layout.vocab_size, hidden_size=size.hidden, n_layers=size.layers,
                        n_heads=size.heads, n_kv_heads=size.kv_heads, intermediate_size=size.intermediate)


def draft_config(target: TargetConfig, cat: Catalogue, name: str) -> DraftConfig:
    """The draft `name` (a key of DRAFTS) for a target: one decoder layer of its shape."""
    use_slot, use_step = DRAFTS[name]
    return DraftConfig(hidden_size=target.hidden_size, vocab_size=target.vocab_size, n_heads=target.n_heads,
                       n_kv_heads=target.n_kv_heads, intermediate_size=target.intermediate_size,
                       n_slots=cat.layout.n_slots, use_slot=use_slot, use_step=use_step)


def train_all(dataset: str, out, size: ModelSize = ModelSize(), target_cfg: TrainConfig = TrainConfig(),
              draft_cfg: TrainConfig = TrainConfig(epochs=4), levels: int = 4, codebook: int = 64,
              users: int | None = None, progress: bool = True, stride: int = 5,
              drafts: tuple = tuple(DRAFTS), layout: TokenLayout | None = None) -> dict:
    """Catalogue, target and drafts (PAD-Rec, plain EAGLE: `drafts` names which) under out/; returns the
    training report. stride: items between a user's consecutive training windows (the target's; drafts use
    stride 5). layout: the token layout (its levels and codebook replace `levels` and `codebook`; None: the
    per_level layout of those)."""
    unknown = set(drafts) - set(DRAFTS)
    if unknown or not drafts:
        raise InputError(f"drafts: got {list(drafts)} | expected some of {', '.join(DRAFTS)}")
    check_device(target_cfg.device)
    check_device(draft_cfg.device)
    out = Path(out)
    layout = layout or TokenLayout(levels, codebook)
    ex = training_examples(dataset, out, users=users, stride=stride, seed=target_cfg.seed, progress=progress,
                           layout=layout)
    tc = target_config(size, ex.cat)
    t0 = time.perf_counter()
    target, curves = train_target(tc, ex.dense, target_cfg, progress, valid=ex.valid, list_len=ex.list_len)
    report = {"dataset": dataset, "layout": layout.to_json(), "examples": len(ex.seqs), "size": asdict(size),
              "target": target_report(target_cfg, curves, time.perf_counter() - t0)}
    save_target(target, out / "target", extra={"layout": layout.to_json(), "dataset": dataset})
    for name in drafts:
        t0 = time.perf_counter()
        draft, dcurve = train_draft(target, draft_config(tc, ex.cat, name), ex.seqs, draft_cfg, ex.cat, progress)
        save_draft(draft, out / f"draft_{name}", extra={"dataset": dataset})
        report[f"draft_{name}"] = draft_report(draft_cfg, draft, dcurve, time.perf_counter() - t0)
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    return report


def target_report(cfg: TrainConfig, curves: dict, seconds: float) -> dict:
    loss, valid = curves["loss"], curves["valid"]
    return {"train": cfg.to_dict(), "loss_first": loss[0], "loss_last": float(np.mean(loss[-20:])),
            "valid_list_loss": valid, "best_epoch": int(np.argmin(valid)) + 1 if valid else None,
            "seconds": seconds}


def draft_report(cfg: TrainConfig, draft, curve: list, seconds: float) -> dict:
    return {"train": cfg.to_dict(), "loss_first": curve[0], "loss_last": float(np.mean(curve[-20:])),
            "seconds": seconds, "alpha": draft.alpha.item() if draft.cfg.use_slot else None}


def read_layout(meta: dict, where) -> TokenLayout:
    """padrec.json's "layout": levels, codebook and optionally kind (left out: per_level)."""
    lay = meta.get("layout")
    keys = {"levels", "codebook", "kind"}
    if not isinstance(lay, dict) or not {"levels", "codebook"} <= set(lay) <= keys \
            or not all(type(lay[k]) is int and lay[k] >= 1 for k in ("levels", "codebook")) \
            or lay.get("kind", "per_level") not in LAYOUT_KINDS:
        raise CheckpointError(f"{where} layout | got {str(lay)[:80]} | expected {{\"levels\": L, \"codebook\": C, "
                              f"\"kind\": one of {', '.join(LAYOUT_KINDS)} (default per_level)}} | fix padrec.json")
    return TokenLayout(**lay)


def load_trained(model_dir, draft: str = "padrec", dtype: torch.dtype | None = torch.float32):
    """(catalogue, target, draft or None, meta) from a directory written by train_all; dtype: the target's, as
    `load_target` (None keeps the checkpoint's: a bf16 7B target is never copied to fp32)."""
    model_dir = Path(model_dir)
    meta_path = model_dir / "target" / "padrec.json"
    if not meta_path.exists():
        raise CheckpointError(f"{model_dir}: no target/padrec.json | train with `padrec train` first")
    meta = read_json_object(meta_path, "padrec.json")
    layout = read_layout(meta, meta_path)
    cat = Catalogue.load(model_dir / "catalogue.json", layout)
    target = load_target(model_dir / "target", dtype)
    d = load_draft(model_dir / f"draft_{draft}", target) if draft else None
    return cat, target, d, meta


def with_titles(cat: Catalogue, dataset: str | None) -> Catalogue:
    """The catalogue with titles from the installed data package, when it is installed."""
    titles = item_titles(dataset) if dataset else None
    if not titles:
        return cat
    return Catalogue(cat.layout, cat.item_ids, cat.sids, [titles.get(int(i), "") for i in cat.item_ids])


def load_target_dir(target_dir, dtype=torch.float32):
    """(catalogue, target, padrec.json) of a target directory: a Hugging Face checkpoint with padrec.json (the
    token layout, and where its tokens sit in the checkpoint's vocabulary: vocab_map.py) and catalogue.json
    (items -> semantic IDs) beside it or one directory up. dtype: as `load_target` (None keeps the
    checkpoint's)."""
    target_dir = Path(target_dir)
    meta_path = target_dir / "padrec.json"
    if not meta_path.exists():
        raise CheckpointError(f"{target_dir}: no padrec.json (token layout) | export a padrec-trained target, or "
                              "add padrec.json with {\"layout\": {\"levels\": L, \"codebook\": C}}")
    meta = read_json_object(meta_path, "padrec.json")
    layout = read_layout(meta, meta_path)
    cat_path = target_dir / "catalogue.json"
    if not cat_path.exists():
        cat_path = target_dir.parent / "catalogue.json"
    if not cat_path.exists():
        raise CheckpointError(f"{target_dir}: no catalogue.json next to the target | it maps items to semantic IDs")
    cat = with_titles(Catalogue.load(cat_path, layout), meta.get("dataset"))
    target = load_target(target_dir, dtype)
    vmap = vocab_map(meta, layout, target_dir, target.cfg.vocab_size)
    if vmap is not None:  # the checkpoint keeps its own vocabulary: padrec's tokens are rows of it
        target = compact_target(target, vmap)
    elif target.cfg.vocab_size != layout.vocab_size:
        raise CheckpointError(f"{target_dir}: config.json vocab_size {target.cfg.vocab_size} | expected "
                              f"{layout.vocab_size} (the {layout.kind} layout of {layout.levels} x {layout.codebook} "
                              "codes) | "
                              "add a \"vocab\" map to padrec.json saying where those tokens are in this vocabulary")
    return cat, target, meta


def export_checkpoints(target_dir, draft_dir, out_dir, precision="fp32", max_seq_len=512, max_history=50,
                       max_batch=64, draft_steps: int = 4, fused_chain: bool = True, fused_target: bool = True,
                       external_data: bool | None = None, device: str = "cpu", reuse_target=None,
                       quantization=None):
    """`padrec export`: checkpoints (target dir with padrec.json + catalogue.json) -> engine directory. The
    target is read straight into the export precision (tensor by tensor: a bf16 checkpoint exported in fp16 or
    bf16 is never copied to fp32). device: where the graphs are traced (cuda: a 7B target's trace in seconds,
    not CPU fp16 matmuls). reuse_target: an engine directory of this same target whose target graphs are
    hard-linked in (export_engines)."""
    for flag, path in (("--target", target_dir), ("--draft", draft_dir)):
        if path is not None and not Path(path).is_dir():
            what = "is a file" if Path(path).exists() else "directory not found"
            raise CheckpointError(f"{flag} {path}: {what} | expected a checkpoint directory written by `padrec "
                                  "train` (config.json, model.safetensors) | check the path")
    dtype = TORCH_DTYPES.get(precision)
    if dtype is None:
        raise InputError(f"precision: got {precision!r} | expected one of {', '.join(TORCH_DTYPES)}")
    if draft_dir:
        check_draft_pairing(draft_dir, target_dir)
    cat, target, _ = load_target_dir(target_dir, dtype)
    target = target.to(device)
    draft = load_draft(draft_dir, target).to(device, dtype) if draft_dir else None
    limits = ExportLimits(max_seq_len=max_seq_len, max_history=max_history, max_batch=max_batch,
                          draft_steps=draft_steps, fused_chain=fused_chain, fused_target=fused_target)
    return export_engines(target, draft, cat, out_dir, precision, limits, external_data=external_data,
                          reuse_target=reuse_target, quantization=quantization)


def ranking_metrics(lists: list, held_out: list, k: int) -> dict:
    """Recall@k and NDCG@k (binary relevance) averaged over users."""
    recall, ndcg = [], []
    for rec, truth in zip(lists, held_out):
        truth = set(truth)
        hits = [1.0 if i in truth else 0.0 for i in rec[:k]]
        recall.append(sum(hits) / len(truth))
        ideal = sum(1.0 / np.log2(r + 2) for r in range(min(k, len(truth))))
        ndcg.append(sum(h / np.log2(r + 2) for r, h in enumerate(hits)) / ideal)
    return {f"recall@{k}": float(np.mean(recall)), f"ndcg@{k}": float(np.mean(ndcg))}


def baseline_lists(data: Interactions, split, k: int) -> dict:
    """Popularity and item co-occurrence lists for every test user, history items excluded."""
    counts: dict = {}
    co: dict = {}
    for hist, nxt in split.train:
        for i in nxt:
            counts[i] = counts.get(i, 0) + 1
    for user, hist, _ in split.test:
        seq = data.sequences[user][:len(data.sequences[user]) - k]
        for a, b in zip(seq, seq[1:]):
            co.setdefault(a, {}).setdefault(b, 0)
            co[a][b] += 1
            co.setdefault(b, {}).setdefault(a, 0)
            co[b][a] += 1
    popular = sorted(counts, key=lambda i: -counts[i])
    pop_lists, co_lists = [], []
    for _, hist, _ in split.test:
        seen = set(hist)
        pop_lists.append([i for i in popular if i not in seen][:k])
        score: dict = {}
        for w, h in enumerate(reversed(hist)):
            for j, c in co.get(h, {}).items():
                if j not in seen:
                    score[j] = score.get(j, 0.0) + c / (1 + 0.1 * w)
        ranked = sorted(score, key=lambda j: (-score[j], -counts.get(j, 0)))
        ranked += [i for i in popular if i not in seen and i not in score]
        co_lists.append(ranked[:k])
    return {"popularity": pop_lists, "co-occurrence": co_lists}


def evaluate(model_dir, dataset: str | None = None, n_items: int = 10, users: int | None = None, batch: int = 32,
             draft_steps: int = 4, tree_topk: int = 4, tree_size: int = 16, progress: bool = True) -> dict:
    """Quality of the target's lists vs baselines, and tau of each draft (chain, tree), greedy, on the held-out
    users of the data set the models were trained on (`dataset`, if given, must be that one)."""
    cat, target, _, meta = load_trained(model_dir, draft=None)
    trained_on = meta.get("dataset")
    if dataset is not None and trained_on is not None and dataset != trained_on:
        raise InputError(f"--dataset {dataset}: the models in {model_dir} were trained on {trained_on} (their item "
                         f"ids are that set's) | drop --dataset, or pass --dataset {trained_on}")
    dataset = dataset or trained_on or "ml-100k"
    data = load_dataset(dataset)
    split = make_split(data, n_items=n_items)
    test = split.test[:users] if users else split.test
    drafts = {name: load_draft(Path(model_dir) / f"draft_{name}", target) for name in DRAFTS
              if (Path(model_dir) / f"draft_{name}").is_dir()}  # `padrec train --drafts` may have skipped one
    con = ListConstraint(cat, n_items=n_items)
    hist = [h for _, h, _ in test]
    truth = [t for _, _, t in test]
    report = {"dataset": dataset, "users": len(test), "n_items": n_items,
              "decode": {"draft_steps": draft_steps, "tree_topk": tree_topk, "tree_size": tree_size}}
    runs = [("ar", None, "off")] + [(f"{n}-{m}", n, m) for n in drafts for m in ("chain", "tree")]
    tokens: dict = {}
    bar = tqdm(runs, desc="evaluate", unit="decoder", disable=not progress)
    for name, draft, mode in bar:
        bar.set_postfix_str(f"{name} over {len(hist)} users")  # each takes seconds to minutes on a CPU
        cfg = DecodeConfig(speculate=mode, draft_steps=draft_steps, tree_topk=tree_topk, tree_size=tree_size)
        toks, committed, t0 = [], [], time.perf_counter()
        for s in range(0, len(hist), batch):
            g = reference_generate(target, drafts.get(draft), hist[s:s + batch], con, cfg)
            toks += g.tokens
            committed += [c for row in g.committed for c in row]
        tokens[name] = toks
        report[name] = {"tau": float(np.mean(committed)), "seconds": time.perf_counter() - t0,
                        "identical_to_ar": toks == tokens["ar"]}
    lists = [cat.decode_list(t) for t in tokens["ar"]]
    report["quality"] = {"target": ranking_metrics(lists, truth, n_items)}
    for name, bl in baseline_lists(data, split, n_items).items():
        report["quality"][name] = ranking_metrics(bl[:len(test)], truth, n_items)
    return report
