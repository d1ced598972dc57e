"""Per-graph parity: the same real-shaped feeds through PyTorch and an engine backend, error per output."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from padrec_runtime.cache.host import KV_INPUT, KV_OUTPUT
from padrec_runtime.errors import CheckpointError, InputError
from padrec_export.qa_feeds import graph_cases

from .onnx_export import TORCH_DTYPES
from .models import DraftChain
from .quantize import Quantization, quantized_twin
from .reference import _call, _call_chain, next_token_logits


@dataclass
class Comparison:
    """One output of one case: how far the engine is from PyTorch."""

    graph: str
    case: str
    output: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ok: bool  # every element within atol + rtol * |reference|

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def torch_outputs(model, is_draft: bool, feeds: dict, precision: str) -> dict:
    """PyTorch outputs (as float32 numpy) of the model cast to the engine's precision."""
    if precision != "fp32":
        model = copy.deepcopy(model).to(TORCH_DTYPES[precision])
    if isinstance(model, DraftChain):
        return {"tokens": _call_chain(model, feeds)["tokens"]}  # its KV is the draft's, checked there
    return _call(model, feeds, 1 if is_draft else model.cfg.n_layers, is_draft)


def _compare(graph: str, case: str, output: str, got, ref, tol: dict) -> Comparison:
    """How far an engine output is from PyTorch's, against the tolerance {"atol", "rtol"}."""
    g, r = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    diff = np.abs(g - r)
    return Comparison(graph, case, output, float(diff.max()), float((diff / (np.abs(r) + 1e-3)).max()),
                      tol["atol"], tol["rtol"], bool(np.all(diff <= tol["atol"] + tol["rtol"] * np.abs(r))))


def compare_graph(name: str, model, is_draft: bool, backend, spec: dict, precision: str, seed: int = 0) -> list:
    """Comparisons of every output of every case between PyTorch and the backend."""
    rows = []
    c = model.draft.cfg if isinstance(model, DraftChain) else model.cfg
    cases = graph_cases(spec, is_draft, vocab_size=c.vocab_size, n_slots=getattr(c, "n_slots", None),
                        n_steps=getattr(c, "max_steps", 0) + 1, seed=seed)
    for case, feeds in cases:
        ref = torch_outputs(model, is_draft, feeds, precision)
        got = backend.infer(feeds)
        for out, r in ref.items():
            tol = spec["tolerances"][out if out in ("logits", "tokens") else "hidden"]
            rows.append(_compare(name, case, out, got[out], r, tol))
    return rows


def compare_fused_target(target, backend, spec: dict, precision: str, seed: int = 0) -> list:
    """The fused target (target_gqa: cache in place, positions implied) against PyTorch: a prompt as one
    call, then a 3-token verify-shaped call over the cache the first one wrote; logits and hidden of both."""
    kv, rng = spec["kv"], np.random.default_rng(seed)
    c = target.cfg
    n, T = 11, 3
    ids = rng.integers(0, c.vocab_size, (1, n + T)).astype(np.int32)
    model = copy.deepcopy(target).to(TORCH_DTYPES[precision]) if precision != "fp32" else target
    feeds = {"input_ids": ids, "position_ids": np.arange(n + T, dtype=np.int32)[None],
             "attention_mask": np.tri(n + T, dtype=bool)[None]}
    for i in range(c.n_layers):
        for tmpl in KV_INPUT:
            feeds[tmpl % i] = np.zeros((1, c.n_kv_heads, 0, c.head_dim), np.float32)
    ref = _call(model.eval(), feeds, c.n_layers, False)
    dt = np.float16 if precision == "fp16" else np.float32
    pairs = [(kv[f"{part}_input"] % i, kv[f"{part}_output"] % i)
             for i in range(c.n_layers) for part in ("key", "value")]
    cache = {name: np.zeros((1, c.n_kv_heads, kv["max_len"], c.head_dim), dt) for name, _ in pairs}
    rows = []
    for case, lo, hi in (("prompt", 0, n), ("verify_after_cache", n, n + T)):
        got = backend.infer({"input_ids": ids[:, lo:hi], "seqlens_k": np.array([hi - 1], np.int32),
                             "total_sequence_length": np.array(kv["max_len"], np.int32), **cache})
        cache = {name: got[out] for name, out in pairs}  # what the call wrote, in for the next
        for out in ("logits", "hidden"):
            rows.append(_compare("target_gqa", case, out, got[out], ref[out][:, lo:hi], spec["tolerances"][out]))
    return rows


def compare_in_place_chain(draft, catalogue, backend, spec: dict, precision: str, seed: int = 0) -> list:
    """The in-place chain round (draft_chain_gqa) against PyTorch's standard DraftChain on the same inputs: its
    tokens, the catch-up tokens' KV where the standard path keeps them and each chain step's right behind
    the last real catch-up token (cases with padding behind it too), and the cache before the call kept."""
    K, kv, c = spec["chain_steps"], spec["kv"], draft.cfg
    L = kv["max_len"]
    model = copy.deepcopy(draft).to(TORCH_DTYPES[precision]) if precision != "fp32" else draft
    chain = DraftChain(model.eval(), catalogue, K).eval()
    dt = np.float16 if precision == "fp16" else np.float32
    rng, P, rows = np.random.default_rng(seed), 9, []
    for T, last in ((4, 3), (5, 1), (1, 0)):
        feeds = {"hidden_in": rng.standard_normal((1, T, c.hidden_size)).astype(dt),
                 "input_ids": rng.integers(5, catalogue.layout.vocab_size, (1, T)).astype(np.int32),
                 "last": np.array([last], np.int32), "node": np.zeros(1, np.int32), "left": np.array([3], np.int32),
                 "banned": np.zeros((1, catalogue.n_nodes + 2), np.float16)}
        feeds["slot"] = catalogue.layout.slots(feeds["input_ids"]).astype(np.int32)
        past = [rng.standard_normal((1, c.n_kv_heads, P, c.head_dim)).astype(dt) for _ in range(2)]
        mask = np.concatenate([np.ones((1, T, P), bool), np.tri(T, dtype=bool)[None]], -1)
        ref = _call_chain(chain, dict(feeds, position_ids=np.arange(P, P + T, dtype=np.int32)[None],
                                      attention_mask=mask, **{KV_INPUT[0] % 0: past[0], KV_INPUT[1] % 0: past[1]}))
        cache = [np.zeros((1, c.n_kv_heads, L, c.head_dim), dt) for _ in range(2)]
        for buf, p in zip(cache, past):
            buf[:, :, :P] = p
        got = backend.infer(dict(feeds, seqlens_k=np.array([P + T - 1], np.int32),
                                 total_sequence_length=np.array(L, np.int32),
                                 **{kv["key_input"] % 0: cache[0], kv["value_input"] % 0: cache[1]}))
        case = f"catch-up {T}, last {last}"
        rows.append(_compare("draft_chain_gqa", case, "tokens", got["tokens"], ref["tokens"],
                             spec["tolerances"]["tokens"]))
        tol = {"atol": 1e-4 if precision == "fp32" else 5e-2, "rtol": 0.0}
        for part, out in (("key", KV_OUTPUT[0] % 0), ("value", KV_OUTPUT[1] % 0)):
            want = np.concatenate([past[part == "value"], ref[out][:, :, :last + 1], ref[out][:, :, T:T + K - 1]], 2)
            rows.append(_compare("draft_chain_gqa", case, f"cache.{part}",
                                 got[kv[f"{part}_output"] % 0][:, :, :P + last + K], want, tol))
    return rows


def _first_divergence(a: list, b: list):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def _margin(target, catalogue, history, prefix, constraint) -> float:
    """Reference target's gap between its two best allowed logits after `prefix`: small means a near-tie."""
    logits = next_token_logits(target, np.concatenate([catalogue.prompt(history), prefix]))
    state = constraint.start(history)
    for tok in prefix:
        state = constraint.advance(state, tok)
    x = np.sort(logits[constraint.allowed(state)])
    return float(x[-1] - x[-2]) if len(x) > 1 else float("inf")


def check_checkpoint_matches(manifest, graph: str, cfg, checkpoint_dir) -> None:
    """Refuse a checkpoint whose shapes differ from the ones the engines' graph was exported with."""
    spec = manifest.graph(graph)
    kv = spec["kv"]
    want = {"layers": kv["n_layers"], "KV heads": kv["n_kv_heads"], "head dim": kv["head_dim"],
            "hidden": spec["hidden_size"], "vocab": spec["outputs"]["logits"]["shape"][-1]}
    got = {"layers": 1 if graph == "draft" else cfg.n_layers, "KV heads": cfg.n_kv_heads, "head dim": cfg.head_dim,
           "hidden": cfg.hidden_size, "vocab": cfg.vocab_size}
    diff = [f"{k} {got[k]} vs {want[k]}" for k in want if got[k] != want[k]]
    if diff:
        raise CheckpointError(f"--{graph} {checkpoint_dir}: not the checkpoint the engines' {graph} graph came from "
                              f"({', '.join(diff)} in the engines) | expected the --{graph} given to `padrec "
                              "export` | pass that checkpoint, or re-export the engines from this one")


def load_checked(manifest, target_dir, draft_dir):
    """The target (and draft) checkpoints, refused when they are not the ones the engines were exported from."""
    from .checkpoint import load_draft, load_target
    target = load_target(target_dir)
    check_checkpoint_matches(manifest, "target", target.cfg, target_dir)
    draft = load_draft(draft_dir, target) if draft_dir else None
    if draft is not None and "draft" in manifest.data["graphs"]:
        check_checkpoint_matches(manifest, "draft", draft.cfg, draft_dir)
    return target, draft


def reference_models(manifest, target, draft) -> tuple:
    """(target, draft, what they are) the engines are checked against: the checkpoints, except that a quantized
    model's decoder layers hold the dequantized weights its graphs compute with (quantize.quantized_twin), so
    every tier keeps its tolerance: it is the quantized model the engines must reproduce, and speculation must be
    lossless with respect to."""
    dtype, said = TORCH_DTYPES[manifest.precision], []
    for name in ("target", "draft"):
        record = manifest.quantization(name) if name in manifest.data["graphs"] else None
        model = target if name == "target" else draft
        if record is None or model is None:
            continue
        model = quantized_twin(model, Quantization.from_record(record), dtype)
        target, draft = (model, draft) if name == "target" else (target, model)
        said.append(f"the {name}'s decoder layers {record['kind']} (blocks of {record['block_size']}) as its graphs")
    what = "PyTorch with the checkpoints' weights"
    return target, draft, what + (", dequantized: " + "; ".join(said) if said else "")


def run_parity(engine_dir, target_dir, draft_dir=None, backend: str = "onnxruntime", device: str = "cpu",
               histories: list | None = None, n_histories: int = 32, seed: int = 0, progress: bool = True) -> dict:
    """Three tiers: per-graph tensors, end-to-end greedy lists, acceptance. Returns the report (report['ok']).
    Quantized engines are compared with their quantized reference (reference_models); how often the quantized
    target's greedy lists equal the unquantized checkpoint's is reported beside the tiers, for information."""
    from padrec_runtime import Recommender

    if histories is None and n_histories < 1:
        raise InputError(f"--histories: got {n_histories} | expected at least 1 (none would check nothing)")
    rec = Recommender(engine_dir, backend=backend, device=device)
    m = rec.manifest
    checkpoint, checkpoint_draft = load_checked(m, target_dir, draft_dir)
    target, draft, reference = reference_models(m, checkpoint, checkpoint_draft)
    report = {"engines": str(engine_dir), "backend": backend, "device": device, "precision": m.precision,
              "reference": reference, "tiers": {}}
    report["tiers"]["graphs"] = graphs_tier(rec, target, draft, backend, device, seed, progress)
    if histories is None:
        histories = random_histories(rec.catalogue, m.model, n_histories, seed)
    report["tiers"]["lists"], taus = lists_tier(rec, target, draft, histories, progress)
    report["tiers"]["acceptance"] = acceptance_tier(taus, m.precision)
    if target is not checkpoint:
        report["quantization"] = quantization_effect(rec, checkpoint, target, histories)
    report["ok"] = all(t["ok"] for t in report["tiers"].values())
    return report


def quantization_effect(rec, checkpoint, quantized, histories: list) -> dict:
    """Information, not a tier: the target's quantization record, and how many greedy lists of the quantized
    target (PyTorch, AR) equal the unquantized checkpoint's."""
    from padrec_runtime import DecodeParams
    from padrec_runtime.grammar import ListConstraint

    from .reference import reference_generate

    con = ListConstraint(rec.catalogue, n_items=rec.manifest.model["n_items"])
    cfg = rec.decode_config(DecodeParams(speculate="off"), 8)
    equal = 0
    for s in range(0, len(histories), 8):
        part = histories[s:s + 8]
        a, b = (reference_generate(t, None, part, con, cfg).tokens for t in (checkpoint, quantized))
        equal += sum(x == y for x, y in zip(a, b))
    return {"target": rec.manifest.quantization("target"), "lists_equal_to_unquantized": equal,
            "compared": len(histories)}


def graphs_tier(rec, target, draft, backend: str, device: str, seed: int, progress: bool) -> dict:
    """Tier 1: every graph of the engines against PyTorch on the same feeds, error per output."""
    from tqdm import tqdm
    rows = []
    for graph in tqdm(list(rec.manifest.data["graphs"]), desc="parity: graphs", disable=not progress):
        rows += compare_engine_graph(rec, graph, target, draft, backend, device, seed)
    return {"ok": all(r.ok for r in rows), "rows": [r.to_dict() for r in rows]}


def compare_engine_graph(rec, graph: str, target, draft, backend: str, device: str, seed: int) -> list:
    """Comparisons of one graph of the recommender's engines; none for a draft graph without a draft checkpoint,
    nor for the in-place graphs off ONNX Runtime."""
    m = rec.manifest
    if graph in ("target_gqa", "draft_chain_gqa"):  # ONNX Runtime only
        if backend != "onnxruntime" or (graph == "draft_chain_gqa" and draft is None):
            return []
        from padrec_runtime.backends.onnxruntime import OrtBackend
        be = rec.backends.get(graph) or OrtBackend(m, graph, device=device)  # own session where the runtime
        if graph == "target_gqa":  # holds none
            return compare_fused_target(target, be, m.graph(graph), m.precision, seed)
        return compare_in_place_chain(draft, rec.catalogue, be, m.graph(graph), m.precision, seed)
    model = target if graph == "target" else draft
    if model is None:
        return []
    if graph == "draft_chain":
        model = DraftChain(draft, rec.catalogue, m.graph(graph)["chain_steps"]).eval()
    return compare_graph(graph, model, graph != "target", rec.backends[graph], m.graph(graph), m.precision, seed)


def random_histories(catalogue, model: dict, n: int, seed: int) -> list:
    """n histories of distinct catalogue items, each 1 to min(max_history, 20) long."""
    rng = np.random.default_rng(seed)
    hmax = min(model["max_history"], 20)
    return [rng.choice(catalogue.item_ids, size=int(rng.integers(1, hmax + 1)), replace=False).tolist()
            for _ in range(n)]


def lists_tier(rec, target, draft, histories: list, progress: bool) -> tuple[dict, list]:
    """Tier 2: the runtime's greedy lists against the PyTorch reference's, AR and (with a draft) chain and tree,
    8 histories a call. A list that leaves the reference's where the target's two best logits are within twice
    its logits tolerance is a near tie (rounding may flip it), not a bug. Returns the tier and, per call, the
    runtime's and the reference's tau."""
    from tqdm import tqdm

    from padrec_runtime import DecodeParams
    from padrec_runtime.grammar import ListConstraint

    from .reference import reference_generate

    m, cat = rec.manifest, rec.catalogue
    con = ListConstraint(cat, n_items=m.model["n_items"])
    near_tie = 2 * m.graph("target")["tolerances"]["logits"]["atol"]
    lists, taus = [], []
    modes = ["off"] + (["chain", "tree"] if draft is not None and "draft" in rec.backends else [])
    for mode in tqdm(modes, desc="parity: lists", disable=not progress):
        cfg = rec.decode_config(DecodeParams(speculate=mode), 8)
        for s in range(0, len(histories), 8):
            part = histories[s:s + 8]
            got = rec.recommend(part, params=DecodeParams(speculate=mode))
            ref = reference_generate(target, draft, part, con, cfg)
            for h, g, want in zip(part, got.lists, ref.tokens):
                i = _first_divergence(g.tokens, want)
                row = {"mode": mode, "history": h, "equal": i is None}
                if i is not None:
                    row["first_divergence"] = i
                    row["margin"] = _margin(target, cat, h, want[:i], con)
                    row["near_tie"] = row["margin"] <= near_tie
                lists.append(row)
            if mode != "off":
                taus.append({"mode": mode, "runtime": got.tau, "reference": ref.tau})
    bugs = [r for r in lists if not r["equal"] and not r.get("near_tie")]
    return {"ok": not bugs, "compared": len(lists), "equal": sum(r["equal"] for r in lists),
            "near_ties": sum(bool(r.get("near_tie")) for r in lists),
            "diverged": [r for r in lists if not r["equal"]][:20]}, taus


def acceptance_tier(taus: list, precision: str) -> dict:
    """Tier 3: mean tau per speculative mode, runtime against reference: equal in fp32, within 10% otherwise."""
    tau = {}
    for mode in ("chain", "tree"):
        pts = [t for t in taus if t["mode"] == mode]
        if pts:
            tau[mode] = {"runtime": float(np.mean([p["runtime"] for p in pts])),
                         "reference": float(np.mean([p["reference"] for p in pts]))}
    tol = 1e-9 if precision == "fp32" else 0.1
    return {"ok": all(abs(v["runtime"] - v["reference"]) <= tol * max(1, v["reference"]) for v in tau.values()),
            "tau": tau}


def parity_markdown(report: dict) -> str:
    """A readable page of the report's tables."""
    lines = [f"# padrec parity: {report['engines']}", "",
             f"backend {report['backend']} ({report['device']}), precision {report['precision']}: "
             f"**{'PASS' if report['ok'] else 'FAIL'}**", "", f"Reference: {report['reference']}.", "",
             *_quantization_lines(report), "## Tier 1: graphs", "",
             "| graph | case | output | max abs | max rel | atol | rtol | ok |", "|---|---|---|---|---|---|---|---|"]
    for r in report["tiers"]["graphs"]["rows"]:
        lines.append(f"| {r['graph']} | {r['case']} | {r['output']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | "
                     f"{r['atol']:.0e} | {r['rtol']:.0e} | {'yes' if r['ok'] else '**NO**'} |")
    t2 = report["tiers"]["lists"]
    lines += ["", "## Tier 2: greedy lists vs the PyTorch reference", "",
              f"{t2['equal']} of {t2['compared']} equal; {t2['near_ties']} fp near-ties; ok: {t2['ok']}", ""]
    for r in t2["diverged"] or []:
        lines.append(f"- {r['mode']}: first divergence at token {r['first_divergence']}, margin {r['margin']:.3g}"
                     f"{' (near-tie)' if r['near_tie'] else ''}")
    lines += ["", "## Tier 3: acceptance length", "", "| mode | runtime tau | reference tau |", "|---|---|---|"]
    for mode, v in report["tiers"]["acceptance"]["tau"].items():
        lines.append(f"| {mode} | {v['runtime']:.3f} | {v['reference']:.3f} |")
    return "\n".join(lines) + "\n"


def _quantization_lines(report: dict) -> list:
    q = report.get("quantization")
    if not q:
        return []
    return [f"Quantized target ({q['target']['kind']}): {q['lists_equal_to_unquantized']} of {q['compared']} greedy "
            "lists equal the unquantized checkpoint's (information, not a tier).", ""]


def parity_summary(report: dict) -> str:
    g = report["tiers"]["graphs"]
    worst: dict = {}
    for r in g["rows"]:
        key = (r["graph"], r["output"].split(".")[0])
        worst[key] = max(worst.get(key, 0.0), r["max_abs"])
    out = [f"reference: {report['reference']}", *[line for line in _quantization_lines(report) if line],
           f"tier 1 graphs: {'ok' if g['ok'] else 'FAIL'}"]
    out += [f"  {k[0]:6s} {k[1]:7s} max abs {v:.2e}" for k, v in sorted(worst.items())]
    out += [f"  FAIL {r['graph']}/{r['case']}/{r['output']}: max abs {r['max_abs']:.3g} > atol {r['atol']:.0e}"
            for r in g["rows"] if not r["ok"]][:10]
    t2 = report["tiers"]["lists"]
    out.append(f"tier 2 lists: {'ok' if t2['ok'] else 'FAIL'} ({t2['equal']}/{t2['compared']} equal, "
               f"{t2['near_ties']} near-ties)")
    t3 = report["tiers"]["acceptance"]
    out.append(f"tier 3 acceptance: {'ok' if t3['ok'] else 'FAIL'} " + ", ".join(
        f"{k} tau {v['runtime']:.3f} (reference {v['reference']:.3f})" for k, v in t3["tau"].items()))
    out.append("PASS" if report["ok"] else "FAIL")
    return "\n".join(out)
