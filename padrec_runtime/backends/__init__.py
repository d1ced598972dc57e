"""Backends run one graph of an engine directory: ONNX Runtime (CPU, CUDA; binds device buffers) and TensorRT
(plans, host-side KV). Each is imported only when chosen, so a host with one of them imports the runtime."""
from __future__ import annotations

from typing import Protocol


class Backend(Protocol):
    """One graph, opened and checked against the manifest; `infer` checks its feeds, then runs."""

    name: str
    binds_device_buffers: bool  # capability: device caches can bind buffers to it (new_binding, bind, run_bound)

    def infer(self, feeds: dict) -> dict: ...


def open_backend(manifest, graph: str, settings, stream=None, weights=None) -> Backend:
    """The backend `settings.backend` names, opened on `graph` (settings: padrec_runtime.api.options.Settings).
    weights: ONNX Runtime's WeightPool shared by the graphs of one engine directory (open_backends)."""
    if settings.backend == "onnxruntime":
        from .onnxruntime import OrtBackend
        return OrtBackend(manifest, graph, device=settings.device, threads=settings.threads,
                          cuda_graphs=settings.cuda_graphs, graph_max_tokens=settings.cuda_graph_max_tokens,
                          graph_sessions=settings.graph_sessions, static=settings.static_shapes,
                          gemm_tuning=settings.gemm_tuning, stream=stream, weights=weights)
    from .tensorrt import TrtBackend
    return TrtBackend(manifest, graph, module=settings.trt_module, allow_host_code=settings.allow_host_code)


def open_backends(manifest, graphs, settings, stream=None) -> dict:
    """graph -> its backend; ONNX Runtime's graphs share one device copy of each weight (backends/weights.py)."""
    from .weights import WeightPool
    weights = WeightPool(settings.device) if settings.backend == "onnxruntime" else None
    if settings.cublas_workspace_mib is not None:  # before the first session makes its cuBLAS handles
        from .onnxruntime import cap_cublas_workspace
        cap_cublas_workspace(settings.cublas_workspace_mib)
    return {g: open_backend(manifest, g, settings, stream, weights) for g in graphs}
