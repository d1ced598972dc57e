"""Quantization on the LLM-sized paths: graphs exported streamed (weights in `<graph>.onnx.data`, forced here on
the tiny pair by setting STREAMED_BYTES to 0) and quantized stay external, listed and lossless; each distinct
weight is quantized once per export; a second engine directory linking the first's quantized target graphs is
consistent with its manifest."""
import hashlib

import onnx
import pytest
import torch

import padrec_export.onnx_export as onnx_export
from padrec_export.quantize import Quantization, _quantizer_module, quantized_twin
from padrec_export.reference import reference_generate
from padrec_runtime import DecodeParams, Recommender
from padrec_runtime.errors import InputError
from padrec_runtime.grammar import ListConstraint
from padrec_runtime.loop import DecodeConfig
from padrec_runtime.manifest import load_manifest
from tests.conftest import LIMITS

HIST = [[1000, 1001, 1002], [1010], [1020, 1033, 1041, 1007], [1055, 1003]]
GRAPHS = ("target", "draft", "draft_chain", "target_gqa", "draft_chain_gqa")
Q = Quantization("int4", draft=True)


@pytest.fixture(scope="module")
def streamed(tiny, tmp_path_factory):
    """(engine directory, block quantizations made): the tiny pair exported streamed with target and draft int4."""
    cat, target, draft = tiny
    mnq = _quantizer_module()
    calls = []
    real = mnq.DefaultWeightOnlyQuantizer.qbits_block_quant
    out = tmp_path_factory.mktemp("quant_streamed") / "a"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "STREAMED_BYTES", 0)  # stream every graph, however small
        mp.setattr(mnq.DefaultWeightOnlyQuantizer, "qbits_block_quant",
                   lambda self, w: calls.append(w.shape) or real(self, w))
        onnx_export.export_engines(target, draft, cat, out, "fp32", LIMITS, progress=False, quantization=Q)
    return out, calls


def test_a_streamed_quantized_pair_is_lossless_with_respect_to_the_quantized_target(streamed, tiny):
    engines, _ = streamed
    cat, target, _ = tiny
    m = load_manifest(engines)
    for g in GRAPHS:  # streamed graphs keep their weights external once quantized
        assert m.graph(g)["external_data"] == [f"{g}.onnx.data"], g
        assert m.quantization(g)["kind"] == "int4", g
    rec = Recommender(engines)
    lists = {mode: [r.tokens for r in rec.recommend(HIST, params=DecodeParams(speculate=mode)).lists]
             for mode in ("off", "chain", "tree")}
    assert lists["chain"] == lists["off"] and lists["tree"] == lists["off"]
    twin = quantized_twin(target, Q, torch.float32)
    ref = reference_generate(twin, None, HIST, ListConstraint(cat, n_items=m.model["n_items"]),
                             DecodeConfig(speculate="off"))
    assert ref.tokens == lists["off"]


def test_the_weights_list_covers_the_quantized_initializers(streamed):
    """Every external tensor a MatMulNBits reads (packed blocks, scales, zero points) is in the manifest's
    weights list with the sha256 of its bytes; the packed blocks all lie outside the graph."""
    engines, _ = streamed
    m = load_manifest(engines)
    for g in GRAPHS:
        model = onnx.load(str(engines / f"{g}.onnx"), load_external_data=False)
        inits = {i.name: i for i in model.graph.initializer}
        listed = {w["name"]: w for w in m.graph(g)["weights"]}
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == m.quantization(g)["matmuls"], g
        for node in nbits:
            assert inits[node.input[1]].data_location == onnx.TensorProto.EXTERNAL, (g, node.input[1])
            for name in node.input[1:4]:
                if inits[name].data_location != onnx.TensorProto.EXTERNAL:
                    continue
                w = listed[name]
                with open(engines / w["file"], "rb") as f:
                    f.seek(w["offset"])
                    assert hashlib.sha256(f.read(w["length"])).hexdigest() == w["sha256"], (g, name)


def test_each_distinct_weight_is_quantized_once(streamed, tiny):
    """target and target_gqa hold the same projections, the chain graphs repeat the draft's layer per step: the
    quantizer runs once per distinct weight, not once per MatMul."""
    engines, calls = streamed
    _, target, _ = tiny
    m = load_manifest(engines)
    matmuls = sum(m.quantization(g)["matmuls"] for g in GRAPHS)
    # both targets: 4 groups a decoder layer (q|k|v, o, gate|up, down); the draft's one layer: 5 (gate, up apart)
    distinct = 4 * target.cfg.n_layers + 5
    assert len(calls) == distinct < matmuls


def test_a_linked_quantized_directory_matches_its_manifest(streamed, tiny, tmp_path):
    engines, _ = streamed
    cat, target, draft = tiny
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "STREAMED_BYTES", 0)
        onnx_export.export_engines(target, draft, cat, tmp_path / "b", "fp32", LIMITS, progress=False,
                                   quantization=Q, reuse_target=engines)
        with pytest.raises(InputError, match=r"reuse_target .*quantization .*int4.* \| expected fp32, 160, .*int8"):
            onnx_export.export_engines(target, draft, cat, tmp_path / "c", "fp32", LIMITS, progress=False,
                                       quantization=Quantization("int8"), reuse_target=engines)
    linked = load_manifest(tmp_path / "b")  # every file's sha256 checked, the linked ones too
    for g in ("target", "target_gqa"):
        assert linked.quantization(g) == load_manifest(engines).quantization(g)
        for f in (f"{g}.onnx", f"{g}.onnx.data"):
            assert (tmp_path / "b" / f).stat().st_ino == (engines / f).stat().st_ino, f
    lists = [[r.tokens for r in Recommender(d).recommend(HIST, params=DecodeParams(speculate="chain")).lists]
             for d in (engines, tmp_path / "b")]
    assert lists[0] == lists[1]
    assert not (tmp_path / "c").exists()


def test_an_fp16_streamed_quantized_pair_speculates_losslessly(tiny, tmp_path):
    """fp16, the precision LLM-sized pairs are exported in: the scales are fp16 and the lists still equal
    target-only greedy lists."""
    cat, target, draft = tiny
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "STREAMED_BYTES", 0)
        m = onnx_export.export_engines(target, draft, cat, tmp_path / "e", "fp16", LIMITS, progress=False,
                                       quantization=Q)
    assert all(m.graph(g)["external_data"] == [f"{g}.onnx.data"] for g in GRAPHS)
    model = onnx.load(str(tmp_path / "e" / "target.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    scales = {inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert scales == {onnx.TensorProto.FLOAT16}
    rec = Recommender(tmp_path / "e")
    lists = {mode: [r.tokens for r in rec.recommend(HIST, params=DecodeParams(speculate=mode)).lists]
             for mode in ("off", "chain", "tree")}
    assert lists["chain"] == lists["off"] and lists["tree"] == lists["off"]
