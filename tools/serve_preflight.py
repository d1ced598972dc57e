"""Checks, before a serving run, that `padrec serve` can start here; each failure is one line naming the fix.

Usage: python tools/serve_preflight.py [--device cpu|cuda]
Checked: the serving environment (numpy<2, PyTriton's Triton and a Python-backend stub for this Python, this
interpreter's libpython), that Triton's binaries find every shared library (`ldd` with the server's library path),
the gRPC client, and on CUDA: ONNX Runtime's CUDA provider, CuPy with a GPU and NVRTC (the runtime's device cache
and its accept kernel). Exit code 1 on the first failure.
"""
import argparse
import subprocess
import sys
from pathlib import Path


class PreflightError(Exception):
    """One failed check: its message is the one-line diagnosis."""


def check_environment() -> dict:
    """The server's environment, as `padrec serve` builds it (its own one-line errors for numpy 2 and libpython)."""
    from padrec_runtime.errors import PadrecError
    from padrec_serve.server import server_env, triton_dist
    try:
        env = server_env()
    except PadrecError as exc:
        raise PreflightError(str(exc)) from None
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = triton_dist() / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise PreflightError(f"Triton's Python backend: no stub for Python {version} | use Python 3.8-3.13")
    return {"env": env, "stub": stub, "tritonserver": triton_dist() / "tritonserver" / "bin" / "tritonserver"}


def missing_libraries(binary: Path, env: dict) -> list:
    """Shared libraries `binary` needs that the loader does not find with `env`'s library path."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env).stdout
    return [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]


def check_libraries(found: dict) -> None:
    for name in ("tritonserver", "stub"):
        missing = missing_libraries(found[name], found["env"])
        if missing:
            hint = ("the interpreter's shared libpython: apt install libpython3.X, or a directory holding it on "
                    "LD_LIBRARY_PATH" if any(m.startswith("libpython") for m in missing)
                    else "put the directory holding them on LD_LIBRARY_PATH")
            raise PreflightError(f"{found[name].name}: cannot load {missing} | needs {hint}")


def check_client() -> None:
    try:
        import tritonclient.grpc  # noqa: F401
    except Exception as exc:  # an ImportError, or tritonclient's RuntimeError for an old grpcio
        raise PreflightError(f"tritonclient.grpc: {str(exc)[:200]} | install the staged tritonclient, grpcio, "
                             "protobuf and python-rapidjson (tools/stage_serve_wheels.sh)") from None


def check_cuda() -> str:
    """The GPU's name, once ONNX Runtime's CUDA provider and CuPy (arrays, NVRTC) work."""
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise PreflightError(f"onnxruntime {ort.__version__}: no CUDAExecutionProvider ({ort.__file__}) | put "
                             "onnxruntime-gpu first on PYTHONPATH (/tmp/gpusite)")
    try:
        import cupy
    except Exception as exc:  # seen on the H200: CuPy 13 imports the machine's SciPy, built for numpy 2
        raise PreflightError(f"cupy: import failed ({type(exc).__name__}: {str(exc)[:200]}) | CuPy 13 and what it "
                             "imports (SciPy) must be built for the stub's numpy 1.26: stage a SciPy < 1.15 wheel "
                             "with the serving wheels") from None
    try:
        total = int(cupy.arange(4).sum())
        kernel = cupy.RawKernel(r'extern "C" __global__ void twice(int* x) { x[threadIdx.x] *= 2; }', "twice")
        x = cupy.arange(4, dtype=cupy.int32)
        kernel((1,), (4,), (x,))
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        name = name.decode() if isinstance(name, bytes) else name
    except Exception as exc:
        raise PreflightError(f"cupy: {type(exc).__name__}: {str(exc)[:200]} | CuPy 13 with numpy 1.26 finds CUDA's "
                             "libraries (libcudart, libnvrtc) through the loader: put their directory on "
                             "LD_LIBRARY_PATH or set CUDA_PATH") from None
    if total != 6 or x.get().tolist() != [0, 2, 4, 6]:
        raise PreflightError(f"cupy: wrong results ({total}, {x.get().tolist()}) | check the GPU and driver")
    return f"{name} (cupy {cupy.__version__}, onnxruntime {ort.__version__})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    args = ap.parse_args()
    from padrec_serve.server import stub_numpy
    try:
        found = check_environment()
        print(f"preflight: {sys.executable}: python {sys.version.split()[0]}, the stub's numpy {stub_numpy()}, "
              f"stub {found['stub']}")
        check_libraries(found)
        print("preflight: tritonserver and its Python-backend stub find every shared library")
        check_client()
        print("preflight: tritonclient.grpc imports")
        if args.device == "cuda":
            print(f"preflight: CUDA: {check_cuda()}")
    except PreflightError as exc:
        print(f"preflight: FAILED: {exc}")
        return 1
    print("preflight: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
