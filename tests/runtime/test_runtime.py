"""The torch-free runtime: golden parity, lossless speculation, batching, errors, CLI, TensorRT backend."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from padrec_export.golden import write_golden
from padrec_runtime.errors import BackendError, InputError, IntegrityError, ManifestError, PadrecError
from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
from padrec_runtime.loop.propose import DeviceChain
from padrec_runtime.trace import CallCounter

HERE = Path(__file__).parent


def _histories(cat, seed, batch):
    rng = np.random.default_rng(seed)
    lens = [1, 4, 7, 11][:batch] if batch > 1 else [int(rng.integers(1, 12))]
    return [rng.choice(cat.item_ids, size=n, replace=False).tolist() for n in lens]


def test_golden_parity_without_torch(tiny, engines_master, tmp_path):
    cat, target, draft = tiny
    cases = []
    for batch in (1, 4):
        for mode in ("off", "chain", "tree"):
            cases.append({"histories": _histories(cat, batch, batch), "n_items": 5, "speculate": mode,
                          "draft_steps": 3, "tree_topk": 3, "tree_size": 8})
    write_golden(tmp_path / "golden.json", target, draft, cat, cases)
    out = subprocess.run([sys.executable, str(HERE / "golden_check.py"), str(engines_master),
                          str(tmp_path / "golden.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "golden: all equal" in out.stdout


def test_import_blocks_nothing_it_needs():
    code = ("import sys, importlib.abc\n"
            "class B(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, n, p=None, t=None):\n"
            "        if n == 'torch' or n.startswith('torch.'): raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, B())\n"
            "import padrec_runtime, padrec_runtime.api.recommender, padrec_runtime.api.cli\n"
            "import padrec_runtime.backends.onnxruntime, padrec_runtime.backends.tensorrt\n"
            "assert 'torch' not in sys.modules and 'padrec_export' not in sys.modules\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.fixture(scope="module")
def rec(engines_master):
    return Recommender(engines_master)


def test_speculation_equals_ar_on_many_histories(tiny, rec):
    cat = tiny[0]
    rng = np.random.default_rng(11)
    hist = [rng.choice(cat.item_ids, size=int(rng.integers(1, 12)), replace=False).tolist() for _ in range(24)]
    ar = [r.tokens for part in (hist[:8], hist[8:16], hist[16:]) for r in rec.recommend(part, params=DecodeParams(speculate="off")).lists]
    for mode in ("chain", "tree"):
        for k in (1, 2, 3, 4):  # 3: greedy chain rounds run the fused draft-chain graph
            sd = [r.tokens for part in (hist[:8], hist[8:16], hist[16:])
                  for r in rec.recommend(part, params=DecodeParams(speculate=mode, draft_steps=k)).lists]
            assert sd == ar, (mode, k)


def test_batch_equals_rows_alone(tiny, rec):
    hist = _histories(tiny[0], 3, 4)
    for mode in ("off", "chain", "tree"):
        batch = rec.recommend(hist, params=DecodeParams(speculate=mode))
        for b, h in enumerate(hist):
            assert rec.recommend([h], params=DecodeParams(speculate=mode)).lists[0].tokens == batch.lists[b].tokens


def test_results_carry_items_sids_titles(tiny, rec):
    cat = tiny[0]
    r = rec.recommend([[1000, 1001]], n_items=4, params=DecodeParams(speculate="tree")).lists[0]
    assert len(r.item_ids) == 4 and len(set(r.item_ids)) == 4 and not {1000, 1001} & set(r.item_ids)
    idx = cat.index_of(r.item_ids)
    assert r.sids == cat.sids[idx].tolist() and r.titles == [cat.titles[i] for i in idx]


def test_step_api_streams_the_same_list(rec):
    session = rec.start([[1003, 1004]], params=DecodeParams(speculate="chain"))
    pieces, items_seen = [], []
    while not session.done:
        pieces += session.step()[0]
        so_far = session.partial()[0]  # the complete items so far, with titles when the catalogue has them
        items_seen.append(so_far.item_ids)
    full = rec.recommend([[1003, 1004]], params=DecodeParams(speculate="chain")).lists[0].tokens
    assert session.result().lists[0].tokens == full and pieces == full[1:]
    final = session.result().lists[0].item_ids
    assert all(seen == final[:len(seen)] for seen in items_seen) and items_seen[-1] == final
    assert [len(seen) for seen in items_seen] == sorted(len(seen) for seen in items_seen) and len(items_seen[0]) < 5


@pytest.mark.parametrize("histories,options,pattern", [
    ([[1000, 99999]], {}, r"histories\[0\]: unknown item ids \[99999\]"),
    ([[1000], [1000, 99999]], {}, r"histories\[1\]: unknown item ids \[99999\]"),
    ([[]], {}, "empty"),
    ([list(range(1000, 1013))], {}, "at most 12"),
    ([[1000, 1000]], {}, "repeat"),
    ([[1000]], {"n_items": 0}, "n_items"),
    ([[1000]], {"n_items": 9}, "n_items"),
    ([[1000]] * 9, {}, "batch of 9"),
    ([], {}, "non-empty"),
    ([["a"]], {}, "integer item ids"),
    ([[1000]], {"speculate": "wide"}, "speculate"),
    ([[1000]], {"draft_steps": 40}, "draft_steps"),
    ([[1000]], {"greedy": False, "temperature": 0.0}, "temperature"),
])
def test_bad_requests_raise_input_error(rec, histories, options, pattern):
    options = dict(options)
    with pytest.raises(InputError, match=pattern):
        rec.recommend(histories, n_items=options.pop("n_items", None), params=options)


def test_bad_engine_directories(engines, tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        Recommender(tmp_path / "nowhere")
    (engines / "draft.onnx").unlink()
    with pytest.raises(IntegrityError, match="draft.onnx: missing"):
        Recommender(engines)
    m = json.loads((engines / "manifest.json").read_text())
    m["schema_version"] = 2
    (engines / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="schema_version: got 2 .* reads versions 3"):
        Recommender(engines)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "padrec_export.cli", *args], capture_output=True, text=True)


def test_cli_recommend_and_errors(engines_master, engines):
    ok = _cli("recommend", "--engines", str(engines_master), "--history", "1000,1001,1002", "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert len(data["lists"][0]["item_ids"]) == 5 and data["tau"] >= 1
    static = _cli("recommend", "--engines", str(engines_master), "--history", "1000,1001,1002", "--json",
                  "--static-shapes")
    assert static.returncode == 0, static.stderr
    assert json.loads(static.stdout)["lists"] == data["lists"]
    for flags in (["--device-rounds"], ["--host-rounds"], ["--in-place"], ["--standard-graphs"]):
        rounds = _cli("recommend", "--engines", str(engines_master), "--history", "1000,1001,1002", "--json",
                      "--static-shapes", *flags)
        assert rounds.returncode == 0, rounds.stderr
        assert json.loads(rounds.stdout)["lists"] == data["lists"]
    two = ["--history", "1000,1001,1002", "--history", "1003,1000", "--json"]
    plain = _cli("recommend", "--engines", str(engines_master), *two)
    windows = _cli("recommend", "--engines", str(engines_master), *two, "--device-cache", "--static-shapes",
                   "--graph-sessions", "pair", "--prefill-rows", "1")  # the memory flags: a prefill row by row
    assert plain.returncode == 0 and windows.returncode == 0, windows.stderr
    assert json.loads(windows.stdout)["lists"] == json.loads(plain.stdout)["lists"]
    from padrec_runtime.api.cli import ENGINE
    parsed = ENGINE.parse(dict(engine_dir="e", backend="onnxruntime", device="cpu", threads=1, trt_module=None,
                               allow_host_code=False, device_cache=True, static_shapes=True, in_place=None,
                               cuda_graph_max_tokens=None, graph_sessions="pair", cublas_workspace_mib=None,
                               gemm_tuning=None, prefill_rows=1))
    assert (parsed["options"].graph_sessions, parsed["options"].prefill_rows) == ("pair", 1)
    for args, msg in [(["--history", "1000,77"], "unknown item ids"), (["--history", ""], "empty"),
                      (["--history", "1,x"], "comma-separated"),
                      (["--history", "1000", "--device-rounds"], "device_rounds: needs device caches"),
                      (["--history", "1000", "--cuda-graph-max-tokens", "16"], "cuda_graph_max_tokens: 16 without"),
                      (["--history", "1000", "--cublas-workspace-mib", "4"], "drop it (--cublas-workspace-mib) on "
                                                                             "backend=onnxruntime, device=cpu"),
                      (["--history", "1000", "--gemm-tuning", "off"],
                       "drop it (--gemm-tuning) on backend=onnxruntime")]:
        bad = _cli("recommend", "--engines", str(engines_master), *args)
        assert bad.returncode == 1 and msg in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    (engines / "target.onnx").write_bytes(b"garbage")
    bad = _cli("recommend", "--engines", str(engines), "--history", "1000")
    assert bad.returncode == 1 and "target.onnx" in bad.stderr and "Traceback" not in bad.stderr


def test_tensorrt_backend_as_far_as_this_machine_goes(engines):
    pytest.importorskip("tensorrt_rtx")
    from padrec_export.build import BuildOptions, build_engines
    build_engines(engines, BuildOptions(builder="tensorrt_rtx"), progress=False)
    with pytest.raises(BackendError, match="cannot run on the tensorrt runtime"):
        Recommender(engines, backend="tensorrt", options=RuntimeOptions(trt_module="tensorrt"))
    with pytest.raises(BackendError) as err:  # no trt_module: the plans' builder picks TensorRT for RTX's runtime
        Recommender(engines, backend="tensorrt")
    # no GPU here: the plan is not deserialized; the error names what is missing (cuda-python, else the GPU)
    try:
        import cuda.bindings  # noqa: F401
        assert "no usable CUDA GPU" in str(err.value) and "--backend onnxruntime" in str(err.value)
    except ImportError:
        assert "cuda-python: not installed" in str(err.value)
    with pytest.raises(PadrecError, match="backend"):
        Recommender(engines, backend="tvm")


def test_device_resident_cache_gives_the_same_lists(tiny, engines_master):
    """The IO-binding path (device-resident KV, in-place writes) on CPU buffers equals the default path."""
    plain, bound = Recommender(engines_master), Recommender(engines_master, options=RuntimeOptions(device_cache=True))
    hist = _histories(tiny[0], 5, 4)
    for mode in ("off", "chain", "tree"):
        for greedy in (True, False):
            a = plain.recommend(hist, params=DecodeParams(speculate=mode, greedy=greedy, seed=7))
            b = bound.recommend(hist, params=DecodeParams(speculate=mode, greedy=greedy, seed=7))
            assert [r.tokens for r in a.lists] == [r.tokens for r in b.lists] and a.committed == b.committed
    again = bound.recommend(hist, params=DecodeParams(speculate="tree"))  # reused device caches start clean
    assert [r.tokens for r in again.lists] == [r.tokens for r in plain.recommend(hist, params=DecodeParams(speculate="tree")).lists]


@pytest.mark.parametrize("batch", [7, 6])
def test_prefill_of_many_rows_runs_in_windows_with_the_same_kv_and_lists(tiny, engines_master, batch):
    """A prefill of more than `prefill_rows` rows (3 here: these engines take at most 8) runs that many at a time over
    windows of the cache (7: the last window overlaps the one before): the KV cache it leaves and its outputs equal
    one call over every row, and so do the lists, speculative and AR, greedy and sampled. The windows share one set
    of bound buffers."""
    rng = np.random.default_rng(batch)
    hist = [rng.choice(tiny[0].item_ids, size=int(rng.integers(1, 12)), replace=False).tolist() for _ in range(batch)]
    opts = dict(device_cache=True, static_shapes=True, in_place=False)
    windowed = Recommender(engines_master, options=RuntimeOptions(prefill_rows=3, **opts))
    whole = Recommender(engines_master, options=RuntimeOptions(prefill_rows=batch, **opts))

    def prefill(rec):
        cache = rec.caches.shared("target", batch)
        prompts = [rec.catalogue.prompt(h) for h in hist]
        from padrec_runtime.loop.feeds import prefill_feeds
        feeds, mask = prefill_feeds(prompts)
        call = cache.launch(feeds, mask)
        return cache, call.result(), call
    cache, out, call = prefill(windowed)
    starts = sorted(cache._windows)
    windows = [cache._windows[r0] for r0 in starts]
    assert starts == {7: [0, 3, 4], 6: [0, 3]}[batch] and all(np.shares_memory(w.cache, cache.cache) for w in windows)
    assert [w._releases for w in windows] == [False] * (len(windows) - 1) + [True]  # the arena goes back once
    assert np.array_equal(call.device("hidden"), out["hidden"]) and call.device("hidden") is call.device("hidden")
    with pytest.raises(BackendError, match="a call of 2 rows"):  # rows that do not match the cache's
        from padrec_runtime.loop.feeds import prefill_feeds
        short, short_mask = prefill_feeds([windowed.catalogue.prompt(h) for h in hist[:2]])
        windowed.caches.lease("target", batch).launch(short, short_mask)
    # one set of bound buffers, whatever the number of windows
    keys = set.intersection(*(set(w._buckets) for w in windows))
    assert keys and all(len({id(w._buckets[k].bound.outs) for w in windows}) == 1 for k in keys)
    ref_cache, ref, _ = prefill(whole)
    assert not ref_cache._windows and cache.scratch == ref_cache.scratch
    np.testing.assert_array_equal(cache.cache, ref_cache.cache)
    for name in ref:
        np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-5)
    for mode in ("off", "chain", "tree"):
        for greedy in (True, False):
            params = DecodeParams(speculate=mode, greedy=greedy, seed=3)
            a, b = windowed.recommend(hist, params=params), whole.recommend(hist, params=params)
            assert [r.tokens for r in a.lists] == [r.tokens for r in b.lists], (mode, greedy)


def test_interleaved_caller_sessions_on_device_caches(tiny, engines_master):
    """Two caller-owned sessions stepped alternately on the static path (each with its own caches and, on
    CUDA, its own graphs) give what `recommend` gives; finished sessions' caches are pooled and reused."""
    import gc
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    h1, h2 = _histories(tiny[0], 21, 1), _histories(tiny[0], 22, 1)
    want = [rec.recommend(h, params=DecodeParams(speculate="chain")).lists[0].tokens for h in (h1, h2)]
    for opts in (dict(device_rounds=True), {}):  # device rounds: a queued chain waits across the other's steps
        a, b = rec.start(h1, params=DecodeParams(speculate="chain", **opts)), rec.start(h2, params=DecodeParams(speculate="chain", **opts))
        assert a.session.target is not b.session.target and a.session.target.cache_id != b.session.target.cache_id
        while not (a.done and b.done):
            for s in (a, b):
                if not s.done:
                    s.step()
        assert [a.result().lists[0].tokens, b.result().lists[0].tokens] == want
        assert isinstance(a.session.proposer, DeviceChain) == bool(opts)
        if opts:
            del a, b, s
            gc.collect()
    ids = {a.session.target.cache_id, b.session.target.cache_id}
    del a, b, s
    gc.collect()
    assert rec.caches.pooled("target", 1) == 2
    c = rec.start(h1, params=DecodeParams(speculate="chain"))
    assert c.session.target.cache_id in ids  # a pooled cache, not a new one
    while not c.done:
        c.step()
    assert c.result().lists[0].tokens == want[0]


@pytest.mark.parametrize("mode", ["chain", "tree", "off"])
def test_a_stream_whose_round_failed_refuses_more_rounds_and_its_caches_serve_again(tiny, engines_master, mode):
    """A round that fails half-way (here: the target's verify pass) leaves a stream's caches half-updated: the
    error reaches the caller, later steps raise InputError naming the failure, and the caches, once pooled, give
    a new stream the lists `recommend` gives."""
    import gc
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    hist = _histories(tiny[0], 41, 1)
    want = rec.recommend(hist, params=DecodeParams(speculate=mode)).lists[0].tokens
    s = rec.start(hist, params=DecodeParams(speculate=mode))
    s.step()
    s.session._verify = lambda proposal: (_ for _ in ()).throw(BackendError("target: injected failure"))
    with pytest.raises(BackendError, match="injected"):
        s.step()
    with pytest.raises(InputError, match="a round failed earlier .*injected.* start a new request"):
        s.step()
    del s
    gc.collect()
    again = rec.start(hist, params=DecodeParams(speculate=mode))
    while not again.done:
        again.step()
    assert again.result().lists[0].tokens == want


def test_caller_sessions_from_threads_on_device_caches(tiny, engines_master):
    """Caller-owned sessions stepped from several threads at once (device work serialised per Recommender)
    give the lists one thread gets."""
    from concurrent.futures import ThreadPoolExecutor
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    hists = [_histories(tiny[0], 30 + i, 1) for i in range(6)]
    want = [rec.recommend(h, params=DecodeParams(speculate=mode)).lists[0].tokens for h, mode in zip(hists, ["chain", "tree"] * 3)]

    def run(i):
        s = rec.start(hists[i], params=DecodeParams(speculate=["chain", "tree"][i % 2]))
        while not s.done:
            s.step()
        return s.result().lists[0].tokens
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(run, range(6))) == want


def test_static_shape_options_are_checked(engines_master):
    with pytest.raises(PadrecError, match="static_shapes: needs device_cache"):
        Recommender(engines_master, options=RuntimeOptions(static_shapes=True))
    with pytest.raises(PadrecError, match="cuda_graphs: needs device='cuda'"):
        Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True, cuda_graphs=True))
    with pytest.raises(PadrecError, match="cuda_graph_max_tokens: 16 without CUDA graphs"):
        Recommender(engines_master, options=RuntimeOptions(device_cache=True, cuda_graph_max_tokens=16))
    with pytest.raises(InputError, match="cuda_graph_max_tokens"):
        RuntimeOptions(cuda_graph_max_tokens=0)
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True))  # CPU: static shapes stay off unless asked for
    assert not rec.settings.static_shapes and not rec.settings.cuda_graphs


@pytest.mark.parametrize("batch,buckets", [(1, None), (4, None), (4, (1, 2, 4, 8))])
def test_static_shape_buckets_give_the_same_lists(tiny, engines_master, batch, buckets, monkeypatch):
    """Decode calls padded to fixed buckets, each on its own fixed-shape session (the CUDA-graph layout),
    give the default path's lists and acceptance; padding never reaches the cache. With small buckets the
    prefill and tree verify take the dynamic session, as a long prefill does with the default buckets."""
    from padrec_runtime.cache import buckets as bucket_table
    if buckets:
        monkeypatch.setattr(bucket_table, "BUCKETS", buckets)
    plain = Recommender(engines_master)
    # the standard target's sessions (the fused target has its own test below)
    counter = CallCounter()
    static = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True, in_place=False),
                         tracer=counter)
    assert all(b._session is None for b in static.backends.values())  # checked at load, then let go
    hist = _histories(tiny[0], 11, batch)
    for mode in ("off", "chain", "tree"):
        for greedy in (True, False):
            a = plain.recommend(hist, params=DecodeParams(speculate=mode, greedy=greedy, seed=3))
            b = static.recommend(hist, params=DecodeParams(speculate=mode, greedy=greedy, seed=3))
            assert [r.tokens for r in a.lists] == [r.tokens for r in b.lists] and a.committed == b.committed
    target = {bucket: n for (cache, _, bucket), n in counter.calls.items() if cache == "target"}
    assert set(target) - {None} <= set(bucket_table.BUCKETS)
    assert (target.get(None, 0) > 0) == bool(buckets)  # None: the dynamic session
    assert (static.backends["target"]._session is not None) == bool(buckets)  # made again only when a call needs it
    sessions = static.backends["target"]._static
    assert len(sessions) >= 2  # AR (1 token) and verify buckets
    for key, sess in sessions.items():  # every dimension fixed: batch, seq, past, past + seq
        dims = dict(key)
        shape = {i.name: i.shape for i in sess.get_inputs()}["attention_mask"]
        assert shape == [dims["batch"], dims["seq"], dims["past_plus_seq"]]


def test_per_graph_sessions_run_ungraphed_buckets_on_per_shape_sessions(tiny, engines_master):
    """graph_sessions="per_graph" holds CUDA-graph sessions only: bucket calls without a graph (all of them on a
    CPU) run on the per-shape sessions per_shape opens, with the same lists, and no graph session is made."""
    per_shape = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    per_graph = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True,
                                                                   graph_sessions="per_graph"))
    assert per_graph.settings.graph_sessions == "per_graph" and per_shape.settings.graph_sessions == "per_shape"
    for batch in (1, 3):
        hist = _histories(tiny[0], 17, batch)
        for mode in ("off", "chain", "tree"):
            a = per_shape.recommend(hist, params=DecodeParams(speculate=mode))
            b = per_graph.recommend(hist, params=DecodeParams(speculate=mode))
            assert [r.tokens for r in a.lists] == [r.tokens for r in b.lists] and a.committed == b.committed
    opened = {r: {(g, k) for g, b in rec.backends.items() for k in b._static} for r, rec in
              (("shape", per_shape), ("graph", per_graph))}
    assert opened["shape"] and opened["graph"] == opened["shape"]
    assert all(b._graph_session is None for b in per_graph.backends.values())  # no graphs on a CPU
    with pytest.raises(InputError, match="graph_sessions"):
        RuntimeOptions(graph_sessions="per_batch")


def test_pair_sessions_run_ungraphed_buckets_on_the_dynamic_session(tiny, engines_master, monkeypatch):
    """graph_sessions="pair": bucket calls without a graph (prefill) run on the graph's one dynamic-shape session as
    "plain" runs (the shared arena, its hand-back), the graphed ones on static sessions as per_graph's, with
    per_shape's lists; per_graph opens a static session per prefill shape instead; without CUDA graphs pair is
    per_graph. (A CPU has no graphs: buckets of at most 2 tokens a row are forced to want one.)"""
    from padrec_runtime.backends.onnxruntime import OrtBackend
    monkeypatch.setattr(OrtBackend, "wants_graph", lambda self, dims: dims.get("seq", 1) <= 2)
    real, given = OrtBackend.bucket_session, []  # (graph_sessions, graphs, seq, on the dynamic session, how)

    def recording(self, dims):
        session, how = real(self, dims)
        given.append((self.graph_sessions, self.cuda_graphs, dims["seq"], session is self._session, how))
        return session, how
    monkeypatch.setattr(OrtBackend, "bucket_session", recording)
    opts = dict(device_cache=True, static_shapes=True)
    recs = {k: Recommender(engines_master, options=RuntimeOptions(**opts, graph_sessions=k))
            for k in ("per_shape", "per_graph", "pair")}
    recs["pair_no_graphs"] = Recommender(engines_master, options=RuntimeOptions(**opts, graph_sessions="pair"))
    assert recs["pair"].settings.graph_sessions == "pair"
    assert all(b._session is None for b in recs["pair"].backends.values())  # checked at load, then let go
    for b in recs["pair"].backends.values():
        b.cuda_graphs = True  # as on CUDA (a CPU run has none): what pair's branch asks
    for batch in (1, 3):
        hist = _histories(tiny[0], 19, batch)
        for mode in ("off", "chain", "tree"):
            want = recs["per_shape"].recommend(hist, params=DecodeParams(speculate=mode))
            for k in ("per_graph", "pair", "pair_no_graphs"):
                got = recs[k].recommend(hist, params=DecodeParams(speculate=mode))
                assert [r.tokens for r in got.lists] == [r.tokens for r in want.lists], (k, mode, batch)
                assert got.committed == want.committed, (k, mode, batch)
    seqs = {k: {dict(key)["seq"] for b in rec.backends.values() for key in b._static} for k, rec in recs.items()}
    assert any(s > 2 for s in seqs["per_graph"])  # prefill shapes, a session each
    assert seqs["pair"] and max(seqs["pair"]) <= 2 and seqs["pair"] <= seqs["per_graph"]
    assert seqs["pair_no_graphs"] == seqs["per_graph"]
    pair = [(seq, dynamic, how) for k, graphs, seq, dynamic, how in given if (k, graphs) == ("pair", True)]
    assert any(seq > 2 for seq, _, _ in pair)
    assert all((dynamic, how) == ((True, "plain") if seq > 2 else (False, "graph")) for seq, dynamic, how in pair), \
        sorted(set(pair))
    assert recs["pair"].backends["target"]._session is not None  # made again for the prefills


def test_single_sessions_run_ungraphed_buckets_outside_any_graph_and_never_release(tiny, engines_master, monkeypatch):
    """graph_sessions="single": a bucket above cuda_graph_max_tokens runs in its graph's one CUDA-graph session,
    every run carrying ONNX Runtime's "no graph" annotation (-1) and none asking for the arena shrink (the session's
    arena holds memory its graphs replay into); graphed buckets still warm up, capture and replay under their own id.
    Lists equal per_shape's. (A CPU has no graphs: which session each bucket gets is forced as on CUDA.)"""
    from padrec_runtime.backends.onnxruntime import OrtBackend
    real_session, real_run = OrtBackend.bucket_session, OrtBackend.run_bound
    runs: dict = {}  # id(binding) -> [(annotation, asks the shrink)] per run of that bucket

    def single(self, dims):
        assert self.graph_sessions == "single"
        return real_session(self, dims)[0], "graph" if dims["seq"] <= 2 else "outside"

    def recording(self, graph, session, binding, options):
        runs.setdefault(id(binding), []).append((int(options.get_run_config_entry("gpu_graph_id")),
                                                 OrtBackend._asks_shrink(options)))
        return real_run(self, graph, session, binding, options)
    hist = _histories(tiny[0], 17, 2)
    plain = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    want = {m: [r.tokens for r in plain.recommend(hist, params=DecodeParams(speculate=m)).lists] for m in ("off", "chain")}
    monkeypatch.setattr(OrtBackend, "bucket_session", single)
    monkeypatch.setattr(OrtBackend, "run_bound", recording)
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True,
                                                             graph_sessions="single"))
    for mode in ("off", "chain", "chain"):  # the second chain request reuses the pooled caches and their buckets
        assert [r.tokens for r in rec.recommend(hist, params=DecodeParams(speculate=mode)).lists] == want[mode]
    assert not any(shrink for r in runs.values() for _, shrink in r), runs
    annotations = [[i for i, _ in r] for r in runs.values()]
    outside = [a for a in annotations if set(a) == {-1}]
    graphed = [a for a in annotations if set(a) != {-1}]
    assert any(len(a) >= 2 for a in outside), runs  # a prefill bucket, run again on the pooled cache: never a graph
    assert graphed and all(a[0] == -1 and len(set(a[1:])) == 1 and a[1] > 0 for a in graphed), runs


def test_a_graphed_bucket_tunes_in_a_throwaway_twin_first(tiny, engines_master, monkeypatch):
    """With gemm_tuning="apart" (CUDA, graphs) the first call of each new call shape in a CUDA-graph session runs once
    first in a throwaway twin of its session (the same fixed dimensions, made with a graph), outside any graph, over
    the bucket's own buffers, and the twin is dropped at once (its arena, holding the tuning's scratch, goes with it):
    one twin per graph and call shape, whichever caches and prefill windows share it, none for later calls, and the
    lists equal a run without twins. (A CPU has no graphs: they are forced here, for every bucket.)"""
    import weakref
    from padrec_runtime.backends.onnxruntime import OrtBackend
    real_twin, real_run = OrtBackend.tuning_twin, OrtBackend.run_bound
    twins, made, events = [], [], []  # weak references to the twins; (graph, call dims); (graph, twin?, annotation)

    def twin(self, session, call):
        got = real_twin(self, session, call)
        if got is not None:
            assert got is not session
            twins.append(weakref.ref(got))
            made.append((self.graph_name, tuple(sorted(call.items()))))
        return got

    def recording(self, graph, session, binding, options):
        is_twin = any(t() is session for t in twins)
        events.append((graph, is_twin, int(options.get_run_config_entry("gpu_graph_id"))))
        return real_run(self, graph, session, binding, options)
    hist = _histories(tiny[0], 9, 5)
    options = RuntimeOptions(device_cache=True, static_shapes=True, prefill_rows=2)  # a prefill in three windows
    plain = Recommender(engines_master, options=options)
    want = {m: [r.tokens for r in plain.recommend(hist, params=DecodeParams(speculate=m)).lists]
            for m in ("off", "chain")}
    monkeypatch.setattr(OrtBackend, "wants_graph", lambda self, dims: True)
    monkeypatch.setattr(OrtBackend, "tunes_apart", True)
    monkeypatch.setattr(OrtBackend, "tuning_twin", twin)
    monkeypatch.setattr(OrtBackend, "run_bound", recording)
    rec = Recommender(engines_master, options=options)
    for _ in range(2):  # the second request makes no twin: every call shape has run
        got = {m: [r.tokens for r in rec.recommend(hist, params=DecodeParams(speculate=m)).lists] for m in want}
        assert got == want
    caches = [c for whole in rec.caches._shared.values() for c in (whole, *whole._windows.values())]
    buckets = [(name, tuple(sorted(b.dims.items()))) for c in caches for (name, _), b in c._buckets.items()]
    assert len(buckets) > len(set(buckets))  # the windows share call shapes
    assert len(made) == len(set(made)) and set(made) == set(buckets)
    assert all(t() is None for t in twins)  # dropped once run
    twin_runs = [e for e in events if e[1]]
    assert len(twin_runs) == len(twins) and all(a == -1 for _, _, a in twin_runs)
    after = [events[i + 1] for i, e in enumerate(events) if e[1]]  # right after each twin: the bucket's warm-up
    assert [(g, tw, a) for g, tw, a in after] == [(g, False, -1) for g, _, _ in twin_runs]


def test_a_tuning_twin_that_cannot_be_made_costs_the_saving_not_the_request(tiny, engines_master, monkeypatch):
    """A twin that ONNX Runtime refuses (out of memory, say) is noted in graph_notes and the bucket tunes in its own
    session: the request's lists are the same."""
    from padrec_runtime.backends.onnxruntime import OrtBackend

    def refused(self, session, call):
        raise BackendError(f"{self.graph_name}: onnxruntime cannot make a session of it (out of memory)")
    hist = _histories(tiny[0], 4, 2)
    plain = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    want = [r.tokens for r in plain.recommend(hist, params=DecodeParams(speculate="chain")).lists]
    monkeypatch.setattr(OrtBackend, "wants_graph", lambda self, dims: dims.get("seq", 1) <= 2)
    monkeypatch.setattr(OrtBackend, "tunes_apart", True)
    monkeypatch.setattr(OrtBackend, "tuning_twin", refused)
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    assert [r.tokens for r in rec.recommend(hist, params=DecodeParams(speculate="chain")).lists] == want
    notes = [n for b in rec.backends.values() for n in b.graph_notes]
    assert notes and all("no tuning twin, tuned in its own session" in n and "out of memory" in n for n in notes)


def test_a_graphed_bucket_runs_once_outside_any_graph_before_its_own(tiny, engines_master, monkeypatch):
    """Each graphed bucket's first run carries ONNX Runtime's "no graph" annotation (-1), its later runs the
    bucket's own id, distinct per bucket: in a session holding several graphs, ONNX Runtime's warm-up count is the
    session's, so without that run a new bucket would be captured on its first run, per-shape set-up and all.
    (A CPU session ignores the annotations; which buckets claim a graph is forced here.)"""
    from padrec_runtime.backends.onnxruntime import OrtBackend
    real_session, real_run = OrtBackend.bucket_session, OrtBackend.run_bound
    ids: dict = {}  # the binding's id -> the annotation of each of its runs

    def graphed(self, dims):
        return real_session(self, dims)[0], "graph"

    def recording(self, graph, session, binding, options):
        ids.setdefault(id(binding), []).append(int(options.get_run_config_entry("gpu_graph_id")))
        return real_run(self, graph, session, binding, options)
    hist = _histories(tiny[0], 5, 1)
    plain = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    want = [r.tokens for r in plain.recommend(hist, params=DecodeParams(speculate="chain")).lists]
    monkeypatch.setattr(OrtBackend, "bucket_session", graphed)
    monkeypatch.setattr(OrtBackend, "run_bound", recording)
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    got = [r.tokens for r in rec.recommend(hist, params=DecodeParams(speculate="chain")).lists]
    assert got == want
    runs = list(ids.values())
    assert runs and any(len(r) >= 3 for r in runs), runs
    assert all(r[0] == -1 and len(set(r[1:])) <= 1 and all(i > 0 for i in r[1:]) for r in runs), runs
    own = [r[1] for r in runs if len(r) > 1]
    assert len(own) == len(set(own)), runs  # every bucket a graph of its own


@pytest.mark.parametrize("graphs", [False, True])
def test_only_a_prompts_prefill_releases_the_shared_arena(tiny, engines_master, monkeypatch, graphs):
    """On the shared arena (buckets without a CUDA graph) a prompt's prefill - the call into an empty cache, the
    target's and the draft's catch-up alike, on every request of a pooled cache - asks ONNX Runtime to shrink the
    arena after it; no later call of a request does (it would pay the device allocations every round), and a
    bucket that replays a CUDA graph never does (its memory is its own). Lists are unchanged."""
    from padrec_runtime.backends.onnxruntime import OrtBackend
    real_options, real_session, real_run = OrtBackend.run_options, OrtBackend.bucket_session, OrtBackend.run_bound
    released: dict = {}  # id(options) -> whether they release the arena
    runs: list = []  # (graph, tokens of the binding's bucket, releases) per bucket run

    def options(self, graph_id, queued, release=False):
        made = real_options(self, graph_id, queued, release)
        released[id(made)] = release
        return made

    def session(self, dims):  # which buckets claim a graph is forced (CPU ignores it)
        return real_session(self, dims)[0], "graph" if graphs else "plain"

    def recording(self, graph, session, binding, opts):
        if opts is not None:
            runs.append((graph, released[id(opts)]))
        return real_run(self, graph, session, binding, opts)
    hist = _histories(tiny[0], 5, 2)
    plain = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    want = {m: [r.tokens for r in plain.recommend(hist, params=DecodeParams(speculate=m)).lists]
            for m in ("off", "chain")}
    monkeypatch.setattr(OrtBackend, "run_options", options)
    monkeypatch.setattr(OrtBackend, "bucket_session", session)
    monkeypatch.setattr(OrtBackend, "run_bound", recording)
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    for mode in ("off", "chain", "chain"):  # the second chain request reuses the pooled caches
        before = len(runs)
        assert [r.tokens for r in rec.recommend(hist, params=DecodeParams(speculate=mode)).lists] == want[mode]
        mine = runs[before:]
        releasing = [g for g, rel in mine if rel]
        if graphs:
            assert not releasing, mine
        else:  # the target's prefill, then (speculating) the draft's: the first run into each empty cache
            assert releasing == (["target"] if mode == "off" else ["target", "draft_chain"]), mine
            assert mine[0] == ("target", True) and len(mine) > len(releasing) + 3, mine


def test_an_onnx_runtime_that_refuses_the_arena_shrink_runs_the_prefill_without_it(tiny, engines_master, monkeypatch):
    """Where ONNX Runtime cannot find the arena a prefill asks it to shrink (here: a CPU session asked for the GPU's,
    which it refuses before running anything), the run goes ahead without the request, the backend asks no more
    (not even through options its caches made before) and says why in its graph notes; lists are unchanged."""
    from padrec_runtime.backends.onnxruntime import ARENA_SHRINK, OrtBackend
    real_options = OrtBackend.run_options

    def cuda_decision(self, graph_id, queued, release=False):  # the options a CUDA backend would make
        made = real_options(self, graph_id, queued)
        if release and self.shrinks_arena:
            made.add_run_config_entry(ARENA_SHRINK, "gpu:0")
        return made
    hist = _histories(tiny[0], 5, 2)
    plain = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    want = [r.tokens for r in plain.recommend(hist, params=DecodeParams(speculate="chain")).lists]
    monkeypatch.setattr(OrtBackend, "run_options", cuda_decision)
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    for _ in range(2):  # the second request's prefills ask no more (each refusal adds a note: one each below)
        assert [r.tokens for r in rec.recommend(hist, params=DecodeParams(speculate="chain")).lists] == want
    refused = {g: b.graph_notes for g, b in rec.backends.items() if not b.shrinks_arena}
    assert set(refused) == {"target", "draft_chain"}, refused
    assert all(len(n) == 1 and "arena shrink refused" in n[0] for n in refused.values()), refused
    with pytest.raises(PadrecError, match="onnxruntime run failed"):  # any other failure still raises
        rec.backends["target"].run_bound("target", rec.backends["target"].session, None, None)


@pytest.mark.parametrize("batch,static", [(1, True), (1, False), (3, True)])
def test_in_place_gives_the_same_lists(tiny, engines_master, batch, static):
    """The in-place graphs (ONNX Runtime's fused ops writing the cache in place) run every causal call they can
    take - target_gqa: prefill, AR steps and chain verify for one history, one-token steps for a batch;
    draft_chain_gqa: fused chain rounds of one history, device rounds included - and give the standard graphs'
    lists and acceptance in every mode; tree verify passes stay on the standard target."""
    plain = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=static, in_place=False))
    counter = CallCounter()
    fused = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=static), tracer=counter)
    assert fused.settings.in_place and "target_gqa" not in plain.backends
    hist = _histories(tiny[0], 13, batch)
    for mode in ("off", "chain", "tree", "chain-dev"):  # chain-dev: device rounds (queued in-place chains)
        for greedy in (True, False):
            opts = dict(speculate="chain", device_rounds=True) if mode == "chain-dev" else dict(speculate=mode)
            if mode == "chain-dev" and (not greedy or not static):
                continue
            a = plain.recommend(hist, params=DecodeParams(greedy=greedy, seed=4, **opts))
            b = fused.recommend(hist, params=DecodeParams(greedy=greedy, seed=4, **opts))
            assert [r.tokens for r in a.lists] == [r.tokens for r in b.lists] and a.committed == b.committed, mode

    def by_graph(cache):
        return {graph: counter.count(cache, graph) for c, graph, _ in counter.calls if c == cache}
    target, draft = by_graph("target"), by_graph("draft")
    assert target["target_gqa"] > 0 and target["target"] > 0  # tree verify passes on the standard target
    if batch == 1:  # every AR step, prefill and chain verify: more fused calls than tree verify passes; every
        assert target["target_gqa"] > target["target"]  # fused chain round in place
        assert draft["draft_chain_gqa"] > 0 and "draft_chain" not in draft
    else:  # several rows: chain rounds (catch-up of several tokens) on the standard chain graph
        assert draft["draft_chain"] > 0 and "draft_chain_gqa" not in draft


def test_in_place_routes_only_causal_calls(tiny, engines_master):
    """DeviceCache._route sends a call to the in-place graph only where it computes the same thing."""
    import numpy as np
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True))
    runner = rec.caches.lease("target", 1)
    tri = np.tri(3, dtype=bool)[None]
    pos = np.arange(3)[None]
    assert runner._route("target", {"position_ids": pos}, tri, 3, None) == "target_gqa"
    assert runner._route("target", {"position_ids": pos + 1}, tri, 3, None) == "target"  # positions off
    tree = tri.copy()
    tree[0, 2, 1] = False  # a sibling, not a parent
    assert runner._route("target", {"position_ids": pos}, tree, 3, None) == "target"
    runner.lengths[:] = rec.limits["max_seq_len"] - 2  # the padded call would run past the cache
    assert runner._route("target", {"position_ids": pos + runner.lengths[0]}, tri, 3, None) == "target"
    runner.reset()
    runner.scratch = 1
    assert runner._route("target", {"position_ids": pos}, tri, 3, None) == "target"
    runner.reset()
    two = rec.caches.lease("target", 2)  # several rows: one token each only
    assert two._route("target", {"position_ids": np.zeros((2, 1), int)}, np.ones((2, 1, 1), bool), 1, None) \
        == "target_gqa"
    assert two._route("target", {"position_ids": np.tile(pos, (2, 1))}, np.tile(tri, (2, 1, 1)), 3, None) == "target"


def test_in_place_options(engines_master, engines):
    import json
    with pytest.raises(PadrecError, match="in_place: needs device_cache"):
        Recommender(engines_master, options=RuntimeOptions(in_place=True))
    assert not Recommender(engines_master).settings.in_place  # the host cache path keeps the standard target
    m = json.loads((engines / "manifest.json").read_text())
    m["graphs"]["target_gqa"]["kv"]["max_len"] = 64
    (engines / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="graphs.target_gqa.kv"):
        Recommender(engines, options=RuntimeOptions(device_cache=True))


def test_fused_chain_is_one_draft_call_per_round_and_lossless(tiny, engines_master):
    """Greedy chain rounds with the exported K run the draft_chain graph: one draft engine call per round and
    none besides (the first one catches up on the prompt; the step-by-step loop makes K per round), lists equal
    to AR, and the in-graph grammar proposes what the host loop would (same acceptance). Another K, or
    fused_chain=False, keeps the step-by-step draft."""
    counter = CallCounter()
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True), tracer=counter)
    K = rec.manifest.graph("draft_chain")["chain_steps"]
    hist = _histories(tiny[0], 5, 4)
    ar = rec.recommend(hist, params=DecodeParams(speculate="off"))
    counter.clear()
    fused = rec.recommend(hist, params=DecodeParams(speculate="chain", draft_steps=K))
    chain_calls = counter.count("draft", "draft_chain")
    assert chain_calls == fused.rounds and counter.count("draft", "draft") == 0  # the first catches up on the prompt
    assert [r.tokens for r in fused.lists] == [r.tokens for r in ar.lists]
    for opts in (dict(draft_steps=K, fused_chain=False), dict(draft_steps=K - 1)):
        counter.clear()
        loop = rec.recommend(hist, params=DecodeParams(speculate="chain", **opts))
        assert [r.tokens for r in loop.lists] == [r.tokens for r in ar.lists]
        assert counter.count("draft", "draft_chain") == 0 and counter.count("draft", "draft") > loop.rounds
        if opts["draft_steps"] == K:
            assert loop.committed == fused.committed and loop.tau > 1.5


class ChainInputs:
    """A tracer recording every draft_chain call: its effective inputs (after device-side copies, static buckets),
    its token count and whether its inputs were written on the device (`queued`)."""

    def __init__(self):
        self.calls = []

    def engine_call(self, call) -> None:
        if call.graph in ("draft_chain", "draft_chain_gqa"):
            ins = {name: np.array(arr) for name, arr in (call.inputs or {}).items()}
            self.calls.append(dict(ins, queued=call.queued, tokens=call.tokens))


def test_device_rounds_default_on_cuda_device_caches_only(engines_master):
    """device_rounds left out: on for up to RuntimeOptions.device_rounds_max_batch histories on device caches with
    static shapes on CUDA (standard or in-place graphs), off elsewhere; asked for, as asked (the rule, checked on a
    CPU recommender whose settings are then relabelled)."""
    import dataclasses
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True, in_place=False))

    def rounds(batch=1, **params):
        return rec.decode_config(DecodeParams(**params), batch).device_rounds
    assert rounds() is False  # CPU
    assert rounds(device_rounds=True) is True
    cpu = rec.settings
    rec.settings = dataclasses.replace(cpu, device="cuda")
    assert rounds() is True
    assert rounds(8) is True  # up to device_rounds_max_batch (measured at 1 and 8)
    assert rounds(9) is False
    assert rounds(32, device_rounds=True) is True
    assert rounds(device_rounds=False) is False
    rec.settings = dataclasses.replace(cpu, device="cuda", in_place=True)  # the in-place graphs too
    assert rounds() is True
    rec.settings = dataclasses.replace(cpu, device="cuda", device_rounds_max_batch=2)
    assert rounds(2) is True and rounds(3) is False
    rec.settings = dataclasses.replace(cpu, device="cuda", static_shapes=False)
    assert rounds() is False


@pytest.mark.parametrize("batch", [1, 4])
def test_device_rounds_feed_the_next_chain_what_the_host_would(tiny, engines_master, batch):
    """device_rounds: each round's next draft chain is queued behind its verify pass with inputs worked out
    there (numpy buffers here; the same code runs on CUDA), the first round's behind the prefill. Every such
    call sees exactly what the host path feeds - features, tokens, positions, slots, last index, trie row, items
    left, banned trie nodes - so the rounds and lists are the host path's, and the lists equal AR's."""
    # the standard chain graph's input buffers (the in-place chain's device rounds: test_in_place_...)
    recorder = ChainInputs()
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True, in_place=False),
                      tracer=recorder)
    K = rec.manifest.graph("draft_chain")["chain_steps"]
    hist = _histories(tiny[0], 7, batch)
    ar = rec.recommend(hist, params=DecodeParams(speculate="off"))
    rec.recommend(hist, params=DecodeParams(speculate="chain", draft_steps=K))  # caches and sessions exist from here on
    recorder.calls = host_calls = []
    host = rec.recommend(hist, params=DecodeParams(speculate="chain", draft_steps=K))
    recorder.calls = dev_calls = []
    dev = rec.recommend(hist, params=DecodeParams(speculate="chain", draft_steps=K, device_rounds=True))
    assert [r.tokens for r in dev.lists] == [r.tokens for r in ar.lists] == [r.tokens for r in host.lists]
    assert dev.committed == host.committed and dev.tau > 1.5
    assert len(dev_calls) == len(host_calls) == dev.rounds
    for h, d in zip(host_calls, dev_calls):
        for b in range(batch):
            if h["input_ids"][b, 0] == 0:  # a finished row (padding)
                continue
            n = int(h["last"][b]) + 1
            for name in ("hidden_in", "input_ids", "position_ids", "slot"):
                np.testing.assert_allclose(d[name][b, :n], h[name][b, :n], rtol=1e-6, atol=1e-6, err_msg=name)
            for name in ("last", "node", "left", "banned"):
                np.testing.assert_array_equal(d[name][b], h[name][b], err_msg=name)
    queued = sum(d["queued"] for d in dev_calls)
    assert not any(h["queued"] for h in host_calls) and queued >= dev.rounds // 2  # most from the device path
    assert dev_calls[0]["queued"]  # the first chain too: queued behind the prefill, its first token picked there


def test_device_rounds_start_from_the_host_past_the_largest_bucket(tiny, engines_master, monkeypatch):
    """A prompt longer than every static bucket runs its prefill and first chain on the dynamic path, where
    nothing can be written on the device: the first chain then starts from the host, later rounds queue as
    usual, and the lists stay AR's."""
    from padrec_runtime.cache import buckets as bucket_table
    recorder = ChainInputs()
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True), tracer=recorder)
    hist = _histories(tiny[0], 8, 4)  # prompts of 7 to 57 tokens
    ar = rec.recommend(hist, params=DecodeParams(speculate="off"))
    for buckets, first_queued in ((bucket_table.BUCKETS, True), ((1, 2, 4, 8, 16, 32), False)):
        monkeypatch.setattr(bucket_table, "BUCKETS", buckets)
        recorder.calls = []
        dev = rec.recommend(hist, params=DecodeParams(speculate="chain", device_rounds=True))
        chains = [(c["tokens"], c["queued"]) for c in recorder.calls]
        assert [r.tokens for r in dev.lists] == [r.tokens for r in ar.lists] and dev.tau > 1.5
        assert chains[0] == (max(len(rec.catalogue.prompt(h)) for h in hist), first_queued)
        assert sum(q for _, q in chains[1:]) >= dev.rounds // 2  # later rounds queued on the device as usual


def test_fp16_engines_run_and_give_valid_lists(tiny, tmp_path):
    from padrec_export.onnx_export import export_engines
    from tests.conftest import LIMITS
    cat, target, draft = tiny
    export_engines(target, draft, cat, tmp_path / "fp16", "fp16", LIMITS, progress=False)
    rec = Recommender(tmp_path / "fp16")
    hist = _histories(cat, 6, 4)
    ar = rec.recommend(hist, params=DecodeParams(speculate="off"))
    for mode in ("chain", "tree"):
        res = rec.recommend(hist, params=DecodeParams(speculate=mode))
        assert [r.tokens for r in res.lists] == [r.tokens for r in ar.lists]  # lossless holds per precision
    assert all(len(set(r.item_ids)) == 5 for r in ar.lists)


def test_adaptive_speculation_picks_a_measured_setting(tiny, engines_master):
    rec = Recommender(engines_master)
    with pytest.raises(InputError, match="calibrat"):
        rec.recommend([[1000]], params=DecodeParams(speculate="auto"))
    hist = [h for s in range(3) for h in _histories(tiny[0], s, 4)][:8]
    plan = rec.calibrate(hist, batches=(1, 8), repeats=1)
    assert [c.batch for c in plan] == [1, 8]
    for c in plan:
        assert c.ms <= c.ar_ms  # AR is a candidate: the choice is never slower on what was measured
    auto = rec.recommend(hist[:3], params=DecodeParams(speculate="auto"))
    from padrec_runtime.api.adaptive import pick
    ar = ("off", None)
    assert pick({ar: 100.0, ("chain", 4): 90.0, ("tree", 4): 95.0}) == ("chain", 4)
    assert pick({ar: 100.0, ("chain", 4): 98.5}) == ar  # within the margin: AR
    assert pick({ar: 100.0, ("chain", 4): 98.5}, margin=0.0) == ("chain", 4)
    assert pick({ar: 90.0, ("chain", 4): 95.0}) == ar
    # its slowest run must not be slower than AR's median: a noisy win is no win
    assert pick({ar: 100.0, ("chain", 4): 90.0}, worst={ar: 104.0, ("chain", 4): 120.0}) == ar
    assert pick({ar: 100.0, ("chain", 4): 90.0}, worst={ar: 104.0, ("chain", 4): 99.0}) == ("chain", 4)
    # and its fastest run must beat AR's fastest by the margin: a median won in AR's slow spell is no win
    assert pick({ar: 100.0, ("chain", 4): 90.0}, fastest={ar: 80.0, ("chain", 4): 79.0}) == ar
    assert pick({ar: 100.0, ("chain", 4): 90.0}, fastest={ar: 95.0, ("chain", 4): 85.0}) == ("chain", 4)
    from padrec_runtime.api.adaptive import CANDIDATES, candidates_for
    own = ("chain", rec.limits["draft_steps"])
    assert own in candidates_for(rec) and set(CANDIDATES) <= set(candidates_for(rec))
    assert candidates_for(rec, [ar, ("chain", 1)]) == (ar, ("chain", 1), own)  # the engines' K is always timed
    static = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))  # device rounds possible: timed too
    assert candidates_for(static, [ar, own]) == (ar, own, own + (True,))
    plan = static.calibrate(hist, batches=(1,), repeats=1)
    assert plan[0].ms <= plan[0].ar_ms
    picked = static.recommend(hist[:1], params=DecodeParams(speculate="auto"))
    assert [r.tokens for r in picked.lists] == [r.tokens for r in static.recommend(hist[:1], params=DecodeParams(speculate="off")).lists]
    assert [r.tokens for r in auto.lists] == [r.tokens for r in rec.recommend(hist[:3], params=DecodeParams(speculate="off")).lists]


def test_calibrate_weighs_medians_fastest_and_slowest_runs(tiny, engines_master, monkeypatch):
    """calibrate hands `pick` every candidate's median, slowest and fastest run, in that order of spread."""
    import padrec_runtime.api.adaptive as adaptive
    seen = []

    def spy(times, margin, worst=None, fastest=None):
        seen.append((times, worst, fastest))
        return ("off", None)
    monkeypatch.setattr(adaptive, "pick", spy)
    monkeypatch.setattr(adaptive, "PRUNE", 1e9)  # every candidate timed every round (on CPU most are far behind AR)
    rec = Recommender(engines_master)
    hist = [h for s in range(2) for h in _histories(tiny[0], s, 4)][:2]
    plan = rec.calibrate(hist, batches=(2,), repeats=3)
    assert plan[0].speculate == "off" and len(seen) == 1
    times, worst, fastest = seen[0]
    assert set(times) == set(worst) == set(fastest) and ("off", None) in times and len(times) > 1
    assert all(fastest[k] <= times[k] <= worst[k] for k in times)
    assert any(fastest[k] < worst[k] for k in times)


def test_calibrate_times_candidates_far_behind_the_fastest_once():
    """After the first round only AR and the candidates within PRUNE of the fastest are timed again; every
    candidate's time is reported, and the pick is among the candidates kept."""
    from padrec_runtime.api.adaptive import PRUNE, _timed_pick
    now, calls = [0.0], {}
    cost = {("off", None): 1.0, ("chain", 4): 0.8, ("chain", 2): 0.8 * PRUNE - 0.01, ("tree", 4): 0.8 * PRUNE + 0.01}

    def run(key):
        calls[key] = calls.get(key, 0) + 1
        now[0] += cost[key]
    best, times = _timed_pick({k: (lambda k=k: run(k)) for k in cost}, 3, 0.03, clock=lambda: now[0])
    assert calls == {("off", None): 3, ("chain", 4): 3, ("chain", 2): 3, ("tree", 4): 1}
    assert best == ("chain", 4) and set(times) == set(cost) and times[("tree", 4)] == pytest.approx(1010.0)
    # a candidate dropped after one run is never picked on that run: here the tree's one run (0.9) would beat the
    # chain's median (1.2), but the chain's first run (0.7) had left it behind
    seq = {("off", None): [2.0] * 3, ("chain", 4): [0.7, 1.2, 1.2], ("tree", 4): [0.9]}
    runs = {k: (lambda k=k: now.__setitem__(0, now[0] + seq[k].pop(0))) for k in seq}
    best, times = _timed_pick(runs, 3, 0.03, clock=lambda: now[0])
    assert best == ("chain", 4) and times[("tree", 4)] < times[("chain", 4)]


@pytest.mark.parametrize("verdicts, n_hist, want", [
    (["win", "lose"], 4, "off"),  # won on the first two histories, lost on the next two: AR
    (["win", "win"], 4, "chain"),
    (["win"], 2, "chain"),  # no spare histories: not re-checked
])
def test_calibrate_keeps_a_speculative_win_only_if_it_holds_on_other_histories(tiny, engines_master, monkeypatch,
                                                                               verdicts, n_hist, want):
    """A setting that beats AR on the first `batch` histories is timed again against AR alone on the next `batch`
    of them, and kept only if it wins there too."""
    import padrec_runtime.api.adaptive as adaptive
    rec = Recommender(engines_master)
    ar, own = ("off", None), ("chain", rec.limits["draft_steps"])
    hist = [h for s in range(3) for h in _histories(tiny[0], s, 4)][:n_hist]
    verdict, compared, decoded = iter(verdicts), [], []

    def judge(times, *args, **kwargs):
        compared.append(set(times))
        return own if next(verdict) == "win" else ar

    def recommend(histories, *args, real=rec.recommend, **kwargs):
        decoded.append([list(h) for h in histories])
        return real(histories, *args, **kwargs)

    monkeypatch.setattr(adaptive, "pick", judge)
    monkeypatch.setattr(adaptive, "PRUNE", 1e9)  # the winner stays timed whatever its first run
    monkeypatch.setattr(rec, "recommend", recommend)
    plan = rec.calibrate(hist, batches=(2,), repeats=1)
    assert plan[0].speculate == want
    assert len(compared) == len(verdicts)
    if len(verdicts) == 2:
        assert compared[1] == {ar, own}  # the re-check: AR against the winner alone
        assert {tuple(map(tuple, d)) for d in decoded} == {tuple(map(tuple, hist[:2])), tuple(map(tuple, hist[2:]))}
    else:
        assert all(d == hist[:2] for d in decoded)


def test_queued_calls_keep_their_results_and_take_device_outputs(tiny, engines_master):
    """DeviceCache.launch queues an engine call and result() reads it later: a second queued call of the
    same bucket (which reuses the buffers) does not change the first one's result, and `take` copies another
    call's output into an input on the device exactly as if the host had written it there."""
    from padrec_runtime.cache.buckets import bucket
    rec = Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True))
    target = rec.caches.lease("target", 1)
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 20, (1, 3)).astype(np.int32) for _ in range(2)]
    mask = np.tril(np.ones((1, 3, 3), bool))

    def feeds(i):
        return {"input_ids": ids[i], "position_ids": np.arange(3, dtype=np.int32)[None]}
    alone = []
    for i in range(2):
        target.reset()
        alone.append(target.forward(feeds(i), mask)["logits"])
    target.reset()
    first = target.launch(feeds(0), mask)
    target.discard()
    second = target.launch(feeds(1), mask)  # same bucket: the first call's outputs are read before reuse
    assert bucket(3) in {k[1] for k, b in target._buckets.items() if b.unread is not None}
    np.testing.assert_allclose(first.result()["logits"], alone[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second.result()["logits"], alone[1], rtol=1e-5, atol=1e-5)

    class Tokens:  # a finished call whose output is ids[1]'s last two tokens
        def device(self, name):
            return ids[1][:, 1:]

        def result(self):
            return {"tok": ids[1][:, 1:]}
    target.reset()
    blank = {"input_ids": np.concatenate([ids[1][:, :1], np.zeros((1, 2), np.int32)], 1),
             "position_ids": feeds(1)["position_ids"]}
    taken = target.launch(blank, mask, take={"input_ids": (Tokens(), "tok", 1)}).result()["logits"]
    np.testing.assert_allclose(taken, alone[1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(alone[0], alone[1])


def test_close_frees_engines_and_later_calls_say_so(engines_master):
    """close() (or leaving a `with` block) frees sessions and caches; a later call is a clear error."""
    with Recommender(engines_master, options=RuntimeOptions(device_cache=True, static_shapes=True)) as rec:
        hist = [rec.catalogue.item_ids[:3].tolist()]
        assert len(rec.recommend(hist).lists) == 1
        assert rec.caches and rec.backends
    assert not rec.caches and not rec.backends
    with pytest.raises(BackendError, match="closed"):
        rec.recommend(hist)
