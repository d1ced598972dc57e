"""CUDA graphs replay exactly what the same static-shape sessions compute without them, for batch calls (the
device-rounds chain included, whose next chain's inputs one CUDA kernel works out on the device; the kernel
is also checked alone against its array-op reference) and for interleaved caller-owned sessions (each
device cache its own graphs), on a GPU. (Against the dynamic
CUDA path lists can differ at fp32 near-ties: other shapes, other kernels; on the H200 the static path
matched ONNX Runtime on CPU where the dynamic one did not, row 1 of batch 4, token 26.)

Skipped without onnxruntime-gpu, cupy and a CUDA device (CI has none); run on the GPU machine with
`python -m pytest tests/runtime/test_gpu.py` or `python tests/runtime/test_gpu.py`.
"""
import gc
import tempfile
from pathlib import Path


def _cuda_ready() -> bool:
    try:
        import cupy
        import onnxruntime as ort
        return "CUDAExecutionProvider" in ort.get_available_providers() and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no CUDA build of onnxruntime, no device
        return False


def _engines(tmp: Path, precision: str = "fp32") -> Path:
    from padrec_export.demo import default_model_dir
    from padrec_export.pipeline import export_checkpoints
    model = default_model_dir("ml-100k")
    export_checkpoints(model / "target", model / "draft_padrec", tmp / f"eng_{precision}", precision)
    return tmp / f"eng_{precision}"


def check_cuda_graph_sessions(engines: Path) -> dict:
    """fp16 engines run the fused target (target_gqa) by default: its CUDA graphs, in-place cache writes and
    routing are checked by the same comparisons; fp32 engines keep the standard target on CUDA."""
    from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
    from padrec_runtime.trace import CallCounter
    counter = CallCounter()
    graphs = Recommender(engines, device="cuda", tracer=counter)
    assert graphs.settings.static_shapes and graphs.settings.cuda_graphs
    assert graphs.settings.in_place == (graphs.manifest.precision == "fp16")
    plain = Recommender(engines, device="cuda", options=RuntimeOptions(cuda_graphs=False))  # the same sessions, no graphs
    cat = graphs.catalogue
    hists = [cat.item_ids[i:i + 12].tolist() for i in (0, 40, 80, 120)]
    for mode in ("off", "chain", "tree", "host_rounds", "device_rounds"):  # chain: the default rounds
        opts = (dict(speculate="chain", device_rounds=mode == "device_rounds") if mode.endswith("_rounds")
                else dict(speculate=mode))
        for batch in (hists[:1], hists):
            want = plain.recommend(batch, params=DecodeParams(speculate=opts["speculate"], device_rounds=False))  # the host path
            a = [r.tokens for r in want.lists]
            for _ in range(3):  # first runs warm up and capture, later ones replay
                got = graphs.recommend(batch, params=DecodeParams(**opts))
                assert [r.tokens for r in got.lists] == a, (mode, len(batch))
                assert got.committed == want.committed, (mode, len(batch))  # the same rounds too
    want = [[r.tokens for r in plain.recommend([h], params=DecodeParams(speculate="chain")).lists][0] for h in hists[:2]]
    for _ in range(2):  # interleaved caller-owned sessions, then again on pooled caches and captured graphs
        s1, s2 = graphs.start([hists[0]], params=DecodeParams(speculate="chain")), graphs.start([hists[1]], params=DecodeParams(speculate="chain"))
        while not (s1.done and s2.done):
            for s in (s1, s2):
                if not s.done:
                    s.step()
        assert [s1.result().lists[0].tokens, s2.result().lists[0].tokens] == want
        del s1, s2, s
        gc.collect()
    # caller-owned sessions from several threads at once (captures included: a fresh Recommender)
    from concurrent.futures import ThreadPoolExecutor
    fresh = Recommender(engines, device="cuda")
    modes = ["chain", "tree"] * 4
    want = [plain.recommend([hists[i % 4]], params=DecodeParams(speculate=m)).lists[0].tokens for i, m in enumerate(modes)]

    def run(i):
        s = fresh.start([hists[i % 4]], params=DecodeParams(speculate=modes[i]))
        while not s.done:
            s.step()
        return s.result().lists[0].tokens
    with ThreadPoolExecutor(4) as pool:
        for _ in range(2):
            assert list(pool.map(run, range(len(modes)))) == want
    notes = [n for b in graphs.backends.values() for n in b.graph_notes]
    assert not notes, notes
    check_graph_max_tokens(engines, plain, hists)
    check_per_graph_sessions(engines, plain, hists, {"graph_sessions": "per_graph"})
    check_per_graph_sessions(engines, plain, hists, {"graph_sessions": "per_graph", "gemm_tuning": "apart"})
    check_per_graph_sessions(engines, plain, hists, {"graph_sessions": "single", "cuda_graph_max_tokens": 8})
    check_per_graph_sessions(engines, plain, hists, {"graph_sessions": "pair", "cuda_graph_max_tokens": 8,
                                                     "gemm_tuning": "apart"})
    fused_calls = counter.count("target", "target_gqa")
    assert (fused_calls > 0) == graphs.settings.in_place
    return {"ok": True, "precision": graphs.manifest.precision, "in_place_target_calls": fused_calls,
            "pooled": {g: graphs.caches.pooled(g, 1) for g in ("target", "draft")}}


def check_graph_max_tokens(engines: Path, plain, hists: list) -> None:
    """Graphs for decode-sized calls only: prefill sessions open without one, on the shared arena, which a prompt's
    prefill shrinks when it ends (ONNX Runtime refuses a run whose shrink it cannot make); the lists are those of
    `plain` (the same sessions without graphs)."""
    from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
    small = Recommender(engines, device="cuda", options=RuntimeOptions(cuda_graph_max_tokens=8))
    for mode in ("off", "chain", "tree"):
        want = [r.tokens for r in plain.recommend(hists, params=DecodeParams(speculate=mode)).lists]
        for _ in range(2):
            assert [r.tokens for r in small.recommend(hists, params=DecodeParams(speculate=mode)).lists] == want, mode
    opened = [(dict(k), b.replays_graph(dict(k))) for b in small.backends.values() for k in b._static]
    assert any(g for _, g in opened) and all(g == (d["seq"] <= 8) for d, g in opened if "seq" in d), opened
    small.close()


def check_per_graph_sessions(engines: Path, plain, hists: list, options: dict) -> None:
    """graph_sessions="per_graph": one CUDA-graph session per engine graph, every bucket of every batch size a graph
    of its own in it; "single" (with a token limit on graphs): the buckets past it run in that session too, outside
    any graph; "pair" (with a limit): on the graph's dynamic-shape session. Each gives `plain`'s lists (batch 1 and a
    batch of several histories, each mode, replays too), and no session per shape is made."""
    from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
    one = Recommender(engines, device="cuda", options=RuntimeOptions(**options))
    for batch in (hists[:1], hists):
        for mode in ("off", "chain", "tree"):
            want = [r.tokens for r in plain.recommend(batch, params=DecodeParams(speculate=mode)).lists]
            for _ in range(3):
                got = [r.tokens for r in one.recommend(batch, params=DecodeParams(speculate=mode)).lists]
                assert got == want, (len(batch), mode)
    # every graph captures with dynamic batch and length: no data crosses between host and device inside it
    # (padrec_export.placement); a refused one would fall back to a graphed session per shape, with a note
    notes = {g: b.graph_notes for g, b in one.backends.items() if b.graph_notes}
    assert not notes and all(not b._static for b in one.backends.values()), notes
    assert all(b._graph_session is not False for b in one.backends.values())
    if options["graph_sessions"] == "pair":  # the prefills ran on the dynamic session, made again for them
        assert one.backends["target"]._session is not None
    one.close()


def check_accept_kernel(seed: int = 0) -> dict:
    """DeviceRounds' accept kernel writes exactly what `accept_reference` computes (cupy arrays for both), over
    random tables with ties among the logits and every accepted count from 0 to K; input columns past K+1
    are left alone; with a column offset per row, what `write_accepted` writes."""
    import cupy as cp
    import numpy as np
    from padrec_runtime.cache.rounds import accept_kernel, accept_reference, write_accepted
    rng = np.random.default_rng(seed)
    B, K, V, L, n_nodes, n_rows, P = 9, 7, 261, 4, 500, 40, 16
    T1, n_ban = K + 1, n_nodes + 2
    logits = rng.integers(-20, 20, (B, T1, V)).astype(np.float32) / 4  # many equal values: ties
    mask = rng.random((B, T1, V)) < 0.3
    mask[0, 3] = False  # a position where nothing is allowed
    picks = np.where(mask, logits, -np.inf).argmax(axis=2)
    tokens = picks[:, :K].copy()
    for b in range(B):  # row b accepts min(b, K) draft tokens
        if b < K:
            tokens[b, b] = (picks[b, b] + 1) % V
    host = {"mask": mask, "tokens": tokens.astype(np.int64), "rows": rng.integers(0, n_rows, (B, T1)),
            "left": rng.integers(0, 10, (B, T1)),
            "banned": np.where(rng.random((B, T1, n_ban)) < 0.2, -np.inf, 0).astype(np.float16),
            "path": np.argsort(rng.random((B, T1, n_nodes)), axis=2)[..., :L], "ends": rng.random((B, T1, L)) < 0.5}
    row_of = rng.integers(0, n_rows, n_ban)
    tab = {"next_node": rng.integers(0, n_ban, (n_rows, V)), "row_of": row_of,
           "is_leaf": (rng.random(n_ban) < 0.5).astype(np.int64), "node_slot": rng.integers(0, L + 2, n_ban)}
    dev = {k: cp.asarray(v) for k, v in host.items()}
    tab = {k: cp.asarray(v) for k, v in tab.items()}
    padded = cp.zeros((B, 16, V), np.float32)  # the verify bucket's buffer: logits are a (B, T1, V) view of it
    padded[:, :T1] = cp.asarray(logits)
    want = accept_reference(cp, padded[:, :T1], dev, tab, K)
    ins = {"input_ids": cp.full((B, P), -7, np.int32), "slot": cp.full((B, P), -7, np.int32),
           "last": cp.zeros(B, np.int32), "node": cp.zeros(B, np.int32), "left": cp.zeros(B, np.int32),
           "banned": cp.zeros((B, n_ban), np.float16)}
    accept_kernel(cp, padded[:, :T1], dev, tab, ins)
    for name, arr in want.items():
        got = ins[name][:, :T1] if name in ("input_ids", "slot") else ins[name]
        np.testing.assert_array_equal(cp.asnumpy(got), cp.asnumpy(arr).astype(got.dtype), err_msg=name)
    assert (cp.asnumpy(ins["input_ids"][:, T1:]) == -7).all() and (cp.asnumpy(ins["slot"][:, T1:]) == -7).all()
    accepted = cp.asnumpy(ins["last"]).tolist()
    assert accepted == [min(b, K) for b in range(B)], accepted
    # each row's tokens from its own column on (the first chain, behind the prefill), as write_accepted puts them
    col0 = rng.integers(0, P - T1 + 1, B).astype(np.int32)
    fresh = {name: cp.full(arr.shape, -7, arr.dtype) for name, arr in ins.items()}
    accept_kernel(cp, padded[:, :T1], dev, tab, fresh, cp.asarray(col0))
    ref = {name: np.full(arr.shape, -7, arr.dtype) for name, arr in ins.items()}
    write_accepted(ref, {name: cp.asnumpy(arr) for name, arr in want.items()}, col0)
    for name, arr in ref.items():
        np.testing.assert_array_equal(cp.asnumpy(fresh[name]), arr, err_msg=f"{name} from col0")
    return {"ok": True, "accepted": accepted, "col0": col0.tolist()}


def test_accept_kernel_matches_the_reference():
    import pytest
    if not _cuda_ready():
        pytest.skip("needs onnxruntime-gpu, cupy and a CUDA device")
    check_accept_kernel()


def test_cuda_graphs_replay_what_the_sessions_compute(tmp_path):
    import pytest  # imported here so the GPU machine can run this file without pytest
    if not _cuda_ready():
        pytest.skip("needs onnxruntime-gpu, cupy and a CUDA device")
    for precision in ("fp32", "fp16"):
        check_cuda_graph_sessions(_engines(tmp_path, precision))


if __name__ == "__main__":
    print(check_accept_kernel())
    with tempfile.TemporaryDirectory() as d:
        for precision in ("fp32", "fp16"):
            print(check_cuda_graph_sessions(_engines(Path(d), precision)))
