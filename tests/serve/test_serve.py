"""`padrec serve` on Triton: a real server on loopback answers as the in-process Recommender does, batches
concurrent requests, answers bad requests with client errors, exposes metrics, and stops without leftovers."""
import json
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from padrec_runtime import DecodeParams, Recommender

from padrec_serve.process import ROOT, port_free, serve_python, start_server

pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")
SERVE_PYTHON = serve_python()
if SERVE_PYTHON is None:
    pytest.skip("no interpreter with PyTriton (tools/setup.sh makes .venv-serve)", allow_module_level=True)

from padrec_serve.client import Client  # noqa: E402

N_ITEMS = 5


@pytest.fixture(scope="module")
def rec(engines_master):
    return Recommender(engines_master)


@pytest.fixture(scope="module")
def server(engines_master, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    srv = start_server(engines_master, log, SERVE_PYTHON, "--max-batch", "8", "--max-queue-delay-us", "20000")
    yield srv
    srv.stop()


def want_lists(rec, hists, speculate="off") -> list:
    """The in-process Recommender's lists."""
    return rec.recommend(hists, n_items=N_ITEMS, params=DecodeParams(speculate=speculate)).lists


def histories(rec, n, seed=0):
    rng = np.random.default_rng(seed)
    ids = rec.catalogue.item_ids
    return [rng.choice(ids, size=int(rng.integers(1, 12)), replace=False).tolist() for _ in range(n)]


def infer_json(server, inputs: list, model: str = "padrec"):
    """(HTTP status, body) of a raw KServe v2 JSON request, as curl sends it."""
    body = inputs if isinstance(inputs, bytes) else json.dumps({"inputs": inputs}).encode()
    req = urllib.request.Request(f"http://{server.http}/v2/models/{model}/infer", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def history_input(ids, dtype="INT64", shape=None):
    return {"name": "history", "shape": shape or [1, len(ids)], "datatype": dtype, "data": ids}


@pytest.mark.parametrize("speculate", ["off", "chain", "tree"])
def test_http_and_grpc_answer_as_recommend(server, rec, speculate):
    hist = histories(rec, 5, seed=1)
    want = want_lists(rec, hist, speculate)
    for url, protocol in ((server.http, "http"), (server.grpc, "grpc")):
        with Client(url, protocol) as c:
            got = c.recommend(hist, N_ITEMS, speculate=speculate)
        assert [g.item_ids for g in got] == [w.item_ids for w in want], protocol
        assert [g.sids for g in got] == [w.sids for w in want], protocol
        assert [g.titles for g in got] == [w.titles for w in want], protocol
        assert all(g.tau >= 1.0 for g in got)


def test_curl_json_request_answers_as_recommend(server, rec):
    hist = histories(rec, 1, seed=2)[0]
    status, body = infer_json(server, [history_input(hist),
                                       {"name": "speculate", "shape": [1, 1], "datatype": "BYTES", "data": ["auto"]}])
    assert status == 200, body
    out = {o["name"]: o["data"] for o in body["outputs"]}
    assert out["item_ids"] == want_lists(rec, [hist])[0].item_ids


def test_concurrent_requests_batch_and_match_single_requests(server, rec):
    distinct = histories(rec, 20, seed=3)
    with Client(server.http) as c:
        single = {tuple(h): c.recommend_one(h, N_ITEMS, speculate="auto").item_ids for h in distinct}
    before = server.stats()["model_stats"][0]["batch_stats"]
    work = [distinct[k % len(distinct)] for k in range(400)]

    def run(chunk):
        protocol = "grpc" if chunk[0] % 2 else "http"
        with Client(server.grpc if protocol == "grpc" else server.http, protocol) as c:
            return [(tuple(work[k]), c.recommend_one(work[k], N_ITEMS, speculate="auto").item_ids) for k in chunk]

    chunks = [list(range(t, 400, 16)) for t in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = [r for part in pool.map(run, chunks) for r in part]
    assert len(results) == 400
    assert all(got == single[h] for h, got in results)
    after = server.stats()["model_stats"][0]["batch_stats"]
    counts = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in after}
    counts_before = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in before}
    batched = {size: n - counts_before.get(size, 0) for size, n in counts.items() if size > 1}
    assert sum(batched.values()) > 0, counts
    assert sum(size * n for size, n in counts.items()) - sum(size * n for size, n in counts_before.items()) == 400


def _bad_requests(rec):
    """(what, inputs, words the error must name): 20 kinds of bad request."""
    good = rec.catalogue.item_ids[:3].tolist()
    too_long = rec.catalogue.item_ids[:rec.limits["max_history"] + 1].tolist()

    def p(name, dtype, value):
        return {"name": name, "shape": [1, 1], "datatype": dtype, "data": [value]}

    h = history_input(good)
    return [
        ("unknown item", [history_input([good[0], 5])], "unknown item ids"),
        ("negative item", [history_input([-1, good[0]])], "unknown item ids"),
        ("repeated item", [history_input([good[0], good[0]])], "repeat"),
        ("empty history", [history_input([], shape=[1, 0])], "empty"),
        ("over-long history", [history_input(too_long)], "at most"),
        ("float history", [history_input([1.5, 2.5], dtype="FP32")], "history"),
        ("history missing", [p("n_items", "INT32", 3)], "history"),
        ("history of three dimensions", [history_input(good, shape=[1, 1, 3])], "history"),
        ("unknown input", [h, p("beam_width", "INT32", 3)], "beam_width"),
        ("n_items zero", [h, p("n_items", "INT32", 0)], "n_items"),
        ("n_items too many", [h, p("n_items", "INT32", 999)], "n_items"),
        ("n_items float", [h, p("n_items", "FP32", 2.0)], "n_items"),
        ("unknown speculate", [h, p("speculate", "BYTES", "fast")], "speculate"),
        ("temperature zero", [h, p("greedy", "BOOL", False), p("temperature", "FP32", 0.0)], "temperature"),
        ("temperature negative", [h, p("temperature", "FP32", -1.0)], "temperature"),
        ("top_k negative", [h, p("top_k", "INT32", -2)], "top_k"),
        ("top_p zero", [h, p("top_p", "FP32", 0.0)], "top_p"),
        ("top_p above one", [h, p("top_p", "FP32", 1.5)], "top_p"),
        ("seed negative", [h, p("seed", "INT64", -3)], "seed"),
        ("greedy as string", [h, p("greedy", "BYTES", "yes")], "greedy"),
    ]


def _error_of(status, body) -> str:
    """The error a client sees: a 4xx status and a message (Triton's own checks, then padrec's)."""
    assert 400 <= status < 500, (status, body)
    return body["error"]


def test_bad_requests_get_named_client_errors_and_the_server_goes_on(server, rec):
    good = histories(rec, 1, seed=4)[0]
    want = want_lists(rec, [good])[0].item_ids
    cases = _bad_requests(rec)
    assert len(cases) == 20
    for what, inputs, words in cases:
        error = _error_of(*infer_json(server, inputs))
        assert words in error, (what, error)
        status, body = infer_json(server, [history_input(good)])
        assert status == 200 and {o["name"]: o["data"] for o in body["outputs"]}["item_ids"] == want, what


def test_bad_requests_do_not_fail_their_batch(server, rec):
    good = histories(rec, 16, seed=5)
    want = {tuple(h): want_lists(rec, [h])[0].item_ids for h in good}
    bad = [[int(good[0][0]), 7], [int(good[1][0])] * 2]

    def run(k):
        with Client(server.http) as c:
            if k % 2:
                with pytest.raises(Exception) as err:
                    c.recommend_one(bad[k // 2 % 2], N_ITEMS)
                return "bad", type(err.value).__name__
            return tuple(good[k // 2]), c.recommend_one(good[k // 2], N_ITEMS).item_ids

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(32)))
    assert all(r == ("bad", "InputError") for r in results[1::2])
    assert all(got == want[h] for h, got in results[0::2])
    assert any(int(b["batch_size"]) > 1 for b in server.stats()["model_stats"][0]["batch_stats"])


def test_client_command_prints_the_lists(server, rec):
    hist = histories(rec, 2, seed=6)
    args = [SERVE_PYTHON, "-m", "padrec_export.cli", "client", "--url", server.grpc, "--protocol", "grpc",
            "--n-items", str(N_ITEMS), "--wait-s", "30", "--json"]
    args += [a for h in hist for a in ("--history", ",".join(map(str, h)))]
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert f"waiting up to 30 s for {server.grpc} to be ready" in out.stderr  # stdout holds the JSON alone
    got = [x["item_ids"] for x in json.loads(out.stdout)]
    assert got == [x.item_ids for x in want_lists(rec, hist)]
    bad = subprocess.run(args[:-4] + ["--history", "1,1"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "unknown item ids" in bad.stderr and "Traceback" not in bad.stderr


def test_metrics_health_and_closed_admin_endpoints(server):
    assert server.get("http", "/v2/health/ready") == ""
    req = urllib.request.Request(f"http://{server.http}/v2/repository/models/padrec/unload", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(req, timeout=10)
    assert denied.value.code == 403
    assert server.get("http", "/v2/models/padrec/ready") == ""
    triton = server.get("metrics", "/metrics")
    assert 'nv_inference_request_success{model="padrec"' in triton
    ok = [line for line in triton.splitlines() if line.startswith("padrec_requests{") and 'outcome="ok"' in line]
    assert ok and float(ok[0].split()[-1]) > 400, ok
    bad = [line for line in triton.splitlines()
           if line.startswith("padrec_requests{") and 'outcome="client_error"' in line]
    assert bad and float(bad[0].split()[-1]) >= 10, bad
    assert "padrec_batch_size_bucket" in triton and "padrec_tau_count" in triton and "padrec_rounds{" in triton


def test_server_stops_without_leftover_processes_or_ports(server):
    assert server.proc.poll() is None and len(server.pids) >= 2  # the server, tritonserver and its stub
    code = server.stop()
    assert code == 0, server.log.read_text()[-3000:]
    left = [p for p in server.pids if __import__("os").path.exists(f"/proc/{p}")]
    assert not left, left
    assert all(port_free(p) for p in server.ports.values()), server.ports
