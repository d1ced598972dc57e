"""Hardening: engine files used only as the bytes that were hashed, external data, the manifest and catalogue
schemas, the chain graph's NaN flag, and engine files confined to their directory."""
import dataclasses
import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from padrec_export.onnx_export import export_graph
from padrec_export.tiny import tiny_setup
from padrec_runtime.backends.onnxruntime import OrtBackend
from padrec_runtime.errors import BackendError, IntegrityError, ManifestError
from padrec_runtime.grammar import Catalogue
from padrec_runtime.manifest import load_manifest, parse_manifest, write_manifest
from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
from tests.conftest import TINY

HIST = [[1000, 1001, 1002], [1010]]


def _lists(rec, histories=HIST, speculate="chain"):
    return [r.tokens for r in rec.recommend(histories, params=DecodeParams(speculate=speculate)).lists]


def _resign(engines):
    """Re-hash every listed file into the manifest: what an attacker with write access to the whole directory
    (or a careless copy) would do; the runtime must still refuse what does not fit."""
    write_manifest(engines, load_manifest(engines, verify=False).data)


def _edit_manifest(engines, edit):
    m = json.loads((engines / "manifest.json").read_text())
    edit(m)
    (engines / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def other_target(tmp_path_factory):
    """target.onnx of another model of the same shapes (other weights): a swap the graph checks cannot see."""
    _, target, _ = tiny_setup(dataclasses.replace(TINY, seed=11))
    path = tmp_path_factory.mktemp("other") / "target.onnx"
    export_graph(target, False, "fp32", path)
    return path


# -- the bytes that were hashed are the bytes loaded --------------------------------------------------------------

def test_a_graph_swapped_after_load_never_reaches_a_new_bucket(engines, other_target):
    swapped = engines.parent / "swapped"
    shutil.copytree(engines, swapped)
    shutil.copy(other_target, swapped / "target.onnx")
    _resign(swapped)
    wrong = _lists(Recommender(swapped), HIST[:1])
    clean = _lists(Recommender(engines), HIST[:1])
    assert wrong != clean  # the swap matters: a session over the new file would give another list

    rec = Recommender(engines, options=RuntimeOptions(device_cache=True, static_shapes=True, in_place=False))
    assert _lists(rec, HIST) == _lists(Recommender(engines), HIST)
    before = set(rec.backends["target"]._static)
    shutil.copy(other_target, engines / "target.onnx")  # replaced while the Recommender serves
    assert _lists(rec, HIST[:1]) == clean  # batch 1: new bucket sessions, made from the verified bytes
    assert set(rec.backends["target"]._static) > before


def test_bucket_sessions_come_from_the_verified_bytes(engines, other_target):
    m = load_manifest(engines)
    backend = OrtBackend(m, "target")
    shutil.copy(other_target, engines / "target.onnx")
    dims = {"batch": 1, "seq": 2, "past": 3, "past_plus_seq": 5}
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(5, 20, (1, 2)).astype(np.int32),
             "position_ids": np.array([[3, 4]], np.int32), "attention_mask": np.ones((1, 2, 5), bool)}
    for i in range(2):
        for part in ("key", "value"):
            feeds[f"past.{i}.{part}"] = rng.standard_normal((1, 2, 3, 16)).astype(np.float32)
    names = [o.name for o in backend.session.get_outputs()]
    want = backend.session.run(names, feeds)
    got = backend.static_session(dims).run(names, feeds)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)


def test_the_catalogue_is_parsed_from_checked_bytes(engines):
    m = load_manifest(engines)
    raw = m.read("catalogue.json")
    assert json.loads(raw)["item_ids"][:1] == [1000]
    (engines / "catalogue.json").write_bytes(raw.replace(b"1000", b"1999"))
    with pytest.raises(IntegrityError, match="catalogue.json: sha256 differs"):
        m.load_catalogue()


# -- external data ------------------------------------------------------------------------------------------------

@pytest.fixture
def engines_ext(engines_external_master, tmp_path):
    dst = tmp_path / "ext"
    shutil.copytree(engines_external_master, dst)
    return dst


def test_external_data_is_listed_hashed_and_loads_the_same_lists(engines_ext, engines_master):
    m = load_manifest(engines_ext)
    for name, g in m.data["graphs"].items():
        assert g["external_data"] == [f"{name}.onnx.data"]
        entry = m.data["files"][f"{name}.onnx.data"]
        assert entry["bytes"] == (engines_ext / f"{name}.onnx.data").stat().st_size > 0
        assert (engines_ext / g["file"]).stat().st_size < entry["bytes"]  # the weights are outside the graph
    assert _lists(Recommender(engines_ext)) == _lists(Recommender(engines_master))
    fused = RuntimeOptions(device_cache=True, static_shapes=True, in_place=True)
    assert _lists(Recommender(engines_ext, options=fused)) == _lists(Recommender(engines_master))


def _negate_half(path):
    data = np.frombuffer(path.read_bytes(), np.uint8).copy()
    data[: len(data) // 2] ^= 0xFF
    path.write_bytes(data.tobytes())


@pytest.mark.parametrize("file", ["target.onnx.data", "draft.onnx.data", "draft_chain.onnx.data"])
def test_negated_external_data_is_an_integrity_error(engines_ext, file):
    _negate_half(engines_ext / file)
    with pytest.raises(IntegrityError, match=f"{file}: sha256 differs"):
        Recommender(engines_ext)
    # and without the load-time sweep: the backend reads and checks what it hands to ONNX Runtime
    m = load_manifest(engines_ext, verify=False)
    graph = file.removesuffix(".onnx.data")
    with pytest.raises(IntegrityError, match=f"{file}: sha256 differs"):
        OrtBackend(m, graph)


def test_external_data_swapped_after_load_fails_a_new_bucket_loudly(engines_ext):
    rec = Recommender(engines_ext, options=RuntimeOptions(device_cache=True, static_shapes=True, in_place=False))
    clean = _lists(rec, HIST)
    _negate_half(engines_ext / "target.onnx.data")
    try:
        got = _lists(rec, HIST[:1])
    except IntegrityError as exc:
        assert "target.onnx.data" in str(exc)
    else:
        assert got == clean[:1]


def test_an_unlisted_sidecar_is_never_read(engines_ext):
    def drop(m):
        del m["graphs"]["target"]["external_data"]
        del m["graphs"]["target"]["weights"]
        del m["files"]["target.onnx.data"]
    _edit_manifest(engines_ext, drop)
    _resign(engines_ext)
    with pytest.raises(BackendError, match="target.onnx: onnxruntime cannot make a session of it"):
        OrtBackend(load_manifest(engines_ext), "target")


def test_export_writes_external_data_only_when_needed(engines_master):
    assert not list(engines_master.glob("*.data"))
    assert all("external_data" not in g for g in load_manifest(engines_master).data["graphs"].values())


def test_fp16_engines_keep_their_weights_outside_listed_for_sharing(tiny, tmp_path):
    from padrec_export.onnx_export import export_engines
    from tests.conftest import LIMITS
    cat, target, draft = tiny
    m = export_engines(target, draft, cat, tmp_path / "fp16", "fp16", LIMITS, progress=False)
    for g in m.data["graphs"].values():
        assert g["external_data"] and g["weights"]
        assert {w["file"] for w in g["weights"]} == set(g["external_data"])


# -- one copy of each weight, shared by every session of every graph ----------------------------------------------

def _distinct_weight_bytes(m) -> int:
    return sum({w["sha256"]: w["length"] for g in m.data["graphs"].values() for w in g["weights"]}.values())


def test_sessions_share_one_copy_of_each_weight(engines_ext):
    import ctypes
    rec = Recommender(engines_ext, options=RuntimeOptions(device_cache=True, static_shapes=True, in_place=True))
    clean = _lists(rec, HIST)
    assert _lists(rec, HIST[:1]) == clean[:1]  # a second bucket shape: another session of each graph
    memory = rec.memory()
    assert memory["weights"] == _distinct_weight_bytes(rec.manifest) < memory["weights_unshared"]
    assert memory["weights_allocated"] == memory["weights"]  # on the CPU one allocation per tensor, unpadded
    assert memory["kv_caches"] > 0
    # the sessions compute from the pooled tensors themselves: zeroing them changes what every session answers
    for value in rec.backends["target"].supplied.values():
        ctypes.memset(value.data_ptr(), 0, value.tensor_size_in_bytes())
    assert _lists(rec, HIST) != clean


def test_memory_reports_the_device_caches_bound_buffers_by_kind(engines_ext):
    """Recommender.memory()["cache_buffers"]: the kept device caches' bound buffers by kind, each once: a larger batch
    adds its cache's, a repeated request adds nothing (the buffers are kept and reused), the prefill windows' shared
    set counts once, and host caches hold none."""
    options = RuntimeOptions(device_cache=True, static_shapes=True, in_place=False, prefill_rows=2)
    rec = Recommender(engines_ext, options=options)
    _lists(rec, HIST[:1])
    one = rec.memory()["cache_buffers"]
    assert one["outputs"] > 0 and one["inputs"] > 0 and one["new_kv"] > 0
    rec.recommend([HIST[0]] * 5)  # a prefill in three windows of two rows
    five = rec.memory()["cache_buffers"]
    rec.recommend([HIST[0]] * 5)
    assert rec.memory()["cache_buffers"] == five and sum(five.values()) > sum(one.values())
    whole = rec.caches._shared[("target", 5)]

    def nbytes(new, outs, ins):
        return sum(int(a.nbytes) for a in (new, outs.blob, ins.blob if ins is not None else None) if a is not None)
    window_set = sum(nbytes(*bufs) for bufs in whole._window_buffers.values())
    own = sum(nbytes(b.bound.new, b.bound.outs, b.bound.ins) for b in whole._buckets.values())
    assert len(whole._windows) >= 2 and window_set > 0
    kinds = whole.buffer_bytes()
    assert sum(kinds.values()) - kinds.get("rounds", 0) == own + window_set
    host = Recommender(engines_ext, options=RuntimeOptions(device_cache=False))
    _lists(host, HIST[:1])
    assert host.memory()["cache_buffers"] == {}


def test_prefill_windows_of_every_batch_size_share_one_set_of_buffers(engines_ext):
    """The caches of two batch sizes (5 and 7 rows, windows of two) bind their prefill windows to one set of buffers:
    the second batch size adds its own buckets' buffers only, and both still decode as one call over every row does."""
    options = RuntimeOptions(device_cache=True, static_shapes=True, in_place=False, prefill_rows=2)
    rec = Recommender(engines_ext, options=options)
    whole = Recommender(engines_ext, options=RuntimeOptions(device_cache=True, static_shapes=True, in_place=False,
                                                            prefill_rows=8))
    hist = {5: [HIST[0]] * 5, 7: [HIST[i % len(HIST)] for i in range(7)]}
    got = {b: _lists(rec, h) for b, h in hist.items()}
    five, seven = rec.caches._shared[("target", 5)], rec.caches._shared[("target", 7)]
    assert five._windows and seven._windows and five._window_buffers is seven._window_buffers
    bound = {id(b.bound.outs.blob) for c in (five, seven) for w in c._windows.values() for b in w._buckets.values()}
    assert bound == {id(outs.blob) for _, outs, _ in five._window_buffers.values()}  # every window binds the one set
    assert got == {b: _lists(whole, h) for b, h in hist.items()}
    each = sum(sum(c.buffer_bytes().values()) for c in rec.caches._shared.values())  # a cache alone counts the set
    once = sum(rec.memory()["cache_buffers"].values())
    sets = sum(int(o.blob.nbytes) + int(i.blob.nbytes) + (int(n.nbytes) if n is not None else 0)
               for c in (five, rec.caches._shared[("draft", 5)]) for n, o, i in c._window_buffers.values())
    assert sets > 0 and each - once == sets  # the target's and the draft's sets, each counted once, not twice


def test_a_slab_lays_each_weight_on_its_own_aligned_span():
    """On CUDA a graph's new weights share one allocation of exactly their size: every tensor starts on a 256-byte
    boundary after the one before it ends, and the slab ends where the last aligned tensor does."""
    from padrec_runtime.backends.weights import slab_layout
    sizes = [3, 256, 0, 257, 1 << 20, 5]
    offsets, total = slab_layout(sizes)
    assert offsets == [0, 256, 512, 512, 1024, 1024 + (1 << 20)] and total == 1024 + (1 << 20) + 256
    assert all(o % 256 == 0 for o in offsets)
    assert all(a + n <= b for a, n, b in zip(offsets, sizes, offsets[1:] + [total]))
    assert slab_layout([]) == ([], 0)


def test_a_false_claim_of_equal_weights_is_an_integrity_error(engines_ext):
    def claim(m):
        target, draft = m["graphs"]["target"]["weights"], m["graphs"]["draft"]["weights"]
        other = next(w for w in draft if w["length"] == target[0]["length"] and w["sha256"] != target[0]["sha256"])
        other["sha256"] = target[0]["sha256"]
    _edit_manifest(engines_ext, claim)
    with pytest.raises(IntegrityError, match="bytes differ from another graph's tensor of the same sha256"):
        Recommender(engines_ext)


def _weight(m, graph="target"):
    return m["graphs"][graph]["weights"][0]


BAD_WEIGHTS = {
    "length not its shape's": lambda m: _weight(m).update(length=_weight(m)["length"] + 4),
    "file of another graph": lambda m: _weight(m).update(file="draft.onnx.data"),
    "span past the file's end": lambda m: _weight(m).update(offset=m["files"]["target.onnx.data"]["bytes"]),
    "dtype unknown": lambda m: _weight(m).update(dtype="float8"),
    "shape not a list": lambda m: _weight(m).update(shape=7),
    # a product of these wraps to 1 in int64
    "shape that overflows": lambda m: _weight(m).update(shape=[4294967297, 4294967295, 4294967297, 4294967295]),
    "offset moved by 4 bytes": lambda m: _weight(m).update(offset=_weight(m)["offset"] + 4),
    "span of another tensor": lambda m: _weight(m).update(offset=next(
        w["offset"] for w in m["graphs"]["target"]["weights"][1:] if w["length"] == _weight(m)["length"])),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_weight_entries_are_manifest_errors(engines_external_master, case):
    m = json.loads((engines_external_master / "manifest.json").read_text())
    BAD_WEIGHTS[case](m)
    with pytest.raises(ManifestError, match=r"manifest .*graphs.target.weights\[0\]"):
        parse_manifest(m, engines_external_master)


def _swap_same_shape(m):
    """The names of the first two target weights of one shape and type swapped: every span stays valid."""
    ws = m["graphs"]["target"]["weights"]
    a, b = next((a, b) for i, a in enumerate(ws) for b in ws[i + 1:]
                if (a["shape"], a["dtype"]) == (b["shape"], b["dtype"]) and a["sha256"] != b["sha256"])
    a["name"], b["name"] = b["name"], a["name"]


@pytest.mark.parametrize("case, edit", [
    ("names of two same-shape tensors swapped", _swap_same_shape),
    ("a name the graph does not have", lambda m: _weight(m).update(name="no.such.tensor")),
    ("the shape of another tensor of that size", lambda m: _weight(m).update(shape=_weight(m)["shape"][::-1])),
])
def test_weight_entries_that_name_the_wrong_tensor_are_refused_at_load(engines_ext, case, edit):
    """The data files are hashed whole, so a manifest that says another tensor lies at a span would feed a session
    the wrong bytes: each entry is held against the graph's own initializer of that name when the engines load."""
    path = engines_ext / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match=r"graphs\.target\.weights\[\d+\] .*target\.onnx says .* \| the "
                                             r"manifest is wrong: re-export the engines"):
        Recommender(engines_ext)


def test_a_cache_longer_than_the_rotary_tables_is_refused_at_load(engines):
    """A manifest raised to more positions than the in-place graphs' rotary tables hold, consistently (model and
    every in-place graph), is refused when the engines load, not by ONNX Runtime at the first long request."""
    path = engines / "manifest.json"
    m = json.loads(path.read_text())
    m["model"]["max_seq_len"] = 4096
    for g in m["graphs"].values():
        if g.get("kv", {}).get("in_place"):
            g["kv"]["max_len"] = 4096
    path.write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match=r"graphs\.target_gqa\.kv\.max_len: the manifest says 4096 positions, "
                                             r"target_gqa\.onnx's rotary tables hold \d+ \| the manifest is wrong"):
        Recommender(engines, options=RuntimeOptions(device_cache=True, static_shapes=True, in_place=True))


def test_a_manifest_that_is_not_a_regular_file_is_named_so(engines):
    (engines / "manifest.json").unlink()
    (engines / "manifest.json").mkdir()
    with pytest.raises(ManifestError, match=r"manifest\.json: not a regular file \| expected the JSON"):
        load_manifest(engines)


# -- manifest values that crashed or were accepted ----------------------------------------------------------------

def _graph(name):
    return lambda m: m["graphs"][name]


BAD_MANIFEST = {
    "logits shape empty": lambda m: _graph("target")(m)["outputs"]["logits"].update(shape=[]),
    "logits size 10**12": lambda m: _graph("target")(m)["outputs"]["logits"].update(shape=["batch", "seq", 10**12]),
    "logits size string": lambda m: _graph("target")(m)["outputs"]["logits"].update(shape=["batch", "seq", "x"]),
    "logits size -5": lambda m: _graph("target")(m)["outputs"]["logits"].update(shape=["batch", "seq", -5]),
    "hidden size 1e30": lambda m: _graph("draft")(m)["outputs"]["hidden"].update(shape=["batch", "seq", 1e30]),
    "shape unknown name": lambda m: _graph("draft")(m)["inputs"]["step"].update(shape=["batch", "anything"]),
    "kv template %s": lambda m: _graph("target")(m)["kv"].update(key_input="past.%s.%d"),
    "kv template two %d": lambda m: _graph("target")(m)["kv"].update(key_input="past.%d.%d"),
    "kv templates equal": lambda m: _graph("target")(m)["kv"].update(key_output=_graph("target")(m)["kv"]["key_input"]),
    "kv key and value swapped": lambda m: _graph("target")(m)["kv"].update(key_input="past.%d.value",
                                                                           value_input="past.%d.key"),
    "kv outputs swapped": lambda m: _graph("draft")(m)["kv"].update(key_output="new.%d.value", value_output="new.%d.key"),
    "tolerance nan": lambda m: _graph("target")(m)["tolerances"]["logits"].update(atol=float("nan")),
    "tolerance inf": lambda m: _graph("target")(m)["tolerances"]["logits"].update(rtol=float("inf")),
    "dtype of logits": lambda m: _graph("target")(m)["outputs"]["logits"].update(dtype="float16"),
    "extra tensor": lambda m: _graph("target")(m)["inputs"].update(extra={"dtype": "int32", "shape": ["batch"]}),
    "banned width": lambda m: _graph("draft_chain")(m)["inputs"]["banned"].update(shape=["batch", 7]),
    "chain without finite flag": lambda m: _graph("draft_chain")(m)["outputs"].pop("finite"),
    "chain without catalogue digest": lambda m: _graph("draft_chain")(m).pop("catalogue"),
    "sha256 not hex": lambda m: m["files"]["target.onnx"].update(sha256="z" * 64),
    "file name ..": lambda m: _graph("target")(m).update(file="../target.onnx"),
    "file name absolute": lambda m: _graph("target")(m).update(file="/etc/hostname"),
    "files key ..": lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "bytes": 1}}),
    "schema_version true": lambda m: m.update(schema_version=True),
}


@pytest.mark.parametrize("case", list(BAD_MANIFEST))
def test_bad_manifest_values_are_manifest_errors(engines_master, case):
    m = json.loads((engines_master / "manifest.json").read_text())
    BAD_MANIFEST[case](m)
    with pytest.raises(ManifestError, match="manifest "):
        parse_manifest(m, engines_master)


def _tensorrt_section(m):
    plans = {g: f"{g}.plan" for g, spec in m["graphs"].items() if not spec.get("onnxruntime_only")}
    return {"builder": "tensorrt", "builder_version": "10.0", "precision": m["precision"],
            "version_compatible": False, "hardware_compatibility": "NONE", "embeds_host_code": False,
            "plans": plans, "profile": {g: {"input_ids": {"min": [1, 1], "opt": [1, 1], "max": [8, 8]}}
                                        for g in plans}}


@pytest.mark.parametrize("case", ["hardware_compatibility", "plan missing", "plan unlisted", "plan for no graph"])
def test_bad_tensorrt_sections_are_manifest_errors(engines_master, case):
    m = json.loads((engines_master / "manifest.json").read_text())
    trt = m["tensorrt"] = _tensorrt_section(m)
    for plan in trt["plans"].values():
        m["files"][plan] = {"sha256": "0" * 64, "bytes": 1}
    parse_manifest(json.loads(json.dumps(m)), engines_master)  # the section itself is valid
    if case == "hardware_compatibility":
        trt["hardware_compatibility"] = "ANYTHING"
    elif case == "plan missing":
        del trt["plans"]["draft"]
    elif case == "plan unlisted":
        del m["files"]["draft.plan"]
    else:
        trt["plans"]["ghost"] = "target.plan"
    with pytest.raises(ManifestError, match="tensorrt"):
        parse_manifest(m, engines_master)


@pytest.mark.parametrize("file", ["manifest.json", "catalogue.json"])
def test_deeply_nested_json_is_a_manifest_error(engines, file):
    (engines / file).write_text("[" * 100000)
    if file == "catalogue.json":
        _resign(engines)
    with pytest.raises(ManifestError, match="nested too deeply"):
        Recommender(engines)


def test_kv_head_dim_against_the_graph_at_load(engines):
    _edit_manifest(engines, lambda m: _graph("target")(m)["kv"].update(head_dim=4096))
    with pytest.raises(ManifestError, match="target.onnx past.0.key: dimension 3 is 16, manifest says 4096"):
        Recommender(engines)


# -- catalogue ------------------------------------------------------------------------------------------------------

def _edit_catalogue(engines, edit):
    c = json.loads((engines / "catalogue.json").read_text())
    edit(c)
    (engines / "catalogue.json").write_text(json.dumps(c))
    _resign(engines)


BAD_CATALOGUE = {
    "titles short": lambda c: c.update(titles=["a"] * (len(c["item_ids"]) - 1)),
    "titles string": lambda c: c.update(titles="abc"),
    "titles dict": lambda c: c.update(titles={"1000": "a"}),
    "titles of numbers": lambda c: c.update(titles=list(range(len(c["item_ids"])))),
    "id 1e30": lambda c: c["item_ids"].__setitem__(0, 1e30),
    "id 10**30": lambda c: c["item_ids"].__setitem__(0, 10**30),
    "id float": lambda c: c["item_ids"].__setitem__(0, 1000.0),
    "id string": lambda c: c["item_ids"].__setitem__(0, "1000"),
    "id true": lambda c: c["item_ids"].__setitem__(0, True),
    "id negative": lambda c: c["item_ids"].__setitem__(0, -1),
    "code float": lambda c: c["sids"][0].__setitem__(0, 1.0),
    "code true": lambda c: c["sids"][0].__setitem__(0, True),
    "unknown key": lambda c: c.update(extra=1),
    "not an object": lambda c: c.clear() or c.update(item_ids=5),
    "row short": lambda c: c["sids"][3].pop(),
    "row a number": lambda c: c["sids"].__setitem__(3, 7),
}


@pytest.mark.parametrize("case", list(BAD_CATALOGUE))
def test_bad_catalogues_are_refused_at_load(engines, case):
    _edit_catalogue(engines, BAD_CATALOGUE[case])
    with pytest.raises(ManifestError, match=r"catalogue.sids\[3\] .* expected a list of" if case.startswith("row")
                       else "catalogue"):
        Recommender(engines)


@pytest.mark.parametrize("change", ["item removed", "item added", "codes swapped"])
def test_a_catalogue_that_disagrees_with_the_chain_graph_is_refused_at_load(engines, change):
    def edit(c):
        if change == "item removed":
            c["item_ids"].pop()
            c["sids"].pop()
            c.pop("titles", None)
        elif change == "item added":
            used = {tuple(s) for s in c["sids"]}
            free = next([a, b, d] for a in range(8) for b in range(8) for d in range(8) if (a, b, d) not in used)
            c["item_ids"].append(max(c["item_ids"]) + 1)
            c["sids"].append(free)
            c.pop("titles", None)
        else:
            c["sids"][0], c["sids"][1] = c["sids"][1], c["sids"][0]
    _edit_catalogue(engines, edit)
    with pytest.raises(ManifestError, match="catalogue.json: trie .* graphs.draft_chain"):
        Recommender(engines)


def test_exporter_arrays_pass_the_catalogue_schema(tiny):
    cat = tiny[0]
    again = Catalogue(cat.layout, cat.item_ids, cat.sids, ["t"] * len(cat))
    assert again.item_ids.tolist() == cat.item_ids.tolist() and again.titles == ["t"] * len(cat)


# -- NaN in the chain graph -----------------------------------------------------------------------------------------

def test_nan_in_the_chain_graph_is_reported(engines):
    model = onnx.load(engines / "draft_chain.onnx")
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim == 2 and w.size > 1000:
            init.CopyFrom(numpy_helper.from_array(np.full_like(w, np.nan), init.name))
    onnx.save(model, engines / "draft_chain.onnx")
    _resign(engines)
    rec = Recommender(engines)
    assert len(_lists(rec, HIST, "tree")) == 2  # the step draft graph is intact
    with pytest.raises(BackendError, match="draft_chain: non-finite logits"):
        _lists(rec, HIST, "chain")


# -- confinement ----------------------------------------------------------------------------------------------------

def test_a_symlink_out_of_the_engine_directory_is_refused_without_revealing_the_file(engines, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(engines / "draft.onnx", outside)
    (engines / "draft.onnx").unlink()
    os.symlink(outside, engines / "draft.onnx")
    _resign(engines)
    with pytest.raises(IntegrityError, match="draft.onnx: outside the engine directory") as err:
        Recommender(engines)
    assert str(outside.stat().st_size) not in str(err.value)
    m = load_manifest(engines, allow_outside=True)  # the caller's opt-in
    assert OrtBackend(m, "draft").graph_name == "draft"


def test_a_manifest_naming_a_file_outside_cannot_learn_its_size(engines, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x" * 12345)
    clean = (engines / "manifest.json").read_text()
    for name in ("../secret.bin", str(secret)):
        def edit(m, name=name):
            m["files"][name] = {"sha256": "0" * 64, "bytes": 1}
            m["graphs"]["draft"]["file"] = name
        _edit_manifest(engines, edit)
        with pytest.raises(ManifestError, match="graphs.draft.file") as err:
            Recommender(engines)
        assert "12345" not in str(err.value)
        (engines / "manifest.json").write_text(clean)


@pytest.mark.parametrize("file", ["catalogue.json", "draft.onnx"])
def test_a_named_pipe_in_place_of_an_engine_file_is_refused_without_blocking(engines, file):
    (engines / file).unlink()
    os.mkfifo(engines / file)  # opening it for reading would wait for a writer forever
    with pytest.raises(IntegrityError, match=f"{file}: not a regular file"):
        Recommender(engines)


def test_a_symlink_loop_is_an_integrity_error(engines):
    (engines / "draft.onnx").unlink()
    os.symlink("draft.onnx", engines / "draft.onnx")
    with pytest.raises(IntegrityError, match="draft.onnx: cannot be resolved"):
        Recommender(engines)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every directory")
def test_an_unreadable_engine_directory_is_a_manifest_error(tmp_path):
    locked = tmp_path / "locked"
    (locked / "engines").mkdir(parents=True)
    locked.chmod(0)
    try:
        with pytest.raises(ManifestError, match="not readable by this user"):
            Recommender(locked / "engines")
    finally:
        locked.chmod(0o755)


def test_a_key_twice_in_the_manifest_is_a_manifest_error(engines):
    text = (engines / "manifest.json").read_text()
    assert text.lstrip().startswith("{")
    (engines / "manifest.json").write_text('{"format": "nope", ' + text.lstrip()[1:])  # the later key would win
    with pytest.raises(ManifestError, match="key 'format' appears more than once"):
        Recommender(engines)
