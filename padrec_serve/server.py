"""`padrec serve`: Triton Inference Server (the build PyTriton ships) with padrec as a Python-backend model."""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from padrec_runtime import RuntimeOptions
from padrec_runtime.api.cli import CUDA_MEMORY
from padrec_runtime.errors import BackendError, InputError
from padrec_runtime.manifest import load_manifest

from .process import port_free
from .schema import INPUTS, MODEL_NAME, OUTPUTS

RESTRICTED = "model-repository,shared-memory,trace,logging"
TRITON_TYPES = {np.int64: "TYPE_INT64", np.int32: "TYPE_INT32", np.float32: "TYPE_FP32", np.bool_: "TYPE_BOOL",
                np.bytes_: "TYPE_STRING"}


@dataclass(frozen=True)
class ServeConfig:
    """What `padrec serve` starts."""

    engine_dir: str
    device: str = "cpu"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002  # Triton's metrics and padrec's
    max_batch: int = 32  # Triton's max_batch_size: histories per dynamic batch
    max_queue_delay_us: int = 2000  # how long the batcher waits to fill a batch
    instances: int = 1  # model instances (each its own process and Recommender); with cuda: on each GPU
    devices: tuple | None = None  # GPU ids for the instances (cuda only); None: every GPU Triton sees
    deadline_s: float | None = None  # a request decoding longer is cut with DeadlineError
    calibrate: bool = True  # time AR vs speculation per batch size at start (for speculate=auto)
    # RuntimeOptions keywords of every instance, of CUDA_MEMORY's names only (how its CUDA sessions hold memory;
    # cuda only); the other settings are the device's defaults
    runtime_options: dict = field(default_factory=dict)
    exit_timeout_s: int = 5  # in-flight requests get this long on shutdown

    def __post_init__(self):
        given = {k: v for k, v in self.runtime_options.items() if v is not None}  # None: the runtime's default
        other = sorted(set(given) - set(CUDA_MEMORY.names))
        if other:
            raise InputError(f"runtime_options: got {other} | a server takes {', '.join(CUDA_MEMORY.names)} (the "
                             "other settings are the device's defaults) | drop them")
        RuntimeOptions(**given)  # their types and ranges, before anything starts
        for name, value in given.items():
            if self.device != "cuda":
                flag = "--" + name.replace("_", "-")
                raise InputError(f"{flag}: got {value} with --device {self.device} | it sets how CUDA sessions hold "
                                 f"memory | add --device cuda, or drop {flag}")
        object.__setattr__(self, "runtime_options", given)
        if self.devices is None:
            return
        if self.device != "cuda":
            raise InputError(f"--devices: got {list(self.devices)} with --device {self.device} | GPU ids need "
                             "--device cuda | add --device cuda, or drop --devices")
        ids = list(self.devices)
        if not ids or any(not isinstance(i, int) or i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise InputError(f"--devices: got {ids} | expected distinct GPU ids >= 0, e.g. 0,1")


def triton_dist() -> Path:
    """The Triton server build inside the PyTriton wheel (found, not imported: `padrec serve` needs its files only,
    not PyTriton's own dependencies)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("padrec serve: no module named 'pytriton' | needs Triton from PyTriton | run "
                           ".venv-serve/bin/padrec serve (tools/setup.sh makes it), or pip install '.[serve]' (in the padrec checkout) in "
                           "a venv of its own (PyTriton pins numpy<2)")
    return Path(list(spec.submodule_search_locations)[0])


def _tensor_block(specs, ragged: bool) -> str:
    rows = []
    for s in specs:
        extra = ", optional: true" if s.optional else ""
        extra += ", allow_ragged_batch: true" if ragged and s.shape == (-1,) else ""
        rows.append(f'  {{ name: "{s.name}", data_type: {TRITON_TYPES[s.dtype]}, dims: {list(s.shape)}{extra} }}')
    return ",\n".join(rows)


def instance_group(config: ServeConfig) -> str:
    """Triton's instance_group: `instances` CPU instances, or `instances` on each GPU (of `devices`, else of all
    that Triton sees); each GPU instance's stub runs on its own GPU (see padrec_serve.runtime.pin_gpu)."""
    if config.device != "cuda":
        return f"instance_group [ {{ count: {config.instances}, kind: KIND_CPU }} ]"
    gpus = "" if config.devices is None else f", gpus: {list(config.devices)}"
    return f"instance_group [ {{ count: {config.instances}, kind: KIND_GPU{gpus} }} ]"


def model_config(config: ServeConfig) -> str:
    """config.pbtxt of the padrec model."""
    params = {"engine_dir": str(Path(config.engine_dir).resolve()), "device": config.device,
              "deadline_s": "" if config.deadline_s is None else str(config.deadline_s),
              "calibrate": "1" if config.calibrate else "0",
              "runtime_options": json.dumps(config.runtime_options)}
    return "\n".join([
        f'name: "{MODEL_NAME}"', 'backend: "python"', f"max_batch_size: {config.max_batch}",
        f"dynamic_batching {{ max_queue_delay_microseconds: {config.max_queue_delay_us} }}",
        instance_group(config),
        "input [\n" + _tensor_block(INPUTS, ragged=True) + "\n]",
        "output [\n" + _tensor_block(OUTPUTS, ragged=False) + "\n]",
        # a JSON string literal is a text-format one (quotes and backslashes escaped: paths, the options' JSON)
        *(f'parameters {{ key: "{k}", value: {{ string_value: {json.dumps(v, ensure_ascii=False)} }} }}'
          for k, v in params.items()), ""])


def prepare(config: ServeConfig, workdir: Path) -> list:
    """A model repository and a Python backend (with the stub for this interpreter) in workdir; the command."""
    # checked here, hashes included, so that a bad directory is one line before Triton starts, not a failed load in
    # its log (each instance checks it again when it loads)
    load_manifest(config.engine_dir)
    dist = triton_dist() / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise BackendError(f"padrec serve: Python {version} | Triton's Python backend has stubs for "
                           f"{sorted(p.name for p in stub.parents[1].iterdir())} | use one of those")
    backend = workdir / "backends" / "python"
    backend.mkdir(parents=True)
    for f in (dist / "backends" / "python").iterdir():
        if f.is_file():
            (backend / f.name).symlink_to(f)
    shutil.copy(stub, backend / stub.name)
    model = workdir / "models" / MODEL_NAME
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(model_config(config))
    # model loading, shared memory, tracing and log settings stay behind a key nobody is given (statistics open)
    restricted = f"{RESTRICTED}:triton-access-token={secrets.token_urlsafe(32)}"
    package_root = Path(__file__).resolve().parents[1]
    (model / "1" / "model.py").write_text(
        f"import sys\nsys.path.insert(0, {str(package_root)!r})\n"
        "from padrec_serve.triton_model import TritonPythonModel  # noqa: F401,E402\n")
    return [str(dist / "bin" / "tritonserver"), f"--model-repository={workdir / 'models'}",
            f"--backend-directory={workdir / 'backends'}", f"--http-port={config.http_port}",
            f"--grpc-port={config.grpc_port}", f"--metrics-port={config.metrics_port}",
            f"--exit-timeout-secs={config.exit_timeout_s}", "--disable-auto-complete-config", "--log-verbose=0",
            "--strict-readiness=true", f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}"]


def libpython_paths(soname: str, libdir: str, ld_library_path: str) -> list:
    """Where the loader will find `soname` for Triton's stub: in libdir, on LD_LIBRARY_PATH, else in its cache."""
    found = [str(Path(d) / soname) for d in (libdir, *ld_library_path.split(":")) if d and (Path(d) / soname).exists()]
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    if not found and Path(ldconfig).exists():
        cache = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
        found = [line.split("=>")[-1].strip() for line in cache.splitlines() if line.strip().startswith(soname + " ")]
    return found


def require_libpython(libdir: str, ld_library_path: str) -> None:
    """BackendError, in one line, when the stub could not load this interpreter's libpython."""
    soname = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
    if not libpython_paths(soname, libdir, ld_library_path):
        raise BackendError(f"padrec serve: {soname} not found (in {libdir}, LD_LIBRARY_PATH or the loader's cache) | "
                           f"Triton's Python-backend stub links the libpython of {sys.executable} | install it "
                           f"(Debian/Ubuntu: apt install libpython{sys.version_info[0]}.{sys.version_info[1]}), or put "
                           f"a directory holding {soname} on LD_LIBRARY_PATH")


def stub_numpy(python: str = sys.executable) -> str | None:
    """The numpy version Triton's stub will import, or None without one: the stub embeds `python`'s libpython and
    sees that interpreter's own packages (its venv found through PATH, .pth files included) but not PYTHONPATH."""
    probe = subprocess.run([python, "-E", "-c", "import numpy; print(numpy.__version__)"], capture_output=True,
                           text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def require_stub_numpy(version: str | None) -> None:
    """BackendError, in one line, unless the stub will import numpy 1.x: with numpy 2, Triton 2.51's stub copies
    every tensor wrongly ([1, 2, 3] arrives as [1, 1, 1]) and a BYTES input aborts it."""
    fix = (f"install numpy<2 among {sys.executable}'s own packages (.venv-serve has it; PYTHONPATH does not reach "
           "the stub)")
    if version is None:
        raise BackendError(f"padrec serve: no numpy among {sys.executable}'s own packages | Triton's Python backend "
                           f"needs it | {fix}")
    if int(version.split(".")[0]) >= 2:
        raise BackendError(f"padrec serve: numpy {version} | Triton 2.51's Python backend (PyTriton 0.7.0) reads and "
                           f"writes tensors wrongly with numpy 2 | {fix}")


def server_env() -> dict:
    """This interpreter's libpython and Triton's libraries on the library path, the interpreter first on PATH:
    Triton's Python-backend stub embeds a libpython3.X and runs this venv's packages; another build's libpython
    (the system's, found first otherwise) fails inside the stub (`'_thread.RLock' object has no attribute ...`).
    The stub's packages are this interpreter's own (see `stub_numpy`), with numpy 1.x among them."""
    require_stub_numpy(stub_numpy())
    env = dict(os.environ)
    libs = triton_dist().parent / "nvidia_pytriton.libs"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise BackendError(f"padrec serve: {sys.executable} has no shared libpython | Triton's Python backend embeds "
                           "one | make the serving venv with a Python built with --enable-shared")
    libdir = sysconfig.get_config_var("LIBDIR")
    require_libpython(libdir, env.get("LD_LIBRARY_PATH", ""))
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, env.get("LD_LIBRARY_PATH"), str(libs)) if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def require_free_ports(config: ServeConfig) -> None:
    """Refuse ports another process holds before loading anything: Triton would find out only after the
    instances have loaded and calibrated, and say so in its own log."""
    ports = {"--http-port": config.http_port, "--grpc-port": config.grpc_port, "--metrics-port": config.metrics_port}
    for option, port in ports.items():
        if not port_free(port):
            raise InputError(f"{option}: port {port} is in use | stop what holds it, or pick another with {option} "
                             "(clients then name it: padrec client --url)")


def serve(config: ServeConfig) -> int:
    """Run Triton with padrec until SIGINT or SIGTERM (passed on to Triton, which drains and exits); its exit code."""
    require_free_ports(config)
    with tempfile.TemporaryDirectory(prefix="padrec-serve-") as tmp:
        cmd = prepare(config, Path(tmp))
        proc = subprocess.Popen(cmd, env=server_env())
        forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, forward)
        return proc.wait()
