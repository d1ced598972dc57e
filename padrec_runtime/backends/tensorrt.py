"""TensorRT backend (`tensorrt`, `tensorrt_lean` or `tensorrt_rtx`), device memory through cuda-python.

TensorRT and CUDA are imported here only, so a host with just ONNX Runtime imports the runtime.
Plans that embed host code (version-compatible builds) load only when the caller opts in.
"""
from __future__ import annotations

import importlib

import numpy as np

from ..errors import BackendError, ManifestError
from ..manifest import Manifest
from .base import check_feeds, graph_names, numpy_dtype

RUNTIME_MODULES = ("tensorrt", "tensorrt_lean", "tensorrt_rtx")


def _runtime_module(name: str, built_with: str, version_compatible: bool):
    if name not in RUNTIME_MODULES:
        raise BackendError(f"tensorrt module: got {name!r} | expected one of {', '.join(RUNTIME_MODULES)}")
    if (built_with == "tensorrt_rtx") != (name == "tensorrt_rtx"):
        raise BackendError(f"engines built with {built_with} cannot run on the {name} runtime | "
                           f"use RuntimeOptions(trt_module={'tensorrt_rtx' if built_with == 'tensorrt_rtx' else 'tensorrt'!r}) "
                           "(CLI: --trt-module) or rebuild")
    if name == "tensorrt_lean" and not version_compatible:
        raise BackendError("tensorrt_lean runs only version-compatible plans | rebuild with --version-compatible")
    try:
        return importlib.import_module(name)
    except ImportError:
        raise BackendError(f"{name}: not installed | pip install '.[trt]' (in the padrec checkout) (or tensorrt-rtx-cu13 for RTX)") from None
    except OSError as exc:
        raise BackendError(f"{name}: installed but its libraries failed to load ({exc})") from None


def _cuda():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise BackendError("cuda-python: not installed | the TensorRT backend moves its buffers with it: "
                           "pip install cuda-python (included in 'padrec[trt]')") from None
    return cudart


def _require_gpu(cudart) -> None:
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        raise BackendError(f"tensorrt: no usable CUDA GPU here ({err}; {count} devices) | TensorRT plans run on an "
                           "NVIDIA GPU with its driver: run on such a machine, or use --backend onnxruntime")


def _check(err, what: str):
    if isinstance(err, tuple):
        err, *rest = err
    else:
        rest = []
    if int(err) != 0:
        raise BackendError(f"CUDA {what} failed ({err}) | check the GPU and driver")
    return rest[0] if len(rest) == 1 else rest


class TrtBackend:
    """Runs one graph's TensorRT plan; numpy in and out, one stream, buffers reused across calls."""

    name = "tensorrt"
    binds_device_buffers = False  # the KV cache stays on the host (numpy in and out of each call)

    def __init__(self, manifest: Manifest, graph: str, module: str = "tensorrt", allow_host_code: bool = False):
        build = manifest.tensorrt
        if build is None:
            raise ManifestError(f"{manifest.root}: no TensorRT engines | run `padrec build --engines {manifest.root}`")
        if build["embeds_host_code"] and not allow_host_code:
            raise BackendError(f"{manifest.root}: the plans embed host code (version-compatible build) | load them "
                               "only if you trust their builder: pass allow_host_code=True (--allow-host-code)")
        self.graph_name, self.spec = graph, manifest.graph(graph)
        trt = _runtime_module(module, build["builder"], build["version_compatible"])
        if graph not in build["plans"]:  # parse_manifest requires a plan per graph; an in-place graph has none
            raise ManifestError(f"tensorrt.plans.{graph}: missing | {graph} has no TensorRT plan (onnxruntime only) "
                                "| run it with the onnxruntime backend, or rebuild with `padrec build`")
        plan = manifest.read(build["plans"][graph])  # the bytes that were hashed are the bytes deserialized
        self._cudart = _cuda()
        _require_gpu(self._cudart)  # else TensorRT's own deserialization fails, blaming the plan
        self._logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self._logger)
        if build["embeds_host_code"]:
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendError(f"{graph}.plan: {module} {getattr(trt, '__version__', '?')} could not deserialize it "
                               f"(built by {build['builder']} {build['builder_version']}) | a plan runs only on the "
                               "TensorRT version and GPU family it was built for (TensorRT for RTX plans do not run "
                               "on data-centre GPUs such as H100); rebuild on the target machine")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"{graph}.plan: no execution context (out of GPU memory?)")
        self.stream = _check(self._cudart.cudaStreamCreate(), "stream create")
        self._buffers: dict = {}  # name -> (device pointer, bytes)
        self._in, self._out = graph_names(self.spec)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr), "free")
            try:
                ptr = _check(self._cudart.cudaMalloc(max(nbytes, 256)), "malloc")
            except BackendError:
                raise BackendError(f"{self.graph_name}: out of GPU memory allocating {nbytes / 2**20:.1f} MiB for "
                                   f"'{name}' | lower the batch or max_seq_len") from None
            self._buffers[name] = (ptr, max(nbytes, 256))
        return self._buffers[name][0]

    def infer(self, feeds: dict) -> dict:
        check_feeds(self.graph_name, self.spec, feeds, self._in)
        cu = self._cudart
        h2d, d2h = cu.cudaMemcpyKind.cudaMemcpyHostToDevice, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self._in:
            arr = np.ascontiguousarray(feeds[name])
            ptr = self._buffer(name, arr.nbytes)
            if arr.nbytes:
                _check(cu.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream), "copy in")
            self.context.set_input_shape(name, arr.shape)
            self.context.set_tensor_address(name, ptr)
        outs = {}
        for name, dtype in self._out.items():
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = np.empty(shape, dtype=numpy_dtype(dtype))
            self.context.set_tensor_address(name, self._buffer(name, outs[name].nbytes))
        if not self.context.execute_async_v3(self.stream):
            raise BackendError(f"{self.graph_name}: TensorRT execution failed")
        for name, arr in outs.items():
            if arr.nbytes:
                _check(cu.cudaMemcpyAsync(arr.ctypes.data, self._buffers[name][0], arr.nbytes, d2h, self.stream),
                       "copy out")
        _check(cu.cudaStreamSynchronize(self.stream), "synchronize")
        return outs

    def __del__(self):
        for ptr, _ in getattr(self, "_buffers", {}).values():
            self._cudart.cudaFree(ptr)
