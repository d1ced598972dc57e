"""Export of plain multi-head attention (heads == KV heads) as well as grouped-query attention: every graph, in
place and standard, equal to PyTorch; and a failed export leaves no half-made engine directory."""
import pytest

from padrec_export.onnx_export import ExportLimits, export_engines
from padrec_export.parity import compare_fused_target, compare_graph, compare_in_place_chain
from padrec_export.tiny import TinySpec, tiny_setup
from padrec_runtime.backends.onnxruntime import OrtBackend
from padrec_runtime.manifest import load_manifest
from padrec_runtime import DecodeParams, Recommender, RuntimeOptions

from tests.conftest import LIMITS, TINY

MHA = TinySpec(seed=7, levels=3, codebook=8, n_items=40, hidden=32, layers=1, heads=2, kv_heads=2)


@pytest.fixture(scope="session")
def mha(tmp_path_factory):
    """(catalogue, target, draft, engine dir) of a tiny plain multi-head attention model, every graph exported."""
    cat, target, draft = tiny_setup(MHA)
    out = tmp_path_factory.mktemp("mha") / "engines"
    export_engines(target, draft, cat, out, "fp32", LIMITS, progress=False)
    return cat, target, draft, out


def _parity_rows(cat, target, draft, engine_dir) -> dict:
    from padrec_export.models import DraftChain
    m = load_manifest(engine_dir)
    rows = {}
    for graph, model in (("target", target), ("draft", draft),
                         ("draft_chain", DraftChain(draft, cat, m.graph("draft_chain")["chain_steps"]).eval())):
        rows[graph] = compare_graph(graph, model, graph != "target", OrtBackend(m, graph), m.graph(graph), "fp32")
    rows["target_gqa"] = compare_fused_target(target, OrtBackend(m, "target_gqa"), m.graph("target_gqa"), "fp32")
    rows["draft_chain_gqa"] = compare_in_place_chain(draft, cat, OrtBackend(m, "draft_chain_gqa"),
                                                     m.graph("draft_chain_gqa"), "fp32")
    return rows


def _assert_equal_to_pytorch(rows: dict) -> None:
    assert set(rows) == {"target", "draft", "draft_chain", "target_gqa", "draft_chain_gqa"}
    for graph, graph_rows in rows.items():
        assert graph_rows, graph
        bad = [r for r in graph_rows if not r.ok]
        assert not bad, bad[:3]
        for r in graph_rows:
            if r.output == "logits":
                assert r.max_abs <= 1e-4, r
            if r.output == "tokens":
                assert r.max_abs == 0, r


def test_multi_head_attention_exports_every_graph_equal_to_pytorch(mha):
    """heads == KV heads: the in-place graphs (GroupQueryAttention with one query head per KV head) and the
    standard graphs all export, and each computes what PyTorch does."""
    cat, target, draft, out = mha
    assert target.cfg.n_heads == target.cfg.n_kv_heads == 2
    m = load_manifest(out)
    assert set(m.data["graphs"]) == {"target", "draft", "draft_chain", "target_gqa", "draft_chain_gqa"}
    _assert_equal_to_pytorch(_parity_rows(cat, target, draft, out))


def test_grouped_query_attention_exports_every_graph_equal_to_pytorch(tiny, engines_master):
    """The same checks on the shared grouped-query test model (4 heads over 2 KV heads)."""
    cat, target, draft = tiny
    assert (TINY.heads, TINY.kv_heads) == (4, 2)
    _assert_equal_to_pytorch(_parity_rows(cat, target, draft, engines_master))


def test_multi_head_attention_runtime_lists_agree_in_place_and_standard(mha):
    """The runtime on the MHA engines: the in-place graphs give the standard graphs' lists, AR and chain."""
    cat, _, _, out = mha
    hist = [cat.item_ids[:6].tolist()]
    plain = Recommender(out, options=RuntimeOptions(device_cache=True, static_shapes=False, in_place=False))
    fused = Recommender(out, options=RuntimeOptions(device_cache=True, static_shapes=False, in_place=True))
    assert fused.settings.in_place and not plain.settings.in_place and "target_gqa" in fused.backends
    for mode in ("off", "chain"):
        a = plain.recommend(hist, params=DecodeParams(speculate=mode))
        b = fused.recommend(hist, params=DecodeParams(speculate=mode))
        assert [r.tokens for r in a.lists] == [r.tokens for r in b.lists], mode
        assert len(a.lists[0].item_ids) == LIMITS.n_items


def test_failed_export_leaves_no_directory(mha, tmp_path, monkeypatch):
    """A graph failing mid-export: no engine directory appears, and no temporary one is left beside it; an
    earlier export in the target directory stays whole."""
    import padrec_export.onnx_export as ox
    cat, target, draft, _ = mha

    def broken(*args, **kwargs):
        raise RuntimeError("exporter failed")
    monkeypatch.setattr(ox, "export_chain_graph", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_engines(target, draft, cat, tmp_path / "new", "fp32", LIMITS, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export_engines(target, None, cat, tmp_path / "old", "fp32", LIMITS, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    monkeypatch.setattr(ox, "export_chain_graph", broken)
    with pytest.raises(RuntimeError):
        export_engines(target, draft, cat, tmp_path / "old", "fp32", LIMITS, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    load_manifest(tmp_path / "old")
