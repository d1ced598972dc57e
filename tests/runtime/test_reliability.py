"""Reliability: corruption matrix, NaN logits, out-of-memory, threads, fuzzed manifests and requests, no pickle."""
import json
import pickle
import shutil
import threading

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from padrec_export.onnx_export import export_engines
from padrec_export.tiny import TinySpec, tiny_setup
from padrec_runtime.errors import BackendError, InputError, ManifestError, PadrecError
from padrec_runtime.manifest import load_manifest, parse_manifest, write_manifest
from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
from tests.conftest import LIMITS

HIST = [[1000, 1001, 1002], [1010]]


@pytest.fixture(scope="module")
def clean_lists(engines_master):
    return [r.tokens for r in Recommender(engines_master).recommend(HIST, params=DecodeParams(speculate="tree")).lists]


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def _flip(offset_frac):
    def f(p):
        data = bytearray(p.read_bytes())
        i = int(len(data) * offset_frac)
        data[i] ^= 0x5A
        p.write_bytes(bytes(data))
    return f


def _delete(p):
    p.unlink()


def _symlink_out(p):
    """The file replaced by a symlink to an identical copy outside the engine directory."""
    outside = p.parent.parent / f"outside-{p.name}"
    shutil.copy(p, outside)
    p.unlink()
    p.symlink_to(outside)


def _directory(p):
    p.unlink()
    p.mkdir()


FILES = ["target.onnx", "draft.onnx", "draft_chain.onnx", "target_gqa.onnx", "draft_chain_gqa.onnx",
         "catalogue.json", "manifest.json"]
EXTERNAL_FILES = ["target.onnx.data", "draft.onnx.data", "draft_chain.onnx.data", "target_gqa.onnx.data"]
DAMAGE = {"truncated": _truncate, "flip-early": _flip(0.05), "flip-middle": _flip(0.5), "flip-late": _flip(0.97),
          "missing": _delete, "symlink-out": _symlink_out, "directory": _directory}


def _check_damaged(engines, file, clean_lists, options=None):
    try:
        rec = Recommender(engines, options=options)
    except PadrecError as exc:
        assert file in str(exc) or "manifest" in str(exc), str(exc)
        return
    # only a manifest edit that keeps it valid, or a symlink into the directory, can get here: no list changes
    assert file == "manifest.json"
    assert [r.tokens for r in rec.recommend(HIST, params=DecodeParams(speculate="tree")).lists] == clean_lists


@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_corruption_matrix(engines, clean_lists, file, damage):
    DAMAGE[damage](engines / file)
    # the in-place graphs are opened only with the device cache: open them so that their damage is seen
    _check_damaged(engines, file, clean_lists, RuntimeOptions(device_cache=True) if "gqa" in file else None)


@pytest.mark.parametrize("file", EXTERNAL_FILES)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_corruption_matrix_external_data(engines_external_master, tmp_path, clean_lists, file, damage):
    engines = tmp_path / "tiny"
    shutil.copytree(engines_external_master, engines)
    DAMAGE[damage](engines / file)
    _check_damaged(engines, file, clean_lists, RuntimeOptions(device_cache=True) if "gqa" in file else None)


def test_wrong_version_and_mismatched_draft(engines, tmp_path):
    other_cat, other_target, other_draft = tiny_setup(TinySpec(seed=9, levels=3, codebook=8, hidden=32, heads=2,
                                                               kv_heads=1))
    export_engines(other_target, other_draft, other_cat, tmp_path / "other", "fp32", LIMITS, progress=False)
    shutil.copy(tmp_path / "other" / "draft.onnx", engines / "draft.onnx")
    write_manifest(engines, load_manifest(engines, verify=False).data)  # signed, but the draft is another model's
    with pytest.raises(ManifestError, match="draft.onnx .*dimension"):
        Recommender(engines)
    m = json.loads((engines / "manifest.json").read_text())
    d = m["graphs"]["draft"]
    d["hidden_size"] = d["inputs"]["hidden_in"]["shape"][-1] = d["outputs"]["hidden"]["shape"][-1] = 32
    (engines / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="graphs.draft.hidden_size"):
        Recommender(engines)


def test_nan_logits_are_reported_not_decoded(engines):
    model = onnx.load(engines / "target.onnx")
    init = next(i for i in model.graph.initializer if len(i.dims) == 2)
    w = numpy_helper.to_array(init).copy()
    w[:] = np.nan
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, engines / "target.onnx")
    write_manifest(engines, load_manifest(engines, verify=False).data)
    rec = Recommender(engines)
    for mode in ("off", "chain"):
        with pytest.raises(BackendError, match="non-finite logits"):
            rec.recommend(HIST, params=DecodeParams(speculate=mode))


def test_out_of_memory_is_a_clear_error_and_the_recommender_survives(engines_master, monkeypatch):
    import padrec_runtime.cache.host as kvcache
    rec = Recommender(engines_master)
    real_zeros = np.zeros
    calls = {"n": 0}

    def failing_zeros(shape, dtype=float):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError
        return real_zeros(shape, dtype)

    monkeypatch.setattr(kvcache.np, "zeros", failing_zeros)
    with pytest.raises(BackendError, match=r"out of memory allocating \d+ MiB"):
        rec.recommend(HIST)
    monkeypatch.setattr(kvcache.np, "zeros", real_zeros)
    assert len(rec.recommend(HIST).lists) == 2


def test_threads_give_the_single_thread_lists(tiny, engines_master):
    rec = Recommender(engines_master)
    rng = np.random.default_rng(0)
    ids = tiny[0].item_ids
    requests = [rng.choice(ids, size=int(rng.integers(1, 6)), replace=False).tolist() for _ in range(500)]
    expected = [rec.recommend([h], n_items=2, params=DecodeParams(speculate="chain")).lists[0].tokens for h in requests]
    results, errors = {}, []

    def worker(k):
        try:
            order = np.random.default_rng(k).permutation(len(requests))
            results[k] = {int(i): rec.recommend([requests[i]], n_items=2, params=DecodeParams(speculate="chain")).lists[0].tokens
                          for i in order}
        except Exception as exc:  # any failure in a thread must surface in the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in range(8):
        assert [results[k][i] for i in range(len(requests))] == expected


def test_windowed_prefills_of_several_streams_at_once_give_the_single_thread_lists(tiny, engines_master):
    """Caller-owned streams of batch 3, 5 and 7 stepped from eight threads at once, each prefill in windows of two
    rows that every cache's windows bind to one shared set of buffers: the lists equal one thread's. (The windowed
    prefill holds the device lock from its first window to its last; without that another stream's window
    overwrites the set between a window's run and its read.)"""
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True, in_place=False,
                                                             prefill_rows=2))
    rng = np.random.default_rng(3)
    ids = tiny[0].item_ids
    requests = [[rng.choice(ids, size=int(rng.integers(1, 8)), replace=False).tolist() for _ in range(b)]
                for b in (3, 5, 7, 3, 5, 7, 5, 7)]
    params = DecodeParams(speculate="chain")
    expected = [[r.tokens for r in rec.recommend(h, n_items=3, params=params).lists] for h in requests]
    results, errors = {}, []

    def worker(k):
        try:
            for _ in range(3):
                stream = rec.start(requests[k], n_items=3, params=params)
                while not stream.done:
                    stream.step()
                results.setdefault(k, []).append([r.tokens for r in stream.result().lists])
        except Exception as exc:  # any failure in a thread must surface in the test
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(results[k] == [expected[k]] * 3 for k in range(len(requests)))


def _json_values():
    return st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.integers() | st.floats(allow_nan=True) |
                        st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                                               c, max_size=3),
                        max_leaves=6)


def _paths(d, prefix=()):
    """Every key and list position of a JSON value, as key paths."""
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


MISSING, EXTRA = object(), object()


def _mutated(base: dict, path: tuple, value):
    """A copy of base with the value at path replaced, removed (MISSING), or given an unknown key (EXTRA)."""
    out = json.loads(json.dumps(base))
    node = out
    for k in path[:-1]:
        node = node[k]
    key = path[-1]
    if value is MISSING:
        del node[key]
    elif value is EXTRA:
        if not isinstance(node[key], dict):
            return None
        node[key]["unexpected"] = 1
    else:
        node[key] = value
    return out


# one of each wrong kind: type, range, special floats, empty containers, huge values
BAD_VALUES = [None, True, -5, 0, 10**12, 1e30, float("nan"), float("inf"), "x", "", "../x", [], {}, [1], MISSING, EXTRA]


class _Loads:
    """Checks that a manifest the parser accepted loads and gives the clean lists (or a named PadrecError)."""

    def __init__(self, engines_master, tmp_path, clean):
        self.dir, self.clean = tmp_path / "accepted", clean
        shutil.copytree(engines_master, self.dir)

    def __call__(self, data: dict) -> None:
        (self.dir / "manifest.json").write_text(json.dumps(data))
        try:
            got = [r.tokens for r in Recommender(self.dir).recommend(HIST, params=DecodeParams(speculate="tree")).lists]
        except PadrecError:
            return
        assert got == self.clean


def test_every_manifest_value_is_refused_or_loads_correctly(engines_master, tmp_path, clean_lists):
    """Every key and list position of the manifest, set to each wrong kind of value, removed, or given an unknown
    key: a ManifestError naming it, or (a harmless change, e.g. a producer string) the same lists."""
    base = json.loads((engines_master / "manifest.json").read_text())
    loads, accepted = _Loads(engines_master, tmp_path, clean_lists), {}
    for path in _paths(base):
        for value in BAD_VALUES:
            data = _mutated(base, path, value)
            if data is None or data == base:
                continue
            try:
                parse_manifest(data, engines_master)
            except ManifestError as exc:
                assert "manifest" in str(exc)
                continue
            accepted.setdefault(path[:3], data)
    for data in accepted.values():
        loads(data)
    # what gets through: producer strings, zero tolerances, a wrong file size (refused when the file is read),
    # an optional graph left out
    assert len(accepted) < 20, sorted(accepted, key=str)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifests_raise_manifest_error_or_parse(engines_master, data):
    base = json.loads((engines_master / "manifest.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(base))
        path = data.draw(st.sampled_from(paths))
        value = data.draw(_json_values() | st.sampled_from([MISSING, EXTRA]))
        base = _mutated(base, path, value) or base
    try:
        parse_manifest(base, engines_master)
    except ManifestError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_catalogues_raise_manifest_error_or_load_unchanged(tiny, engines_master, data):
    """Any value anywhere in catalogue.json: a ManifestError, or a catalogue holding exactly the JSON's integers
    (nothing coerced: no float, string or boolean becomes an id or a code)."""
    from padrec_runtime.grammar import Catalogue
    base = json.loads((engines_master / "catalogue.json").read_text())
    for _ in range(data.draw(st.integers(1, 2))):
        path = data.draw(st.sampled_from([p for p in _paths(base) if len(p) <= 3]))
        value = data.draw(_json_values() | st.sampled_from([MISSING, EXTRA]))
        base = _mutated(base, path, value) or base
    try:
        cat = Catalogue.from_json(base, tiny[0].layout)
    except ManifestError as exc:
        assert "catalogue" in str(exc)
        return
    assert cat.item_ids.tolist() == base["item_ids"] and cat.sids.tolist() == base["sids"]
    assert all(type(v) is int for v in base["item_ids"]) and all(type(c) is int for r in base["sids"] for c in r)
    assert cat.titles == base.get("titles")


@pytest.fixture(scope="module")
def fuzz_rec(engines_master):
    return Recommender(engines_master)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(histories=st.one_of(st.lists(st.lists(st.one_of(st.integers(995, 1065), st.integers(), st.text(max_size=2),
                                                        st.booleans(), st.none()), max_size=14), max_size=10),
                           st.integers(), st.text(max_size=3), st.none()),
       n_items=st.one_of(st.none(), st.integers(-2, 10), st.floats(0, 3), st.text(max_size=1)),
       speculate=st.sampled_from(["off", "chain", "tree", "x", ""]),
       draft_steps=st.one_of(st.none(), st.integers(-1, 20)))
def test_fuzzed_requests_raise_input_error_or_give_valid_lists(fuzz_rec, histories, n_items, speculate, draft_steps):
    try:
        res = fuzz_rec.recommend(histories, n_items=n_items, params=DecodeParams(speculate=speculate, draft_steps=draft_steps))
    except InputError:
        return
    n = n_items or 5
    for h, r in zip(histories, res.lists):
        assert len(r.item_ids) == n and len(set(r.item_ids)) == n and not set(r.item_ids) & set(h)


def test_no_pickle_on_the_load_path(tiny, engines_master, tmp_path, monkeypatch):
    from padrec_export.checkpoint import load_draft, load_target, save_draft, save_target
    cat, target, draft = tiny
    save_target(target, tmp_path / "t")
    save_draft(draft, tmp_path / "d")

    def refuse(*a, **k):
        raise AssertionError("pickle used on the load path")

    class RefusingUnpickler(pickle.Unpickler):  # a class, so that modules imported lazily can still subclass it
        __init__ = refuse

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    load_draft(tmp_path / "d", load_target(tmp_path / "t"))
    Recommender(engines_master).recommend(HIST)
