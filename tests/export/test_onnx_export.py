"""ONNX export: per-graph parity with PyTorch, live step/slot inputs, checker, polygraphy, tampering."""
import json
import subprocess

import numpy as np
import onnx
import pytest
import torch

from padrec_export.parity import compare_fused_target, compare_graph, compare_in_place_chain

from tests.conftest import LIMITS, polygraphy_cli
from padrec_export.qa_feeds import graph_cases
from padrec_runtime.backends.onnxruntime import OrtBackend
from padrec_runtime.errors import IntegrityError, ManifestError, PadrecError
from padrec_runtime.grammar import LAYOUT_KINDS
from padrec_runtime.manifest import load_manifest


@pytest.mark.parametrize("graph", ["target", "draft", "draft_chain"])
def test_onnxruntime_matches_pytorch(tiny, engines_master, graph):
    from padrec_export.models import DraftChain
    cat, target, draft = tiny
    m = load_manifest(engines_master)
    model = draft if graph == "draft" else target
    if graph == "draft_chain":
        model = DraftChain(draft, cat, m.graph(graph)["chain_steps"]).eval()
    rows = compare_graph(graph, model, graph != "target", OrtBackend(m, graph), m.graph(graph), "fp32")
    cases = {r.case for r in rows}
    assert {"prefill", "chain-verify", "tree-verify"} <= cases
    if graph == "draft":
        assert {f"step-{k}" for k in range(model.cfg.max_steps)} <= cases
        assert {f"slot-{s}" for s in range(model.cfg.n_slots)} <= cases
    for r in rows:
        assert r.ok, r
        if r.output == "logits":
            assert r.max_abs <= 1e-4, r
    if graph == "draft_chain":  # K tokens per row, equal to PyTorch's exactly
        assert {r.output for r in rows} == {"tokens"} and all(r.max_abs == 0 for r in rows)


def test_in_place_chain_graph_is_the_standard_chain(tiny, engines_master):
    """draft_chain_gqa (ONNX Runtime's GroupQueryAttention over the whole cache, written in place) proposes the
    standard chain's tokens exactly and writes the KV the standard path would keep (parity.compare_in_place_chain:
    catch-up of 4, 5 with padding behind the last real token, and 1)."""
    cat, _, draft = tiny
    m = load_manifest(engines_master)
    rows = compare_in_place_chain(draft, cat, OrtBackend(m, "draft_chain_gqa"), m.graph("draft_chain_gqa"), "fp32")
    assert len(rows) == 9 and all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert all(r.max_abs == 0 for r in rows if r.output == "tokens")


def test_both_targets_hold_gate_up_as_one_tensor_shared_on_the_device(engines_external_master, engines_master,
                                                                      tiny):
    """The standard target holds each layer's gate|up as the fused target does (one MatMul over the concatenated
    weight, split in two), so every weight of the fused target but its rotary tables is one the standard target
    holds too, by its bytes: the runtime keys its one device copy of each weight by those bytes."""
    import onnx
    _, target, _ = tiny
    m = load_manifest(engines_external_master)
    standard = {w["sha256"] for w in m.graph("target")["weights"]}
    fused = {w["name"]: w for w in m.graph("target_gqa")["weights"]}
    assert {n for n, w in fused.items() if w["sha256"] not in standard} == {"rotary.cos", "rotary.sin"}
    assert all(fused[f"l{i}.gate_up"]["sha256"] in standard for i in range(target.cfg.n_layers))
    for engines in (engines_external_master, engines_master):  # rewritten tensor by tensor, and in memory
        graph = onnx.load(str(engines / "target.onnx"), load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        weighted = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
        assert len(weighted) == 4 * target.cfg.n_layers + 1  # q|k|v, o, gate|up, down a layer; the head


@pytest.mark.parametrize("external", [True, False])
def test_a_layer_whose_gate_and_up_are_one_matmul_is_left_apart_with_a_warning(tiny, tmp_path, external):
    """Gate and up with the same bytes are one MatMul in the exported graph (the exporter merges them): that layer
    keeps it, the export says so, and the standard target still computes the model."""
    import copy
    from padrec_export.onnx_export import export_engines
    cat, target, _ = tiny
    twin = copy.deepcopy(target)
    with torch.no_grad():
        twin.layers[0].up_proj.weight.copy_(twin.layers[0].gate_proj.weight)
    with pytest.warns(UserWarning, match=r"target\.onnx: gate\|up shared with the fused target in 1 of 2 layers"):
        export_engines(twin, None, cat, tmp_path / "e", "fp32", LIMITS, progress=False, external_data=external)
    m = load_manifest(tmp_path / "e")
    rows = compare_graph("target", twin, False, OrtBackend(m, "target"), m.graph("target"), "fp32")
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]


def test_fused_target_profiling_forms_give_the_same_logits(tiny, tmp_path):
    """The profiling forms of the fused target (gate and up projections as two MatMuls; zero query heads added up
    to 4 per KV head) compute what the shipped form (gate and up as one MatMul, split in two) does, and a group
    smaller than the model's is refused."""
    from padrec_export.fused import KV_IN_PLACE, export_gqa_target
    import onnxruntime as ort
    _, target, _ = tiny
    c, n = target.cfg, 16
    assert c.n_heads // c.n_kv_heads == 2
    feeds = {"input_ids": np.array([[5, 9, 7]], np.int32), "seqlens_k": np.array([2], np.int32),
             "total_sequence_length": np.array(n, np.int32)}
    feeds.update({t % i: np.zeros((1, c.n_kv_heads, n, c.head_dim), np.float32)
                  for i in range(c.n_layers) for t in KV_IN_PLACE})
    logits = []
    for name, form in {"shipped": {}, "separate": {"gate_up": False}, "group4": {"query_group": 4}}.items():
        export_gqa_target(target, "fp32", n, tmp_path / f"{name}.onnx", **form)
        graph = onnx.load(tmp_path / f"{name}.onnx").graph
        assert ("Split" in {x.op_type for x in graph.node}) == (name != "separate")  # gate|up as one MatMul
        heads = {a.i for x in graph.node if x.op_type == "GroupQueryAttention" for a in x.attribute
                 if a.name == "num_heads"}
        assert heads == {4 * c.n_kv_heads if name == "group4" else c.n_heads}
        sess = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        logits.append(sess.run(["logits"], {k: v.copy() for k, v in feeds.items()})[0])
    assert np.abs(logits[0]).max() > 1e-2
    assert all(np.abs(logits[0] - other).max() <= 1e-5 for other in logits[1:])
    with pytest.raises(ValueError, match="query_group 1"):
        export_gqa_target(target, "fp32", n, tmp_path / "group1.onnx", query_group=1)


def test_only_decode_sized_buckets_capture_graphs_under_cuda_graph_max_tokens(engines_master):
    """With graph_max_tokens, a bucket of more tokens a row (prefill) is opened without a CUDA graph, and so joins
    the shared arena; without it every CUDA bucket captures one; on the CPU none does."""
    b = OrtBackend(load_manifest(engines_master), "target", cuda_graphs=True, graph_max_tokens=16)
    assert not b.wants_graph({"batch": 8, "seq": 8})  # CPU: no graphs whatever the setting
    b.device = "cuda"  # the decision only: no CUDA session is made
    assert b.wants_graph({"batch": 8, "seq": 8}) and b.wants_graph({"batch": 8, "seq": 16})
    assert not b.wants_graph({"batch": 8, "seq": 32}) and not b.wants_graph({"batch": 1, "seq": 256})
    b.graph_max_tokens = None
    assert b.wants_graph({"batch": 1, "seq": 256})
    b.cuda_graphs = False
    assert not b.wants_graph({"batch": 8, "seq": 8})


def test_arena_release_is_asked_only_of_synchronous_cuda_runs(engines_master):
    """A run that releases the shared arena carries ONNX Runtime's shrink entry on CUDA only (a CPU session has no
    such arena: ONNX Runtime would refuse the run), and a queued run cannot ask for it (its memory is in use)."""
    from padrec_runtime.backends.onnxruntime import ARENA_SHRINK

    def shrinks(options):
        try:
            return options.get_run_config_entry(ARENA_SHRINK) == "gpu:0"
        except RuntimeError:  # onnxruntime: no such entry
            return False
    b = OrtBackend(load_manifest(engines_master), "target")
    assert not shrinks(b.run_options(1, queued=False, release=True))  # CPU
    b.device = "cuda"  # the options only: no CUDA session is made
    assert shrinks(b.run_options(1, queued=False, release=True))
    assert not shrinks(b.run_options(1, queued=False)) and not shrinks(b.run_options(1, queued=True))
    with pytest.raises(PadrecError, match="a queued run cannot release the arena"):
        b.run_options(1, queued=True, release=True)


def test_cuda_sessions_ask_for_tuned_gemms_and_share_an_arena_only_without_graphs(engines_master, monkeypatch):
    """CUDA sessions carry ONNX Runtime's GEMM auto-tune entry as gemm_tuning says ("0" for off), whatever
    ORT_CUDA_GEMM_AUTO_TUNE says (the entry decides over it); CPU sessions never carry it; only "apart" with graphs
    on CUDA tunes graphed buckets in a throwaway twin."""
    from padrec_runtime.backends.onnxruntime import GEMM_TUNE_ENTRY, SHARED_ARENA
    b = OrtBackend(load_manifest(engines_master), "target")

    def entry(opts):
        try:
            return opts.get_session_config_entry(GEMM_TUNE_ENTRY)
        except RuntimeError:  # onnxruntime: no such entry
            return None
    monkeypatch.setenv("ORT_CUDA_GEMM_AUTO_TUNE", "0")
    opts, providers = b._options({"batch": 1}, cuda_graph=False)
    assert entry(opts) is None and providers == ["CPUExecutionProvider"] and not b.tunes_apart
    b.device = "cuda"  # the options only: no CUDA session is made
    opts, providers = b._options({"batch": 1}, cuda_graph=True)
    assert entry(opts) == "1"
    assert providers[0] == ("CUDAExecutionProvider", {"enable_cuda_graph": "1"})
    with pytest.raises(RuntimeError, match="use_env_allocators"):  # a replayed graph keeps an arena of its own
        opts.get_session_config_entry(SHARED_ARENA)
    b.gemm_tuning = "off"
    opts, _ = b._options({"batch": 1}, cuda_graph=False)
    assert entry(opts) == "0"
    assert opts.get_session_config_entry(SHARED_ARENA) == "1"  # sessions without a graph share the process's arena
    b.gemm_tuning = "apart"
    assert entry(b._options({"batch": 1}, cuda_graph=True)[0]) == "1" and not b.tunes_apart  # no graphs here
    b.cuda_graphs = True
    assert b.tunes_apart


def test_export_without_in_place_graphs(tiny, tmp_path):
    """`padrec export --no-in-place` (ExportLimits.fused_target=False) writes no ONNX Runtime-only graph, and
    the runtime then keeps the standard graphs even with device caches; bf16 engines never have them."""
    from padrec_export.onnx_export import ExportLimits, export_engines
    from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
    cat, target, draft = tiny
    m = export_engines(target, draft, cat, tmp_path / "std", "fp32", ExportLimits(fused_target=False), progress=False)
    assert set(m.data["graphs"]) == {"target", "draft", "draft_chain"}
    assert not Recommender(tmp_path / "std", options=RuntimeOptions(device_cache=True)).settings.in_place
    m = export_engines(target, None, cat, tmp_path / "bf16", "bf16", progress=False)
    assert set(m.data["graphs"]) == {"target"}


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_draft_chain_is_the_step_by_step_greedy_draft(tiny, layout_models, kind):
    """DraftChain (one graph per round) proposes what K separate draft calls with a constrained argmax would:
    the catch-up pass, then each step fed its own token, hidden state, position, step index and slot (its place
    in its item), over the KV of everything before it; choices follow the trie, avoid prefixes whose items are
    all used and end with eos only when no item is left. Checked against a plain loop over Draft.forward and the
    trie, in every token layout."""
    import torch
    from padrec_export.models import DraftChain
    from padrec_runtime.grammar import EOS, SEP, ConstraintState, ListConstraint
    cat, _, draft = tiny if kind == "per_level" else layout_models(kind)
    lay = cat.layout
    K = cat.max_depth + 4  # more steps than an item has tokens: the chain crosses a separator
    chain = DraftChain(draft, cat, K).eval()
    con = ListConstraint(cat, n_items=5)
    rng = np.random.default_rng(0)
    B, T, P, H = 3, 4, 6, draft.cfg.hidden_size
    kvh, hd = draft.cfg.n_kv_heads, draft.cfg.head_dim
    ids = torch.as_tensor(rng.integers(5, lay.vocab_size, (B, T)), dtype=torch.int32)
    ids[1, 1] = SEP
    pos = torch.arange(P, P + T, dtype=torch.int32).repeat(B, 1)
    hid = torch.randn(B, T, H)
    slot = torch.as_tensor(lay.slots(ids.numpy()))
    last = torch.tensor([3, 1, 2], dtype=torch.int32)
    start = [(0, 0), (0, 0), (int(cat.item_nodes[5, 2]), 2)]  # (trie node, depth): root, root, a 2-code prefix
    node = torch.tensor([cat.chain_row(ConstraintState(0, d, n, frozenset())) for n, d in start], dtype=torch.int32)
    left = torch.tensor([2, 1, 1], dtype=torch.int32)  # row 1 ends its list after one more item
    mask = torch.ones(B, T, P + T, dtype=torch.bool)
    mask[:, :, P:] = torch.tril(torch.ones(T, T, dtype=torch.bool))
    mask[2, :, 0] = False  # a padded past entry
    pk, pv = torch.randn(B, kvh, P, hd), torch.randn(B, kvh, P, hd)

    def run(used):
        banned = torch.as_tensor(np.stack([con.chain_ban(ConstraintState(0, 0, 0, frozenset(u))) for u in used]))
        with torch.inference_mode():
            return chain(hid, ids, pos, slot, last, node, left, banned, mask, [(pk, pv)])

    def items_of(b, toks):  # the items a chain completes, walking the trie from the row's start
        at, out = start[b][0], []
        for tok in toks:
            if tok in (SEP, EOS):
                at = 0
                continue
            at = int(cat.child_nodes[at][list(cat.child_tokens[at]).index(tok)])
            if at in cat.leaf_item:
                out.append(cat.leaf_item[at])
        return out

    free, _, _ = run([set()] * B)
    # use up every item of the catalogue that shares its first two codes with the first item each row starting
    # at the root completes (row 2 starts inside a prefix, which decoding never leaves without an item)
    used = []
    for b in range(B):
        first = items_of(b, free[b].tolist())[:1] if start[b][1] == 0 else []
        prefix = [int(cat.item_nodes[i, 2]) for i in first]
        used.append({i for i in range(len(cat)) if int(cat.item_nodes[i, 2]) in prefix})
    tokens, k_new, _ = run(used)
    assert tokens.shape == (B, K) and k_new.shape == (B, kvh, T + K - 1, hd)
    for b in range(B):
        want, keys, n = _greedy_chain_step_by_step(draft, cat, K, b, dict(
            ids=ids, hid=hid, pos=pos, slot=slot, last=last, mask=mask, past=(pk, pv), start=start, left=left,
            used=used))
        assert tokens[b].tolist() == want, b
        # the chain steps' KV follows the catch-up's (padding included) in the output
        torch.testing.assert_close(k_new[b:b + 1, :, T:], keys[:, :, P + n + 1:])
        assert not set(items_of(b, want)) & used[b]  # the used-up prefixes were routed round
    assert any(used) and tokens.tolist() != free.tolist()
    assert EOS in tokens[1].tolist() and SEP not in tokens[1].tolist()  # row 1: one item, then the end


def _greedy_chain_step_by_step(draft, cat, K: int, b: int, a: dict) -> tuple:
    """Row b's K-token chain the plain way: the catch-up through Draft.forward, then one call per step fed its
    own token, hidden state, position, step index and slot, each choice the trie's constrained argmax.
    Returns (tokens, the keys after the last step, the row's last prompt position)."""
    import torch
    from padrec_runtime.grammar import EOS, SEP
    lay, P = cat.layout, a["past"][0].shape[2]
    pk, pv = a["past"]
    with torch.inference_mode():
        n = int(a["last"][b])
        x = a["ids"][b:b + 1, :n + 1]
        logits, h, [(k, v)] = draft(a["hid"][b:b + 1, :n + 1], x, a["pos"][b:b + 1, :n + 1], torch.zeros_like(x),
                                    a["slot"][b:b + 1, :n + 1], a["mask"][b:b + 1, :n + 1, :P + n + 1],
                                    [(pk[b:b + 1], pv[b:b + 1])])
        keys, values = torch.cat([pk[b:b + 1], k], 2), torch.cat([pv[b:b + 1], v], 2)
        seen = a["mask"][b:b + 1, n:n + 1, :P + n + 1]
        (at, depth), lg, h, togo = a["start"][b], logits[0, -1], h[:, -1:], int(a["left"][b])
        used_b = frozenset(a["used"][b])
        gone = cat.exhausted(used_b)
        want = []
        for j in range(1, K + 1):
            in_item = at not in cat.leaf_item
            if in_item:
                kids = [(t, m) for t, m in zip(cat.child_tokens[at], cat.child_nodes[at]) if not gone[m]]
                allowed = [int(t) for t, _ in kids]
            else:
                allowed = [SEP] if togo > 0 else [EOS]
            tok = allowed[int(torch.argmax(lg[allowed]))]
            want.append(tok)
            tok_slot = depth if in_item else lay.max_item_tokens  # its place in the item; the separator's
            if in_item:
                at, depth = int(kids[allowed.index(tok)][1]), depth + 1
                if at in cat.leaf_item:  # the item is used: not proposed again in this chain
                    togo -= 1
                    used_b = used_b | {cat.leaf_item[at]}
                    gone = cat.exhausted(used_b)
            else:
                at, depth = 0, 0
            if j == K:
                break
            seen = torch.cat([seen, torch.ones(1, 1, 1, dtype=torch.bool)], -1)
            x = torch.tensor([[tok]], dtype=torch.int32)
            lg, h, [(k, v)] = draft(h, x, a["pos"][b:b + 1, n:n + 1] + j, torch.full_like(x, j),
                                    torch.full_like(x, tok_slot), seen, [(keys, values)])
            keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
            lg = lg[0, -1]
    return want, keys, n


def _echo_pair(tiny):
    """A target whose logits are the same at every position (all embedding rows equal: every token and position
    looks alike) and a draft computing exactly those logits: the greedy list ranks items once and writes them
    best first, the step-by-step draft proposes it all, and a chain that forgot the items it completed itself
    would propose its first item again after it."""
    import copy

    import torch
    from padrec_export.models import Draft, DraftConfig
    cat, target, _ = tiny
    target = copy.deepcopy(target)
    with torch.no_grad():
        target.embed_tokens.weight.copy_(target.embed_tokens.weight[7].expand_as(target.embed_tokens.weight))
        seen = {}
        hook = target.norm.register_forward_hook(lambda mod, inp, out: seen.setdefault("x", inp[0][0, -1]))
        target(torch.tensor([[5, 9]], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32),
               torch.ones(1, 2, 2, dtype=torch.bool), target.empty_past(1))
        hook.remove()
        cfg = DraftConfig(**{**tiny[2].cfg.to_dict(), "use_slot": False, "use_step": False})
        draft = Draft(cfg, target).eval()
        for w in (draft.fc.weight, draft.layer.self_attn.o_proj.weight, draft.layer.down_proj.weight):
            w.zero_()
        draft.fc.bias.copy_(seen["x"])  # the draft's feature is the target's last pre-norm state, always
        draft.norm.weight.copy_(target.norm.weight)
    return cat, target, draft


def test_fused_chain_acceptance_equals_the_step_by_step_loop(tiny, tmp_path):
    """Greedy chain rounds through draft_chain.onnx commit, round by round, what the step-by-step draft loop
    commits: the graph bans the items its own chain completes, as the loop's grammar does. K=6 crosses an
    item boundary (4 tokens) every round, and the echo pair's draft re-proposes its first item if not banned."""
    from padrec_export.onnx_export import ExportLimits, export_engines
    from padrec_runtime import DecodeParams, Recommender
    cat, target, draft = _echo_pair(tiny)
    K = 6
    export_engines(target, draft, cat, tmp_path / "k6", "fp32",
                   ExportLimits(max_seq_len=160, max_history=12, max_batch=8, max_items=8, n_items=8, draft_steps=K,
                                fused_target=False), progress=False)
    rec = Recommender(tmp_path / "k6")
    rng = np.random.default_rng(1)
    histories = [rng.choice(cat.item_ids, size=int(rng.integers(1, 12)), replace=False).tolist() for _ in range(6)]
    ar = rec.recommend(histories, n_items=8, params=DecodeParams(speculate="off"))
    fused = rec.recommend(histories, n_items=8, params=DecodeParams(speculate="chain", draft_steps=K))
    loop = rec.recommend(histories, n_items=8,
                         params=DecodeParams(speculate="chain", draft_steps=K, fused_chain=False))
    assert [x.tokens for x in fused.lists] == [x.tokens for x in loop.lists] == [x.tokens for x in ar.lists]
    assert fused.committed == loop.committed
    assert loop.tau > K  # the draft is the target: every proposal is accepted


@pytest.mark.parametrize("graph", ["target", "draft"])
def test_graph_refuses_a_mask_narrower_than_its_keys(engines_master, graph):
    """ONNX Runtime runs target.onnx / draft.onnx with a mask as wide as past + seq and raises on any other width,
    a width-1 mask included (which would otherwise broadcast over every key: Polygraphy's default data loader
    gives NaN logits so). Default session options: the graph optimizer must not remove the check."""
    import onnxruntime as ort
    m = load_manifest(engines_master)
    spec = m.graph(graph)
    sess = ort.InferenceSession(str(engines_master / spec["file"]), providers=["CPUExecutionProvider"])
    B, T, P = 1, 2, 3
    kv = spec["kv"]
    feeds = {"input_ids": np.array([[5, 9]], np.int32), "position_ids": np.array([[3, 4]], np.int32)}
    if graph == "draft":
        feeds.update(hidden_in=np.ones((B, T, spec["hidden_size"]), np.float32), step=np.zeros((B, T), np.int32),
                     slot=np.zeros((B, T), np.int32))
    for i in range(kv["n_layers"]):
        for part in ("key_input", "value_input"):
            feeds[kv[part] % i] = np.zeros((B, kv["n_kv_heads"], P, kv["head_dim"]), np.float32)
    full = np.ones((B, T, P + T), bool)
    full[0, 0, -1] = False
    logits = sess.run(["logits"], {**feeds, "attention_mask": full})[0]
    assert logits.shape[:2] == (B, T) and np.isfinite(logits).all()
    for width in (1, P + T - 1, P + T + 1):
        with pytest.raises(Exception, match="(?i)out of data bounds|broadcast"):
            sess.run(["logits"], {**feeds, "attention_mask": np.ones((B, T, width), bool)})


def test_fp16_export_within_its_tolerances(tiny, tmp_path):
    from padrec_export.onnx_export import export_engines
    cat, target, draft = tiny
    m = export_engines(target, draft, cat, tmp_path / "fp16", "fp16", progress=False)
    for graph, model in (("target", target), ("draft", draft)):
        rows = compare_graph(graph, model, graph == "draft", OrtBackend(m, graph), m.graph(graph), "fp16")
        assert all(r.ok for r in rows), [r for r in rows if not r.ok][:3]
    rows = compare_fused_target(target, OrtBackend(m, "target_gqa"), m.graph("target_gqa"), "fp16")
    assert len(rows) == 4 and all(r.ok for r in rows), [r for r in rows if not r.ok][:3]
    assert next(iter(target.parameters())).dtype.is_floating_point and target.lm_head.weight.dtype.itemsize == 4
    from padrec_export.placement import crossings
    for spec in m.data["graphs"].values():  # fp16: no half-precision value is shape arithmetic either
        assert crossings(onnx.load(m.root / spec["file"], load_external_data=False)) == [], spec["file"]


def test_no_graph_moves_data_between_host_and_device(engines_master):
    """Under ONNX Runtime's CUDA placement (padrec_export.placement), every exported graph keeps its shape
    arithmetic on the CPU and its data on the device: no copy inside the graph, so a session with dynamic batch
    and length can capture each bucket as a CUDA graph. A size read with .shape and used as data is caught."""
    from onnx import TensorProto, helper

    from padrec_export.placement import crossings
    m = load_manifest(engines_master)
    for spec in m.data["graphs"].values():
        assert crossings(onnx.load(m.root / spec["file"], load_external_data=False)) == [], spec["file"]
    # seqlens - T + last, T read from input_ids' shape (as the draft chain once did): two crossings
    nodes = [helper.make_node("Shape", ["ids"], ["shape"], start=1, end=2),
             helper.make_node("Squeeze", ["shape"], ["T"]),
             helper.make_node("Cast", ["T"], ["T32"], to=TensorProto.INT32),
             helper.make_node("Sub", ["seqlens", "T32"], ["start"]),
             helper.make_node("Add", ["start", "gpu"], ["out"]),
             helper.make_node("Relu", ["ids"], ["gpu_ids"]), helper.make_node("Cast", ["gpu_ids"], ["gpu"], to=6)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, ["B", "T"]),
                                           helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["B"])],
                              [helper.make_tensor_value_info("out", TensorProto.INT32, ["B", "T"])])
    found = crossings(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert len(found) == 2 and "graph input seqlens" in found[0] and "CPU value start" in found[1], found
    # a Clip with an absent min stays on the device (copies both ways); a shape computed on the device
    nodes = [helper.make_node("Shape", ["ids"], ["shape"]), helper.make_node("Clip", ["shape", "", "hi"], ["clipped"]),
             helper.make_node("Reshape", ["ids", "clipped"], ["flat"]),
             helper.make_node("ReduceSum", ["ids"], ["n"], keepdims=0), helper.make_node("Cast", ["n"], ["n64"], to=7),
             helper.make_node("Reshape", ["ids", "n64"], ["out"])]
    hi = helper.make_tensor("hi", TensorProto.INT64, [], [1 << 20])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, ["B", "T"])],
                              [helper.make_tensor_value_info("out", TensorProto.INT32, None),
                               helper.make_tensor_value_info("flat", TensorProto.INT32, None)], [hi])
    found = crossings(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert found == [" (Clip, on the device) reads CPU value shape", " (Reshape) reads device value clipped on the host",
                     " (Reshape) reads device value n64 on the host"], found


def test_step_and_slot_are_live_inputs(tiny, engines_master):
    """Changing step or slot changes the ONNX draft output exactly as it changes PyTorch's."""
    _, _, draft = tiny
    m = load_manifest(engines_master)
    ort = OrtBackend(m, "draft")
    from padrec_export.parity import torch_outputs
    feeds = dict(graph_cases(m.graph("draft"), True, vocab_size=draft.cfg.vocab_size, n_slots=draft.cfg.n_slots)[3][1])
    outs = {}
    for step, slot in [(0, 0), (1, 0), (2, 0), (1, 2)]:
        f = dict(feeds, step=np.full_like(feeds["step"], step), slot=np.full_like(feeds["slot"], slot))
        got, ref = ort.infer(f)["logits"], torch_outputs(draft, True, f, "fp32")["logits"]
        assert np.abs(got - ref).max() <= 1e-4
        outs[(step, slot)] = got
    assert np.abs(outs[(0, 0)] - outs[(1, 0)]).max() > 1e-3
    assert np.abs(outs[(1, 0)] - outs[(2, 0)]).max() > 1e-3
    assert np.abs(outs[(1, 0)] - outs[(1, 2)]).max() > 1e-3
    graph = onnx.load(engines_master / "draft.onnx").graph
    assert {"step", "slot"} <= {i.name for i in graph.input}


@pytest.mark.parametrize("graph", ["target", "draft"])
def test_onnx_checker_and_polygraphy(engines_master, graph):
    path = engines_master / f"{graph}.onnx"
    onnx.checker.check_model(onnx.load(path), full_check=True)
    out = subprocess.run([polygraphy_cli(), "inspect", "model", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "attention_mask" in out.stdout and "logits" in out.stdout


@pytest.mark.parametrize("file", ["target.onnx", "draft.onnx", "catalogue.json"])
def test_tampered_file_is_named(engines, file):
    path = engines / file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=file.replace(".", r"\.")):
        load_manifest(engines)


def test_manifest_errors_name_the_dotted_key(engines):
    path = engines / "manifest.json"
    base = json.loads(path.read_text())
    cases = [
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d["graphs"]["draft"]["inputs"]["step"].update(dtype="int8"), r"graphs\.draft\.inputs\.step\.dtype"),
        (lambda d: d["model"].update(colour="red"), r"model\.colour"),
        (lambda d: d["model"].pop("max_seq_len"), r"model\.max_seq_len"),
        (lambda d: d["model"]["layout"].update(vocab_size=7), r"model\.layout\.vocab_size"),
        (lambda d: d["graphs"].pop("draft"), r"graphs\.draft_chain: got .* \| expected a draft graph beside it"),
        (lambda d: d["graphs"]["draft_chain"].update(chain_steps=5), r"graphs\.draft_chain\.outputs\.tokens\.shape"),
        (lambda d: d["graphs"]["draft_chain"]["inputs"].pop("last"), r"graphs\.draft_chain\.inputs\.last"),
    ]
    for mutate, pattern in cases:
        d = json.loads(json.dumps(base))
        mutate(d)
        path.write_text(json.dumps(d))
        with pytest.raises(ManifestError, match=pattern):
            load_manifest(engines, verify=False)


def test_plain_eagle_draft_keeps_the_engine_contract(tiny, tmp_path):
    """With both PAD-Rec signals off the draft graph still takes step and slot (and ignores them exactly)."""
    from padrec_export.models import Draft, DraftConfig
    from padrec_export.onnx_export import export_engines
    cat, target, draft = tiny
    eagle = Draft(DraftConfig(**{**draft.cfg.to_dict(), "use_slot": False, "use_step": False}), target).eval()
    m = export_engines(target, eagle, cat, tmp_path / "eagle", progress=False)
    ort = OrtBackend(m, "draft")
    feeds = dict(graph_cases(m.graph("draft"), True, vocab_size=cat.layout.vocab_size, n_slots=cat.layout.n_slots)[3][1])
    a = ort.infer(feeds)["logits"]
    b = ort.infer(dict(feeds, step=feeds["step"] + 1, slot=(feeds["slot"] + 1) % cat.layout.n_slots))["logits"]
    assert np.array_equal(a, b)


def test_exported_graphs_keep_one_copy_of_each_weight(engines_master):
    """The exporter folds a weight once per use; the unrolled chain would carry the draft layer K times.
    Every graph keeps one copy of each constant, and the chain's weights are no larger than the draft's plus
    its grammar tables and the per-token table it folds."""
    import onnx
    from onnx import numpy_helper
    sizes = {}
    for name in ("target", "draft", "draft_chain"):
        graph = onnx.load(str(engines_master / f"{name}.onnx")).graph
        keys = [(i.data_type, tuple(i.dims), numpy_helper.to_array(i).tobytes()) for i in graph.initializer]
        big = [k for k in keys if len(k[2]) >= 256]
        assert len(big) == len(set(big)), name
        sizes[name] = sum(len(k[2]) for k in keys)
    cat = json.loads((engines_master / "catalogue.json").read_text())
    n_items = len(cat["item_ids"])
    assert sizes["draft_chain"] < 2 * sizes["draft"] + 64 * n_items * 8 * 4


def test_bf16_engines_are_refused_on_the_cpu_with_where_they_run(tiny, tmp_path):
    """ONNX Runtime's CPU kernels have no bf16 Tile: a bf16 engine directory is refused before a session is made,
    with a message saying bf16 runs on CUDA, instead of failing to load with 'Could not find an implementation'."""
    import onnxruntime as ort
    from padrec_export.onnx_export import export_engines
    from padrec_runtime.errors import BackendError
    from padrec_runtime import DecodeParams, Recommender
    cat, target, _ = tiny
    m = export_engines(target, None, cat, tmp_path / "bf16", "bf16", progress=False)
    with pytest.raises(Exception, match="Could not find an implementation"):  # what the check stands in front of
        ort.InferenceSession(str(tmp_path / "bf16" / "target.onnx"), providers=["CPUExecutionProvider"])
    for make in (lambda: OrtBackend(m, "target"), lambda: Recommender(tmp_path / "bf16")):
        with pytest.raises(BackendError, match="bf16 engines on the CPU .* CUDA"):
            make()


def _ungated(draft, target, gates: bool = False):
    """The draft's weights with use_gates=False (or True), alpha moved off its init and the slot and step
    embeddings scaled up (at init they are too small to move an argmax), so that either signal's handling shows."""
    import torch
    from padrec_export.models import Draft, DraftConfig
    plain = Draft(DraftConfig(**{**draft.cfg.to_dict(), "use_gates": gates}), target).eval()
    plain.load_state_dict(draft.state_dict())
    with torch.no_grad():
        plain.alpha.fill_(0.3)
        plain.slot_embed.weight.mul_(50.0)
        plain.step_embed.weight.mul_(50.0)
    return plain


def test_draft_without_gates_adds_both_signals_plainly_and_exports_so(tiny, tmp_path):
    """use_gates=False (the ablation's PAD-Rec without gates): the draft layer's input is fc(token, feature) +
    slot embedding + step embedding, no alpha and no gate; every exported draft graph computes the same."""
    import torch
    from padrec_export.models import DraftChain
    from padrec_export.onnx_export import export_engines
    cat, target, draft = tiny
    plain = _ungated(draft, target)
    B, T, H = 2, 5, draft.cfg.hidden_size
    ids = torch.randint(5, cat.layout.vocab_size, (B, T), dtype=torch.int32)
    hid, step = torch.randn(B, T, H), torch.randint(0, 4, (B, T), dtype=torch.int32)
    slot = torch.as_tensor(cat.layout.slots(ids.numpy()))
    with torch.no_grad():
        want = plain.fc(torch.cat([plain.embed_tokens(ids), hid], -1)) + plain.slot_embed(slot) + plain.step_embed(step)
        assert torch.allclose(plain.layer_in(hid, ids, step, slot), want, atol=1e-6)
        assert not torch.allclose(draft.layer_in(hid, ids, step, slot), want, atol=1e-3)
    m = export_engines(target, plain, cat, tmp_path / "plain", "fp32", progress=False)
    chain = DraftChain(plain, cat, m.graph("draft_chain")["chain_steps"])
    for graph, model in (("draft", plain), ("draft_chain", chain)):
        rows = compare_graph(graph, model.eval(), True, OrtBackend(m, graph), m.graph(graph), "fp32")
        assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
        assert all(r.max_abs <= 1e-4 for r in rows if r.output in ("logits", "tokens"))
    rows = compare_in_place_chain(plain, cat, OrtBackend(m, "draft_chain_gqa"), m.graph("draft_chain_gqa"), "fp32")
    assert rows and all(r.ok for r in rows)


def test_draft_without_gates_is_the_gated_draft_with_its_gates_open(tiny, engines_master):
    """Without gates the draft computes exactly what the gated draft does with alpha = 1 and its step gate
    saturated open (weights 0, bias 30: sigmoid is 1.0 in fp32), step by step and in the fused chain (which folds
    the two signals its own way); with the gates as trained, it does not."""
    import torch
    from padrec_export.models import DraftChain
    from padrec_export.parity import torch_outputs
    cat, target, draft = tiny
    plain, gated = _ungated(draft, target), _ungated(draft, target, gates=True)
    opened = _ungated(draft, target, gates=True)
    with torch.no_grad():
        opened.alpha.fill_(1.0)
        opened.gate.weight.zero_()
        opened.gate.bias.fill_(30.0)
    m = load_manifest(engines_master)
    differs = {"draft": False, "draft_chain": False}
    for graph in ("draft", "draft_chain"):
        K = m.graph("draft_chain")["chain_steps"]
        wrap = (lambda d: d) if graph == "draft" else (lambda d: DraftChain(d, cat, K).eval())
        for case, feeds in graph_cases(m.graph(graph), True, vocab_size=cat.layout.vocab_size,
                                       n_slots=cat.layout.n_slots, n_steps=draft.cfg.max_steps):
            got = torch_outputs(wrap(plain), True, feeds, "fp32")
            want = torch_outputs(wrap(opened), True, feeds, "fp32")
            for out in got:
                assert np.array_equal(got[out], want[out]), (graph, case, out)
            differs[graph] |= not np.array_equal(got[out], torch_outputs(wrap(gated), True, feeds, "fp32")[out])
    assert all(differs.values()), differs


def test_export_refuses_a_draft_without_the_layouts_slots(layout_models, tmp_path):
    """A digits item spans up to 9 tokens: a draft trained with per_level's 5 slots cannot take its slot inputs."""
    from padrec_export.models import Draft, DraftConfig
    from padrec_export.onnx_export import export_engines
    from padrec_runtime.errors import InputError
    cat, target, draft = layout_models("digits")
    assert draft.cfg.n_slots == cat.layout.n_slots == 11
    short = Draft(DraftConfig(**{**draft.cfg.to_dict(), "n_slots": 5}), target)
    with pytest.raises(InputError, match="draft n_slots | got 5 | expected at least 11 for the digits layout"):
        export_engines(target, short, cat, tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists()


def test_a_new_engine_directory_is_readable_as_the_umask_allows(engines_master):
    """Not mkdtemp's 0700: a server running as another user reads the engines."""
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert engines_master.stat().st_mode & 0o777 == 0o777 & ~umask


def test_every_engine_file_is_as_readable_as_the_umask_allows(engines_external_master):
    """An export's files, external data included (onnx writes those 0600), take the modes any file the user
    writes would: a server running as another user reads them where the umask lets it."""
    import os
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in engines_external_master.iterdir()}
    assert any(name.endswith(".onnx.data") for name in modes)
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
