"""TensorRT engine build with TensorRT for RTX on this CPU-only machine: a real parse and build."""
import json

import pytest

from padrec_export.build import BuildOptions, build_engines, profile_shapes
from padrec_runtime.errors import BackendError, InputError
from padrec_runtime.manifest import load_manifest

trt = pytest.importorskip("tensorrt_rtx")


def test_rtx_builds_every_graph_and_records_it(engines):
    m = build_engines(engines, BuildOptions(builder="tensorrt_rtx"), progress=False)
    for graph in ("target", "draft", "draft_chain"):
        plan = engines / f"{graph}.plan"
        assert plan.stat().st_size > 10_000
        assert m.data["files"][f"{graph}.plan"]["bytes"] == plan.stat().st_size
    rec = json.loads((engines / "manifest.json").read_text())["tensorrt"]
    assert rec["builder"] == "tensorrt_rtx" and rec["builder_version"] == trt.__version__
    assert rec["plans"] == {"target": "target.plan", "draft": "draft.plan", "draft_chain": "draft_chain.plan"}
    assert rec["profile"]["draft_chain"]["last"]["max"] == [8]  # per-row input: batch only
    assert rec["profile"]["target"]["attention_mask"]["max"][2] == 160 + rec["profile"]["target"]["attention_mask"]["max"][1]
    load_manifest(engines)  # the updated manifest verifies


def test_profiles_follow_the_manifest_limits(engines):
    shapes = profile_shapes(load_manifest(engines), "draft")
    assert shapes["step"][2][0] == 8  # max_batch
    assert shapes["past.0.key"][2][2] == 160  # max_seq_len


def test_missing_builder_and_bad_options(engines):
    with pytest.raises(BackendError, match="tensorrt: TensorRT builder module not installed"):
        try:
            import tensorrt  # noqa: F401
            pytest.skip("full TensorRT is installed here")
        except ImportError:
            build_engines(engines, BuildOptions(builder="tensorrt"), progress=False)
    with pytest.raises(InputError, match="timing cache"):
        build_engines(engines, BuildOptions(builder="tensorrt_rtx", timing_cache="x.cache"), progress=False)
    with pytest.raises(InputError, match="re-export with --precision fp16"):
        build_engines(engines, BuildOptions(builder="tensorrt_rtx", precision="fp16"), progress=False)
    with pytest.raises(InputError, match="builder"):
        build_engines(engines, BuildOptions(builder="onnx2trt"), progress=False)
