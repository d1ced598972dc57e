"""Weight-only quantization (`padrec export --quantize`): MatMulNBits in place of the decoder layers' MatMuls,
smaller graphs, speculation lossless with respect to the quantized target, parity against the quantized
reference, the manifest's quantization record checked, external weights listed and shared."""
import ctypes
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from padrec_export.build import build_engines
from padrec_export.checkpoint import save_draft, save_target
from padrec_export.cli import main
from padrec_export.onnx_export import export_engines
from padrec_export.parity import compare_graph, run_parity
from padrec_export.quantize import Quantization, dequantize, parse_quantize, quantized_twin
from padrec_export.reference import reference_generate
from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
from padrec_runtime.errors import InputError, ManifestError
from padrec_runtime.grammar import ListConstraint
from padrec_runtime.loop import DecodeConfig
from padrec_runtime.manifest import load_manifest
from tests.conftest import LIMITS

HIST = [[1000, 1001, 1002], [1010], [1020, 1033, 1041, 1007], [1055, 1003]]
LAYER_MATMULS = 4  # q|k|v, o, gate|up, down per decoder layer, in both target graphs


def _checkpoints(tiny, path):
    cat, target, draft = tiny
    save_target(target, path / "target", extra={"layout": cat.layout.to_json()})
    cat.save(path / "catalogue.json")
    save_draft(draft, path / "draft")
    return path / "target", path / "draft"


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory):
    return _checkpoints(tiny, tmp_path_factory.mktemp("quant_checkpoints"))


@pytest.fixture(scope="module", params=["int4", "int8"])
def quantized(request, tiny, checkpoints, tmp_path_factory):
    """(kind, engine directory): int4 exported by the CLI (target and draft quantized, weights embedded), int8
    through export_engines (the target only, weights in external data files)."""
    kind, out = request.param, tmp_path_factory.mktemp(f"quant_{request.param}") / "engines"
    if kind == "int4":
        t, d = checkpoints
        res = CliRunner().invoke(main, ["export", "--target", str(t), "--draft", str(d), "--out", str(out),
                                        "--max-seq-len", str(LIMITS.max_seq_len), "--max-history",
                                        str(LIMITS.max_history), "--max-batch", str(LIMITS.max_batch), "--draft-steps",
                                        str(LIMITS.draft_steps), "--quantize", "int4", "--quantize-draft"])
        assert res.exit_code == 0, res.output
    else:
        cat, target, draft = tiny
        export_engines(target, draft, cat, out, "fp32", LIMITS, progress=False, external_data=True,
                       quantization=Quantization("int8"))
    return kind, out


def _graph_bytes(engines, spec) -> int:
    return sum((engines / f).stat().st_size for f in (spec["file"], *spec.get("external_data", [])))


def _const_matmuls(path):
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    return model, [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def test_quantized_graphs_hold_matmulnbits_and_are_smaller(quantized, engines_master, tiny):
    kind, engines = quantized
    _, target, _ = tiny
    m, plain = load_manifest(engines), load_manifest(engines_master)
    for graph in ("target", "target_gqa"):
        model, matmuls = _const_matmuls(engines / f"{graph}.onnx")
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        record = m.quantization(graph)
        assert len(nbits) == record["matmuls"] == LAYER_MATMULS * target.cfg.n_layers
        assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {record["bits"]}
        assert {a.i for n in nbits for a in n.attribute if a.name == "block_size"} == {32}
        # the one MatMul left over a constant weight is the fp32 output head, untouched
        inits = {i.name: i for i in model.graph.initializer}
        (head,) = matmuls
        np.testing.assert_array_equal(numpy_helper.to_array(inits[head.input[1]]),
                                      target.lm_head.weight.detach().numpy().T)
        ratio = _graph_bytes(engines, m.graph(graph)) / _graph_bytes(engines_master, plain.graph(graph))
        assert ratio < {"int4": 0.35, "int8": 0.5}[kind], (graph, ratio)
    draft_quantized = kind == "int4"
    for graph in ("draft", "draft_chain", "draft_chain_gqa"):
        assert (m.quantization(graph) is not None) == draft_quantized


def test_speculation_is_lossless_with_respect_to_the_quantized_target(quantized, tiny):
    """Chain and tree lists equal target-only greedy lists token for token, and those are the quantized
    target's: PyTorch's reference with the dequantized weights writes them too (the unquantized one need not)."""
    kind, engines = quantized
    cat, target, _ = tiny
    rec = Recommender(engines)
    lists = {mode: [r.tokens for r in rec.recommend(HIST, params=DecodeParams(speculate=mode)).lists]
             for mode in ("off", "chain", "tree")}
    assert lists["chain"] == lists["off"] and lists["tree"] == lists["off"]
    twin = quantized_twin(target, Quantization(kind), torch.float32)
    con = ListConstraint(cat, n_items=rec.manifest.model["n_items"])
    ref = reference_generate(twin, None, HIST, con, DecodeConfig(speculate="off"))
    assert ref.tokens == lists["off"]


def test_parity_compares_with_the_quantized_reference(quantized, checkpoints, tiny):
    kind, engines = quantized
    t, d = checkpoints
    report = run_parity(engines, t, d, n_histories=8, progress=False)
    assert report["ok"], report
    assert report["tiers"]["lists"]["compared"] == 3 * 8 and report["tiers"]["acceptance"]["tau"]["tree"]["runtime"] > 1
    assert f"target's decoder layers {kind}" in report["reference"]
    assert ("draft's decoder layers" in report["reference"]) == (kind == "int4")
    assert report["quantization"]["compared"] == 8 and report["quantization"]["target"]["kind"] == kind
    assert {r["atol"] for r in report["tiers"]["graphs"]["rows"] if r["output"] == "logits"} == {1e-4}
    # the unquantized checkpoint is not what the engine computes: against it, the fp32 tolerance fails
    _, target, _ = tiny
    rec = Recommender(engines)
    rows = compare_graph("target", target, False, rec.backends["target"], rec.manifest.graph("target"), "fp32")
    assert not all(r.ok for r in rows)


def test_the_twin_dequantizes_what_the_graph_holds(quantized, tiny):
    """The reference's weights are exactly the graph's blocks dequantized (MatMulNBits' formula)."""
    kind, engines = quantized
    _, target, _ = tiny
    model = onnx.load(str(engines / "target_gqa.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")  # layer 0's q|k|v
    K = next(a.i for a in node.attribute if a.name == "K")
    packed, scales, zero_points = (inits[name] for name in node.input[1:4])
    graph_weight = dequantize(packed, scales, zero_points, Quantization(kind).bits, K)
    twin = quantized_twin(target, Quantization(kind), torch.float32)
    a = twin.layers[0].self_attn
    twin_weight = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().t().numpy()
    np.testing.assert_array_equal(graph_weight, twin_weight)
    original = target.layers[0].self_attn.q_proj.weight.detach().numpy().T
    assert 0 < np.abs(twin_weight[:, :original.shape[1]] - original).max() < 0.2 * np.abs(original).max()


@pytest.mark.parametrize("quantized", ["int8"], indirect=True)  # the engines whose weights are external
def test_quantized_external_weights_are_listed_and_shared(quantized):
    m = load_manifest(quantized[1])
    weights = m.graph("target")["weights"]
    packed = [w for w in weights if w["dtype"] == "uint8"]
    assert len(packed) >= LAYER_MATMULS and all(w["length"] == int(np.prod(w["shape"])) for w in packed)
    rec = Recommender(quantized[1], options=RuntimeOptions(device_cache=True, static_shapes=True, in_place=True))
    clean = [r.tokens for r in rec.recommend(HIST).lists]
    memory = rec.memory()
    # target and target_gqa quantize the same projections to the same bytes: one copy serves both
    assert memory["weights"] < memory["weights_unshared"]
    for name in (w["name"] for w in packed):  # the sessions compute from the pooled quantized blocks
        value = rec.backends["target_gqa"].supplied.get(name) or rec.backends["target"].supplied[name]
        ctypes.memset(value.data_ptr(), 0, value.tensor_size_in_bytes())
    assert [r.tokens for r in rec.recommend(HIST).lists] != clean


def _edit(engines, tmp_path, edit):
    dst = tmp_path / "edited"
    shutil.copytree(engines, dst)
    data = json.loads((dst / "manifest.json").read_text())
    edit(data)
    (dst / "manifest.json").write_text(json.dumps(data))
    return dst


TAMPER = {
    "bits": (lambda g: g["target"]["quantization"].update(bits=8 if g["target"]["quantization"]["bits"] == 4 else 4),
             "graphs.target.quantization.bits"),
    "kind": (lambda g: g["target"]["quantization"].update(kind="int3"), "graphs.target.quantization.kind"),
    "block": (lambda g: g["target"]["quantization"].update(block_size=48), "graphs.target.quantization.block_size"),
    "symmetric": (lambda g: g["target"]["quantization"].update(symmetric=True), "graphs.target.quantization.symmetric"),
    "unknown key": (lambda g: g["target"]["quantization"].update(scheme="awq"), "graphs.target.quantization.scheme"),
    "one of a pair": (lambda g: g["target_gqa"].pop("quantization"), "graphs.target_gqa.quantization"),
    "pair differs": (lambda g: g["target_gqa"]["quantization"].update(block_size=64),
                     "graphs.target_gqa.quantization"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_a_tampered_quantization_record_is_a_manifest_error(quantized, tmp_path, case):
    edit, key = TAMPER[case]
    engines = _edit(quantized[1], tmp_path, lambda data: edit(data["graphs"]))
    with pytest.raises(ManifestError, match=key.replace(".", r"\.")):
        load_manifest(engines, verify=False)


def test_a_tensorrt_plan_for_a_quantized_graph_is_a_manifest_error(quantized, tmp_path):
    def add_plan(data):
        data["tensorrt"] = {"builder": "tensorrt_rtx", "builder_version": "1", "precision": "fp32",
                            "version_compatible": False, "hardware_compatibility": "NONE", "embeds_host_code": False,
                            "plans": {"target": "target.plan"}, "profile": {"target": {"input_ids": {
                                "min": [1, 1], "opt": [1, 1], "max": [1, 1]}}}}
    with pytest.raises(ManifestError, match=r"tensorrt\.plans\.target: got .* \| expected no TensorRT plan"):
        load_manifest(_edit(quantized[1], tmp_path, add_plan), verify=False)


def test_build_refuses_quantized_engines(quantized):
    with pytest.raises(InputError, match=r"graphs\.\w+\.quantization: int\d .*MatMulNBits.*TensorRT"):
        build_engines(quantized[1])


def test_bad_quantize_options_are_refused(tiny, tmp_path):
    cat, target, draft = tiny
    with pytest.raises(InputError, match="precision bf16"):
        export_engines(target, draft, cat, tmp_path / "e", "bf16", LIMITS, quantization=Quantization())
    with pytest.raises(InputError, match="quantize block size: got 48"):
        Quantization("int4", 48)
    with pytest.raises(InputError, match="quantize: got 'int2'"):
        Quantization("int2")
    with pytest.raises(InputError, match="--quantize-draft: given with --quantize none"):
        parse_quantize("none", draft=True)
    assert parse_quantize("none") is None and parse_quantize("int8", 128) == Quantization("int8", 128)
    assert not (tmp_path / "e").exists()


def test_quantizing_a_graph_of_another_model_is_refused(tiny, engines_master, tmp_path):
    """Projections are found by their bytes: a graph that does not hold every one of the model's is refused
    rather than quantized in part (its engine would then compute another model than its PyTorch twin)."""
    import copy
    from padrec_export.onnx_export import quantize_graph
    _, target, _ = tiny
    other = copy.deepcopy(target)
    with torch.no_grad():
        other.layers[1].down_proj.weight.add_(1e-3)
    shutil.copy(engines_master / "target.onnx", tmp_path / "target.onnx")
    with pytest.raises(InputError, match=r"target\.onnx: decoder layers \[1\] have projections"):
        quantize_graph(tmp_path / "target.onnx", other, Quantization(), "fp32", None)
    files, record = quantize_graph(tmp_path / "target.onnx", target, Quantization(), "fp32", None)
    assert files == [] and record["matmuls"] == LAYER_MATMULS * target.cfg.n_layers
