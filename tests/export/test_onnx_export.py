"""ONNX export: per-graph parity with PyTorch, live step/slot inputs, checker, polygraphy, tampering."""
import json
import subprocess

import numpy as np
import onnx
import pytest

from padrec_export.parity import compare_graph

from tests.conftest import polygraphy_cli
from padrec_runtime.qa_feeds import graph_cases
from padrec_runtime.backends.onnxruntime import OrtBackend
from padrec_runtime.errors import IntegrityError, ManifestError
from padrec_runtime.manifest import load_manifest


@pytest.mark.parametrize("graph", ["target", "draft"])
def test_onnxruntime_matches_pytorch(tiny, engines_master, graph):
    _, target, draft = tiny
    m = load_manifest(engines_master)
    model = draft if graph == "draft" else target
    rows = compare_graph(graph, model, graph == "draft", OrtBackend(m, graph), m.graph(graph), "fp32")
    cases = {r.case for r in rows}
    assert {"prefill", "chain-verify", "tree-verify"} <= cases
    if graph == "draft":
        assert {f"step-{k}" for k in range(model.cfg.max_steps)} <= cases
        assert {f"slot-{s}" for s in range(model.cfg.n_slots)} <= cases
    for r in rows:
        assert r.ok, r
        if r.output == "logits":
            assert r.max_abs <= 1e-4, r


def test_fp16_export_within_its_tolerances(tiny, tmp_path):
    from padrec_export.onnx_export import export_engines
    cat, target, draft = tiny
    m = export_engines(target, draft, cat, tmp_path / "fp16", "fp16", progress=False)
    for graph, model in (("target", target), ("draft", draft)):
        rows = compare_graph(graph, model, graph == "draft", OrtBackend(m, graph), m.graph(graph), "fp16")
        assert all(r.ok for r in rows), [r for r in rows if not r.ok][:3]
    assert next(iter(target.parameters())).dtype.is_floating_point and target.lm_head.weight.dtype.itemsize == 4


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
