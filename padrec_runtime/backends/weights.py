"""One copy of the engines' weights on their device, given to every ONNX Runtime session of every graph.

ONNX Runtime makes each session's initializers from the model unless the caller supplies them
(`SessionOptions.add_initializer`); a supplied tensor that already lies on the device the session plans it on is
used as it is. So the static-shape sessions (one per bucket shape, each replaying its own CUDA graph) and the
graphs that hold the same tensor (the standard and in-place targets share all but their attention input
projections) share one device copy instead of one each. The manifest's `graphs.<graph>.weights` says where each
external tensor lies in its (verified) data file; its sha256 is the key under which graphs share, and two
tensors are only shared when their bytes are equal.
"""
from __future__ import annotations

import ctypes

import numpy as np

from ..errors import IntegrityError

_ONNX_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16, "int32": 6, "int64": 7, "bool": 9, "uint8": 2}


class WeightPool:
    """The device copies of the weights of every graph opened with this pool, one per distinct tensor."""

    def __init__(self, device: str):
        self.device = device
        self._values: dict = {}  # sha256 -> (OrtValue, its host bytes: compared when another graph claims them)
        self.bytes = 0  # device bytes held
        self.uses = 0  # bytes the graphs' sessions would have held as copies of their own, per session

    def supply(self, graph: str, spec: dict, buffers: dict) -> dict:
        """name -> OrtValue of every weight the manifest lists for `graph`; `buffers`: the verified bytes of its
        external data files, by file name (their views are kept, so the buffers live as long as the pool)."""
        values = {}
        for w in spec.get("weights", []):
            host = np.frombuffer(buffers[w["file"]], dtype=np.uint8, count=w["length"], offset=w["offset"])
            known = self._values.get(w["sha256"])
            if known is None:
                known = self._values[w["sha256"]] = (self._upload(w, host), host)
                self.bytes += w["length"]
            elif known[1] is not host and not np.array_equal(known[1], host):
                raise IntegrityError(f"graphs.{graph}.weights {w['name']}: its bytes differ from another graph's "
                                     f"tensor of the same sha256 | the manifest is wrong: re-export the engines")
            self.uses += w["length"]
            values[w["name"]] = known[0]
        return values

    def _upload(self, w: dict, host: np.ndarray):
        """A tensor of the weight's type and shape on the pool's device, filled with its bytes."""
        from onnxruntime import OrtValue
        value = OrtValue.ortvalue_from_shape_and_type(w["shape"], _ONNX_TYPES[w["dtype"]], self.device, 0)
        if self.device == "cuda":
            from cupy.cuda import runtime
            runtime.memcpy(value.data_ptr(), host.ctypes.data, host.nbytes, runtime.memcpyHostToDevice)
        else:
            ctypes.memmove(value.data_ptr(), host.ctypes.data, host.nbytes)
        # sessions take only tensors over memory the caller owns: the same memory seen through DLPack is that
        # (the DLPack view keeps the ONNX Runtime tensor, and so its memory, alive)
        return OrtValue.from_dlpack(value._ortvalue.to_dlpack())
