"""Graphs past STREAMED_BYTES are exported with their weights streamed (streamed.py): the same nodes, the same
weights and the same outputs as the exporter's own path, with every weight in the external data file."""
import collections

import numpy as np
import torch
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import padrec_export.onnx_export as onnx_export
from padrec_export.qa_feeds import graph_cases
from tests.conftest import LIMITS


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _weights(path) -> list:
    """The floating-point initializers (the weights and what was folded from them); the graph's small integer
    tables may sit in a Constant node on one path and an initializer on the other."""
    model = onnx.load(str(path))  # external data loaded from beside it
    return [a for a in (numpy_helper.to_array(t) for t in model.graph.initializer) if a.dtype.kind == "f"]


def _same_weights(a: list, b: list) -> bool:
    """One to one, equal up to the last bit of a folded product (the exporter folds a matmul with its own
    blocking)."""
    left = list(b)
    for x in a:
        match = next((i for i, y in enumerate(left) if y.shape == x.shape and np.allclose(x, y, rtol=0, atol=1e-7)),
                     None)
        if match is None:
            return False
        left.pop(match)
    return not left


@pytest.fixture(scope="module")
def trained_like(tiny):
    """The tiny pair with every weight moved off its initial value (an all-ones norm weight would let onnxslim drop
    its Mul on the exporter's path only, where the weight is a known constant)."""
    import copy

    import torch
    cat, target, draft = tiny
    target = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
        draft = copy.deepcopy(draft)
        draft.embed_tokens, draft.lm_head = target.embed_tokens, target.lm_head
        for name, p in draft.named_parameters():
            if not name.startswith(("embed_tokens.", "lm_head.")):
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return cat, target, draft


def test_streamed_graphs_equal_the_exporters(trained_like, tmp_path, monkeypatch):
    cat, target, draft = trained_like
    plain = onnx_export.export_engines(target, draft, cat, tmp_path / "p", "fp32", LIMITS, progress=False)
    monkeypatch.setattr(onnx_export, "STREAMED_BYTES", 0)  # stream every graph, however small
    m = onnx_export.export_engines(target, draft, cat, tmp_path / "s", "fp32", LIMITS, progress=False)
    for g in ("target", "draft", "draft_chain", "target_gqa", "draft_chain_gqa"):
        assert m.graph(g)["external_data"] == [f"{g}.onnx.data"] and "external_data" not in plain.graph(g)
        a, b = tmp_path / "p" / f"{g}.onnx", tmp_path / "s" / f"{g}.onnx"
        assert _ops(onnx.load(str(a))) == _ops(onnx.load(str(b), load_external_data=False)), g
        assert _same_weights(_weights(a), _weights(b)), g
        inline = [t for t in onnx.load(str(b), load_external_data=False).graph.initializer
                  if t.data_location != onnx.TensorProto.EXTERNAL]
        # what stays inline: shape constants, the chain's trie tables and rotary tables (not parameters)
        floats = sum(len(t.raw_data) for t in inline if t.data_type == onnx.TensorProto.FLOAT)
        assert floats < (tmp_path / "s" / f"{g}.onnx.data").stat().st_size / 4, g
    # the fused target is written node by node, not traced: its weights stream as they are made
    assert (tmp_path / "p" / "target_gqa.onnx").stat().st_size > (tmp_path / "s" / "target_gqa.onnx").stat().st_size
    for g, is_draft in (("target", False), ("draft", True), ("draft_chain", True)):
        sa = ort.InferenceSession(str(tmp_path / "p" / f"{g}.onnx"), providers=["CPUExecutionProvider"])
        sb = ort.InferenceSession(str(tmp_path / "s" / f"{g}.onnx"), providers=["CPUExecutionProvider"])
        for case, feeds in graph_cases(m.graph(g), is_draft, cat.layout.vocab_size, cat.layout.n_slots)[:4]:
            for x, y in zip(sa.run(None, feeds), sb.run(None, feeds)):
                np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=f"{g} {case}")
    # the runtime loads graphs from their verified bytes (no directory to find external data in): shape constants
    # must be inside the graph, and the lists are the plain export's
    from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
    hist = [[int(i) for i in cat.item_ids[:3]], [int(cat.item_ids[7])]]
    for opts in (RuntimeOptions(), RuntimeOptions(device_cache=True, static_shapes=True, in_place=True)):
        lists = [[r.tokens for r in Recommender(d, options=opts).recommend(hist, params=DecodeParams(speculate="chain"))
                  .lists] for d in (tmp_path / "p", tmp_path / "s")]
        assert lists[0] == lists[1], opts


def test_large_weights_take_the_streamed_path(tiny, tmp_path, monkeypatch):
    """The choice is by weight bytes times their uses: a chain graph repeats the draft's weights once per step."""
    cat, target, draft = tiny
    calls = []
    monkeypatch.setattr(onnx_export, "export_streamed", lambda *a: calls.append(a[2].name) or ["x.data"])
    per_draft = sum(p.numel() * p.element_size() for p in draft.parameters())
    monkeypatch.setattr(onnx_export, "STREAMED_BYTES", per_draft * 2)  # the draft alone stays, its 3-step chain not
    onnx_export.export_graph(draft, True, "fp32", tmp_path / "draft.onnx")
    onnx_export.export_chain_graph(draft, cat, 3, "fp32", tmp_path / "draft_chain.onnx")
    assert calls == ["draft_chain.onnx"] and (tmp_path / "draft.onnx").is_file()


def test_small_tensors_stay_in_the_graph(tmp_path):
    """A graph loaded from bytes cannot have ONNX Runtime's shape inference read external data: shape constants
    (folded from weight shapes, a few bytes) are written inline, weights to the data file."""
    from padrec_export.streamed import INLINE_BYTES, DataFile
    with DataFile(tmp_path / "g.onnx.data") as data:
        small = data.add("starts", torch.tensor([0, 3], dtype=torch.int64))
        big = data.add("w", torch.ones(INLINE_BYTES // 4, dtype=torch.float32))
    assert small.data_location != onnx.TensorProto.EXTERNAL and np.frombuffer(small.raw_data, np.int64).tolist() == [0, 3]
    assert big.data_location == onnx.TensorProto.EXTERNAL
    assert (tmp_path / "g.onnx.data").stat().st_size == INLINE_BYTES


def test_a_bf16_target_streams_the_same_bits(trained_like, tmp_path, monkeypatch):
    """bf16 (numpy has none): the streamed graph's weights are the exporter's, bit for bit."""
    _, target, _ = trained_like
    onnx_export.export_graph(target, False, "bf16", tmp_path / "plain.onnx")
    monkeypatch.setattr(onnx_export, "STREAMED_BYTES", 0)
    assert onnx_export.export_graph(target, False, "bf16", tmp_path / "streamed.onnx") == ["streamed.onnx.data"]
    plain, streamed = onnx.load(str(tmp_path / "plain.onnx")), onnx.load(str(tmp_path / "streamed.onnx"))
    assert _ops(plain) == _ops(streamed)
    bits = lambda m: sorted(t.raw_data for t in m.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16)  # noqa: E731
    assert bits(plain) == bits(streamed) and len(bits(plain)) > 10
