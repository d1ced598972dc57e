"""`padrec serve` and `padrec client` refuse bad numbers at the command line, before Triton starts or a server is
waited for: nan / inf / non-positive deadlines and waits, ports outside 1..65535 or shared, empty id fields."""
import pytest
from click.testing import CliRunner

from padrec_export.cli import main
from padrec_runtime.api.cli import FiniteFloatRange

PORTS = ("--http-port", "--grpc-port", "--metrics-port")


def _refused(*args, code: int = 2) -> str:
    res = CliRunner().invoke(main, list(args), terminal_width=1000, max_content_width=1000)
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    return res.output


@pytest.mark.parametrize("value, words", [("nan", "got 'nan' | expected a finite number"),
                                          ("inf", "got 'inf' | expected a finite number"),
                                          ("0", "not in the range x>=0.001"), ("-1", "not in the range")])
def test_serve_refuses_a_deadline_that_is_not_a_positive_number(tmp_path, value, words):
    assert words in _refused("serve", "--engines", str(tmp_path), "--deadline-s", value)


@pytest.mark.parametrize("option", PORTS)
@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_serve_refuses_ports_outside_1_to_65535(tmp_path, option, port):
    out = _refused("serve", "--engines", str(tmp_path), option, port)
    assert f"'{option}': {port} is not in the range 1<=x<=65535" in out


def test_serve_refuses_two_listeners_on_one_port(tmp_path):
    out = _refused("serve", "--engines", str(tmp_path), "--grpc-port", "9000", "--metrics-port", "9000")
    assert "'--metrics-port': got 9000, the port of --grpc-port too | expected three different ports" in out
    out = _refused("serve", "--engines", str(tmp_path), "--metrics-port", "8000")  # the default http port
    assert "the port of --http-port too" in out


@pytest.mark.parametrize("value, words", [("nan", "expected a finite number"), ("inf", "expected a finite number"),
                                          ("-1", "not in the range x>=0")])
def test_client_refuses_a_wait_that_could_never_end_or_is_negative(value, words):
    out = _refused("client", "--history", "1,2", "--wait-s", value)
    assert f"'--wait-s': " in out and words in out


def test_client_refuses_an_empty_history_field_before_contacting_a_server():
    out = _refused("client", "--url", "127.0.0.1:1", "--history", "1,,2", code=1)
    assert "--history: got '1,,2', an empty field" in out and "cannot connect" not in out


def test_finite_float_range_keeps_finite_values_in_range():
    kind = FiniteFloatRange(min=0)
    assert kind.convert("1.5", None, None) == 1.5 and kind.convert("0", None, None) == 0.0


@pytest.mark.parametrize("url", ["http://localhost:8000", "localhost:99999", "localhost:0", "::::", "a b c", "host"])
def test_client_refuses_a_url_that_is_not_host_port_before_contacting_a_server(url):
    out = _refused("client", "--url", url, "--history", "1,2", code=1)
    assert f"--url: got {url!r} | expected host:port with no scheme" in out


@pytest.mark.parametrize("args, words", [
    (("--history", "18446744073709551616"), "--history: got 18446744073709551616 | expected integers up to"),
    (("--history", "1" * 5000), "--history: got 111111111111111111111111111111... | expected integers up to"),
    (("--history", "1", "--seed", "9223372036854775808"), "'--seed': 9223372036854775808 is not in the range"),
    (("--history", "1", "--top-k", "99999999999999999999"), "'--top-k': 99999999999999999999 is not in the range"),
    (("--history", "1", "--n-items", "99999999999999999999"), "'--n-items': 99999999999999999999 is not in the range"),
])
def test_client_refuses_numbers_past_what_a_request_carries(args, words):
    res = CliRunner().invoke(main, ["client", "--url", "127.0.0.1:1", *args], terminal_width=1000,
                             max_content_width=1000)
    assert res.exit_code in (1, 2) and isinstance(res.exception, SystemExit), res.output
    assert words in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("command", ["recommend", "bench", "serve"])
def test_the_memory_flags_show_their_defaults(command):
    """Each CUDA memory flag says under --help what leaving it out means (click shows no plain number beside a
    None default, so the runtime's value is given as text)."""
    from padrec_runtime import RuntimeOptions
    res = CliRunner().invoke(main, [command, "--help"], terminal_width=1000, max_content_width=1000)
    assert res.exit_code == 0, res.output
    entries = {}  # flag -> its entry in the help, which may run over several lines
    for chunk in ("\n" + res.output).split("\n  -")[1:]:
        entries["-" + chunk.split()[0]] = " ".join(chunk.split())
    defaults = {"--prefill-rows": f"[default: ({RuntimeOptions().prefill_rows})",
                "--graph-sessions": f"[default: ({RuntimeOptions().graph_sessions})",
                "--gemm-tuning": f"[default: ({RuntimeOptions().gemm_tuning})",
                "--cuda-graph-max-tokens": "[default: (every bucket)", "--cublas-workspace-mib": "[default: (cuBLAS's"}
    for flag, shown in defaults.items():
        assert shown in entries[flag], entries[flag]


def test_serve_refuses_a_damaged_engine_directory_before_triton_starts(engines, monkeypatch):
    """A changed graph is one line (IntegrityError) at `padrec serve`, not a failed model load in Triton's log."""
    import padrec_serve.server as server
    monkeypatch.setattr(server, "triton_dist", lambda: pytest.fail("Triton was looked for: the check came too late"))
    graph = engines / "target.onnx"
    raw = bytearray(graph.read_bytes())
    raw[len(raw) // 2] ^= 1
    graph.write_bytes(bytes(raw))
    out = _refused("serve", "--engines", str(engines), "--http-port", "18123", "--grpc-port", "18124",
                   "--metrics-port", "18125", code=1)
    assert "target.onnx: sha256 differs from the manifest" in out, out
