"""`padrec serve --instances 2` on CPU: two model instances (two stub processes, each its own Recommender) answer
as the in-process Recommender does, both take batches under concurrent load, and the server stops without leftovers."""
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from padrec_runtime import Recommender
from padrec_serve.process import descendants, port_free, start_server
from tests.serve.test_serve import N_ITEMS, SERVE_PYTHON, histories, want_lists

from padrec_serve.client import Client  # noqa: E402  (after the skip in tests.serve.test_serve)

STUB = "triton_python_backend_stub"


@pytest.fixture(scope="module")
def rec(engines_master):
    return Recommender(engines_master)


@pytest.fixture(scope="module")
def server(engines_master, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve2") / "serve.log"
    srv = start_server(engines_master, log, SERVE_PYTHON, "--instances", "2", "--max-batch", "4",
                       "--max-queue-delay-us", "5000")
    yield srv
    srv.stop()


def stub_pids(pid: int) -> list:
    """The Python-backend stub processes (one per model instance) below `pid`."""
    out = []
    for p in descendants(pid):
        try:
            if STUB in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace"):
                out.append(p)
        except OSError:
            continue
    return out


def ok_by_instance(metrics: str) -> dict:
    """padrec_requests{outcome="ok"} per model instance, from the Prometheus text."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith("padrec_requests{") and 'outcome="ok"' in line:
            labels = line[line.index("{") + 1:line.index("}")]
            name = dict(kv.split("=", 1) for kv in labels.split(","))["instance"].strip('"')
            out[name] = float(line.split()[-1])
    return out


def test_two_instances_are_configured_and_running(server):
    config = json.loads(server.get("http", "/v2/models/padrec/config"))
    assert [(g["kind"], g["count"]) for g in config["instance_group"]] == [("KIND_CPU", 2)]
    assert len(stub_pids(server.proc.pid)) == 2


def test_two_instances_answer_as_recommend_and_share_the_load(server, rec):
    distinct = histories(rec, 8, seed=7)
    want = {tuple(h): w.item_ids for h, w in zip(distinct, want_lists(rec, distinct))}
    work = [distinct[k % len(distinct)] for k in range(96)]

    def run(chunk):
        with Client(server.http) as c:
            return [(tuple(work[k]), c.recommend_one(work[k], N_ITEMS, speculate="off").item_ids) for k in chunk]

    with ThreadPoolExecutor(8) as pool:
        results = [r for part in pool.map(run, [list(range(t, 96, 8)) for t in range(8)]) for r in part]
    assert len(results) == 96 and all(got == want[h] for h, got in results)
    for protocol, url in (("grpc", server.grpc), ("http", server.http)):
        with Client(url, protocol) as c:
            assert [x.item_ids for x in c.recommend(distinct[:3], N_ITEMS, speculate="chain")] == \
                [w.item_ids for w in want_lists(rec, distinct[:3], "chain")]
    served = ok_by_instance(server.get("metrics", "/metrics"))
    assert sorted(served) == ["padrec_0_0", "padrec_0_1"], served
    assert all(n > 0 for n in served.values()), served  # both instances decoded batches
    assert sum(served.values()) == 96 + 6


def test_two_instances_stop_without_leftover_processes_or_ports(server):
    stubs = stub_pids(server.proc.pid)
    assert len(stubs) == 2
    code = server.stop()
    assert code == 0, server.log.read_text()[-3000:]
    assert not [p for p in server.pids | set(stubs) if os.path.exists(f"/proc/{p}")]
    assert all(port_free(p) for p in server.ports.values()), server.ports
