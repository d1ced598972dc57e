"""The model configuration `padrec serve` writes for Triton (parsed with Triton's own schema), the instances and GPU
placement it asks for, and the pinning of each GPU instance's process to its GPU; no server, no GPU."""
import pytest

from padrec_runtime.errors import BackendError, InputError
from padrec_serve.runtime import visible_gpu
from padrec_serve.server import ServeConfig, libpython_paths, model_config, require_stub_numpy, stub_numpy

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parsed(config: ServeConfig):
    """config.pbtxt as Triton reads it (an unknown field or a malformed value raises here)."""
    return text_format.Parse(model_config(config), model_config_pb2.ModelConfig())


def groups(config: ServeConfig) -> list:
    kinds = model_config_pb2.ModelInstanceGroup.Kind
    return [(kinds.Name(g.kind), g.count, list(g.gpus)) for g in parsed(config).instance_group]


def test_cpu_instances(engines_master):
    assert groups(ServeConfig(str(engines_master), instances=3)) == [("KIND_CPU", 3, [])]
    cfg = parsed(ServeConfig(str(engines_master), max_batch=16, max_queue_delay_us=500))
    assert cfg.max_batch_size == 16 and cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.parameters["device"].string_value == "cpu"
    assert [i.name for i in cfg.input][0] == "history" and cfg.input[0].allow_ragged_batch


def test_gpu_instances_on_every_gpu_or_on_the_listed_ones(engines_master):
    assert groups(ServeConfig(str(engines_master), "cuda")) == [("KIND_GPU", 1, [])]
    assert groups(ServeConfig(str(engines_master), "cuda", instances=2, devices=(0, 1))) == [("KIND_GPU", 2, [0, 1])]
    assert groups(ServeConfig(str(engines_master), "cuda", devices=(3,))) == [("KIND_GPU", 1, [3])]
    assert parsed(ServeConfig(str(engines_master), "cuda", devices=(1,))).parameters["device"].string_value == "cuda"


def test_the_cuda_memory_settings_reach_every_instance_and_need_cuda(engines_master, tmp_path):
    import json
    opts = {"cuda_graph_max_tokens": 16, "graph_sessions": "pair", "cublas_workspace_mib": 4,
            "gemm_tuning": "apart", "prefill_rows": 4}
    params = parsed(ServeConfig(str(engines_master), "cuda", runtime_options=opts)).parameters
    assert json.loads(params["runtime_options"].string_value) == opts
    assert json.loads(parsed(ServeConfig(str(engines_master), "cuda")).parameters["runtime_options"].string_value) == {}
    with pytest.raises(InputError, match="--cuda-graph-max-tokens: got 16 with --device cpu"):
        ServeConfig(str(engines_master), runtime_options={"cuda_graph_max_tokens": 16})
    with pytest.raises(InputError, match="RuntimeOptions.graph_sessions: got 'all'"):
        ServeConfig(str(engines_master), "cuda", runtime_options={"graph_sessions": "all"})
    with pytest.raises(InputError, match=r"runtime_options: got \['threads'\] \| a server takes cuda_graph_max_tokens"):
        ServeConfig(str(engines_master), "cuda", runtime_options={"threads": 2})
    unset = ServeConfig(str(engines_master), runtime_options={"cublas_workspace_mib": None})  # None: not given
    assert json.loads(parsed(unset).parameters["runtime_options"].string_value) == {}
    odd = tmp_path / 'quote"and\\back'  # a path the config must escape, not end its string at
    odd.mkdir()
    assert '"' in str(odd) and parsed(ServeConfig(str(odd))).parameters["engine_dir"].string_value == str(odd)


@pytest.mark.parametrize("device, devices, words", [
    ("cpu", (0,), "need --device cuda"),
    ("cuda", (), "distinct GPU ids"),
    ("cuda", (0, 0), "distinct GPU ids"),
    ("cuda", (-1,), "distinct GPU ids"),
])
def test_bad_device_lists_are_refused(engines_master, device, devices, words):
    with pytest.raises(InputError, match=words):
        ServeConfig(str(engines_master), device, devices=devices)


def test_a_gpu_instance_sees_only_its_gpu():
    assert visible_gpu(None, 1) == "1"
    assert visible_gpu("", 0) == "0"
    assert visible_gpu("4,5,6", 1) == "5"  # Triton numbers the GPUs it sees: index 1 is physical GPU 5
    assert visible_gpu("GPU-aa, GPU-bb", 1) == "GPU-bb"
    with pytest.raises(InputError, match="CUDA_VISIBLE_DEVICES='4,5' has 2"):
        visible_gpu("4,5", 2)


def test_libpython_is_looked_for_where_the_loader_looks(tmp_path):
    soname = "libpython3.99.so.1.0"
    assert libpython_paths(soname, str(tmp_path / "none"), "") == []
    (tmp_path / "carried").mkdir()
    (tmp_path / "carried" / soname).write_bytes(b"")
    assert libpython_paths(soname, str(tmp_path / "none"), f"/nowhere:{tmp_path / 'carried'}") == \
        [str(tmp_path / "carried" / soname)]
    assert libpython_paths(soname, str(tmp_path / "carried"), "") == [str(tmp_path / "carried" / soname)]


def test_the_server_refuses_numpy_2_in_the_stubs_packages_in_one_line():
    """Triton's Python-backend stub copies tensors wrongly under numpy 2: refused before Triton starts."""
    with pytest.raises(BackendError, match=r"numpy 2\.5\.2 \| .* wrongly with numpy 2 \| install numpy<2 among"):
        require_stub_numpy("2.5.2")
    with pytest.raises(BackendError, match="no numpy among"):
        require_stub_numpy(None)
    require_stub_numpy("1.26.4")


def test_the_stubs_numpy_is_the_interpreters_own_not_pythonpaths(tmp_path, monkeypatch):
    """The stub ignores PYTHONPATH: a numpy placed there does not count."""
    import numpy as np
    fake = tmp_path / "numpy"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '0.0.1'\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert stub_numpy() == np.__version__


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_client_with_no_server_gets_one_named_error(protocol):
    import socket
    from padrec_serve.client import Client
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}", protocol, timeout_s=5) as c:
        with pytest.raises(BackendError, match=f"server: cannot connect to 127.0.0.1:{port} .* start `padrec serve`"):
            c.recommend([[1, 2]])


@pytest.mark.parametrize("option", ["http_port", "grpc_port", "metrics_port"])
def test_a_port_in_use_is_refused_before_anything_loads(option, tmp_path):
    """A port another process holds: one named error naming the option, before the engines load (Triton itself
    would find out only after loading and calibrating every instance)."""
    import socket
    from padrec_serve.process import free_ports
    from padrec_serve.server import serve
    ports = dict(zip(["http_port", "grpc_port", "metrics_port"], free_ports(3)))
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", ports[option]))
        holder.listen()
        flag = "--" + option.replace("_", "-")
        with pytest.raises(InputError, match=rf"{flag}: port {ports[option]} is in use \| .* {flag}"):
            serve(ServeConfig(str(tmp_path / "no-engines"), **ports))
