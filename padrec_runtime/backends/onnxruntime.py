"""ONNX Runtime backend: one InferenceSession per graph, feeds checked against the manifest before each run."""
from __future__ import annotations

from ..errors import BackendError, ManifestError
from ..manifest import Manifest
from .base import check_feeds, graph_names

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool"}


class OrtBackend:
    """Runs one graph of an engine directory with ONNX Runtime on CPU or CUDA."""

    name = "onnxruntime"

    def __init__(self, manifest: Manifest, graph: str, device: str = "cpu", threads: int | None = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime: not installed | pip install 'padrec[runtime]' "
                               "(or 'padrec[gpu]' for CUDA)") from None
        self.graph_name, self.spec = graph, manifest.graph(graph)
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("onnxruntime: CUDAExecutionProvider unavailable | install onnxruntime-gpu "
                                   "matching your CUDA, or use device='cpu'")
            providers.insert(0, "CUDAExecutionProvider")
        elif device != "cpu":
            raise BackendError(f"onnxruntime device: got {device!r} | expected cpu or cuda")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        path = manifest.verify_file(self.spec["file"])
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"{path}: onnxruntime cannot load it ({str(exc)[:300]}) | re-export the engines") from None
        self._check_graph()

    def _check_graph(self) -> None:
        expected_in, expected_out = graph_names(self.spec)
        got_in = {i.name: _ORT_TYPES.get(i.type, i.type) for i in self.session.get_inputs()}
        got_out = {o.name: _ORT_TYPES.get(o.type, o.type) for o in self.session.get_outputs()}
        for kind, got, exp in (("inputs", got_in, expected_in), ("outputs", got_out, expected_out)):
            if set(got) != set(exp):
                raise ManifestError(f"{self.graph_name}.onnx {kind}: {sorted(got)} | manifest lists {sorted(exp)} | "
                                    "the graph and manifest come from different exports")
            for name, dtype in exp.items():
                if got[name] != dtype:
                    raise ManifestError(f"graphs.{self.graph_name}.{kind}.{name}.dtype: graph has {got[name]}, "
                                        f"manifest {dtype} | re-export the engines")
        declared = {**self.spec["inputs"], **self.spec["outputs"]}
        for node in (*self.session.get_inputs(), *self.session.get_outputs()):
            want = declared.get(node.name, {}).get("shape")
            if want is None:
                continue
            for axis, (g, w) in enumerate(zip(node.shape, want)):
                if isinstance(g, int) and isinstance(w, int) and g != w:
                    raise ManifestError(f"{self.graph_name}.onnx {node.name}: dimension {axis} is {g}, manifest says "
                                        f"{w} | the graph and manifest come from different exports")
        self._outputs = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict) -> dict:
        check_feeds(self.graph_name, self.spec, feeds)
        try:
            values = self.session.run(self._outputs, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"{self.graph_name}: onnxruntime run failed ({str(exc)[:300]})") from None
        return dict(zip(self._outputs, values))

