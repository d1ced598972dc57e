"""One copy of the engines' weights on their device, given to every ONNX Runtime session of every graph.

ONNX Runtime makes each session's initializers from the model unless the caller supplies them
(`SessionOptions.add_initializer`); a supplied tensor that already lies on the device the session plans it on is
used as it is. So the static-shape sessions (one per bucket shape, each replaying its own CUDA graph) and the
graphs that hold the same tensor (the standard and in-place targets: their projections, the MLP's gate|up as one
tensor in both) share one device copy instead of one each. The manifest's `graphs.<graph>.weights` says where each
external tensor lies in its (verified) data file; its sha256 is the key under which graphs share, and two
tensors are only shared when their bytes are equal.
"""
from __future__ import annotations

import ctypes
from pathlib import PurePosixPath

import numpy as np

from ..errors import BackendError, IntegrityError
from .onnx_wire import initializers, rotary_positions

_ONNX_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16, "int32": 6, "int64": 7, "bool": 9, "uint8": 2}


_ALIGN = 256  # bytes: each tensor's offset in a slab (cuBLAS and cuDNN want 16-byte, 256 costs nothing)


def check_graph(graph: str, spec: dict, model: bytes) -> None:
    """The graph's own initializers (read once) against the manifest: `check_entries`, `check_positions`."""
    in_place = (spec.get("kv") or {}).get("in_place")
    if not spec.get("weights") and not in_place:
        return
    declared = initializers(model, spec["file"])
    check_entries(graph, spec, declared)
    if in_place:
        check_positions(graph, spec, rotary_positions(model, spec["file"], declared))


def check_entries(graph: str, spec: dict, declared: dict) -> None:
    """Each of the manifest's weight entries for `graph` against the model's own initializer of that name: type,
    shape and the external data span it declares. The data files are hashed whole, so only this keeps a manifest
    that names the wrong tensor (two of one shape swapped, say) from feeding a session another tensor's bytes."""
    for i, w in enumerate(spec.get("weights", [])):
        init = declared.get(w["name"])
        got = None if init is None else (
            init.data_type, list(init.dims), PurePosixPath(init.external.get("location", "")).name,
            int(init.external.get("offset", 0)), int(init.external.get("length", w["length"])))
        want = (_ONNX_TYPES[w["dtype"]], list(w["shape"]), PurePosixPath(w["file"]).name, w["offset"], w["length"])
        if got != want:
            raise IntegrityError(f"graphs.{graph}.weights[{i}] {w['name']!r}: the manifest says (type, shape, file, "
                                 f"offset, length) {want}, {spec['file']} says {got or 'no such initializer'} | the "
                                 "manifest is wrong: re-export the engines")


def check_positions(graph: str, spec: dict, rows: int | None) -> None:
    """An in-place graph's rotary tables (`rows` positions) against the positions the manifest says its cache
    holds: ONNX Runtime would refuse the first call past the table, mid-request; here the load does."""
    kv = spec["kv"]
    if rows is not None and rows < kv["max_len"]:
        raise IntegrityError(f"graphs.{graph}.kv.max_len: the manifest says {kv['max_len']} positions, "
                             f"{spec['file']}'s rotary tables hold {rows} | the manifest is wrong: re-export the "
                             "engines with the max_seq_len you need")


class WeightPool:
    """The device copies of the weights of every graph opened with this pool, one per distinct tensor.

    On CUDA each graph's new tensors lie in one allocation of exactly their size (a slab), each a typed view of it
    handed to ONNX Runtime through DLPack. ONNX Runtime's own Python allocator is an arena that grows by doubling
    regions up to 1 GiB, then by 1 GiB: the weights would leave its last region partly empty, and every region's
    tail shorter than the next tensor (tools/gpu_weight_alloc.py measures both ways)."""

    def __init__(self, device: str):
        self.device = device
        self._values: dict = {}  # sha256 -> (OrtValue, its host bytes: compared when another graph claims them)
        self.bytes = 0  # bytes of the distinct tensors
        self.device_bytes = 0  # bytes allocated for them on the device (slabs: the tensors plus alignment)
        self.uses = 0  # bytes the graphs' sessions would have held as copies of their own, per session

    def supply(self, graph: str, spec: dict, buffers: dict) -> dict:
        """name -> OrtValue of every weight the manifest lists for `graph`; `buffers`: the verified bytes of its
        external data files, by file name (their views are kept, so the buffers live as long as the pool)."""
        hosts, new = {}, {}
        for w in spec.get("weights", []):
            host = hosts[w["name"]] = np.frombuffer(buffers[w["file"]], dtype=np.uint8, count=w["length"],
                                                    offset=w["offset"])
            first = new.get(w["sha256"])  # the same sha256 earlier in this graph, still to upload
            known = self._values.get(w["sha256"]) or (first and (None, hosts[first["name"]]))
            if known is None:
                new[w["sha256"]] = w
            elif known[1] is not host and not np.array_equal(known[1], host):
                raise IntegrityError(f"graphs.{graph}.weights {w['name']}: its bytes differ from another graph's "
                                     f"tensor of the same sha256 | the manifest is wrong: re-export the engines")
        for sha, value in zip(new, self._upload(list(new.values()), [hosts[w["name"]] for w in new.values()])):
            self._values[sha] = (value, hosts[new[sha]["name"]])
            self.bytes += new[sha]["length"]
        values = {}
        for w in spec.get("weights", []):
            self.uses += w["length"]
            values[w["name"]] = self._values[w["sha256"]][0]
        return values

    def _upload(self, weights: list, hosts: list) -> list:
        """OrtValues of the weights' types and shapes on the pool's device, filled with their bytes."""
        if not weights:
            return []
        if self.device == "cuda":
            return self._upload_cuda(weights, hosts)
        from onnxruntime import OrtValue
        values = []
        for w, host in zip(weights, hosts):
            value = OrtValue.ortvalue_from_shape_and_type(w["shape"], _ONNX_TYPES[w["dtype"]], "cpu", 0)
            ctypes.memmove(value.data_ptr(), host.ctypes.data, host.nbytes)
            self.device_bytes += host.nbytes
            # sessions take only tensors over memory the caller owns: the same memory seen through DLPack is that
            # (the DLPack view keeps the ONNX Runtime tensor, and so its memory, alive)
            values.append(OrtValue.from_dlpack(value._ortvalue.to_dlpack()))
        return values

    def _upload_cuda(self, weights: list, hosts: list) -> list:
        """One slab of device memory for all of `weights`, each a typed cupy view of it as an OrtValue (DLPack:
        the view keeps the slab alive for as long as a session holds the tensor)."""
        import cupy
        from cupy.cuda import runtime
        from onnxruntime import OrtValue
        kinds = [_cupy_dtype(w["dtype"]) for w in weights]
        offsets, end = slab_layout([host.nbytes for host in hosts])
        slab = cupy.cuda.Memory(end)  # cudaMalloc of exactly this size, outside cupy's pool
        self.device_bytes += end
        values = []
        for w, kind, host, offset in zip(weights, kinds, hosts, offsets):
            ptr = cupy.cuda.MemoryPointer(slab, offset)
            runtime.memcpy(ptr.ptr, host.ctypes.data, host.nbytes, runtime.memcpyHostToDevice)
            values.append(OrtValue.from_dlpack(cupy.ndarray(w["shape"], kind, ptr)))
        return values


def slab_layout(sizes: list) -> tuple[list, int]:
    """(offset of each tensor, slab bytes): the tensors in order, each starting on an _ALIGN boundary."""
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end += -(-n // _ALIGN) * _ALIGN
    return offsets, end


def _cupy_dtype(name: str):
    """The array type of a weight's dtype: bfloat16 through ml_dtypes, which cupy takes from version 14 on."""
    if name != "bfloat16":
        return np.dtype(name)
    import cupy
    try:
        import ml_dtypes
    except ImportError:
        ml_dtypes = None
    if ml_dtypes is None or int(cupy.__version__.split(".")[0]) < 14:
        raise BackendError(f"bf16 engines on CUDA: cupy {cupy.__version__}, ml_dtypes "
                           f"{'missing' if ml_dtypes is None else 'installed'} | pip install 'cupy-cuda12x>=14' "
                           "ml_dtypes (cupy-cuda13x on CUDA 13), or export fp16 engines")
    return np.dtype(ml_dtypes.bfloat16)
