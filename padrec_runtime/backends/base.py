"""What every backend shares: the graph's full tensor list from the manifest and the feed check."""
from __future__ import annotations

import numpy as np

from ..errors import InputError

_NUMPY = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


def numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes  # numpy has no bfloat16; ml_dtypes ships with onnx and jax
        return ml_dtypes.bfloat16
    return _NUMPY[name]


def graph_names(spec: dict) -> tuple[dict, dict]:
    """name -> dtype of every input and output, KV tensors expanded from their templates."""
    kv = spec["kv"]
    inputs = {k: v["dtype"] for k, v in spec["inputs"].items()}
    outputs = {k: v["dtype"] for k, v in spec["outputs"].items()}
    for i in range(kv["n_layers"]):
        for part in ("key", "value"):
            inputs[kv[f"{part}_input"] % i] = kv["dtype"]
            outputs[kv[f"{part}_output"] % i] = kv["dtype"]
    return inputs, outputs


def check_feeds(graph: str, spec: dict, feeds: dict, expected: dict | None = None) -> None:
    """Names, dtypes, ranks and the shared batch / seq sizes of the feeds, before any engine runs.
    expected: `graph_names(spec)[0]`, when the caller keeps it (every engine call checks its feeds)."""
    expected = graph_names(spec)[0] if expected is None else expected
    missing = sorted(set(expected) - set(feeds))
    extra = sorted(set(feeds) - set(expected))
    if missing or extra:
        raise InputError(f"{graph}: feeds | missing {missing} unexpected {extra} | feed exactly the manifest's inputs")
    kv = spec["kv"]
    kv_shape = ["batch", kv["n_kv_heads"], "past", kv["head_dim"]]
    sizes: dict = {}
    for name, dtype in expected.items():
        arr = feeds[name]
        shape = spec["inputs"][name]["shape"] if name in spec["inputs"] else kv_shape
        if not isinstance(arr, np.ndarray) or arr.dtype != numpy_dtype(dtype) or arr.ndim != len(shape):
            got = f"{getattr(arr, 'dtype', type(arr).__name__)} {getattr(arr, 'shape', '')}"
            raise InputError(f"{graph}: input '{name}' | got {got} | expected {dtype} ({', '.join(map(str, shape))})"
                             " | convert the feed or re-export the engine")
        for dim, size in zip(shape, arr.shape):
            want = sizes.setdefault(dim, size) if isinstance(dim, str) else dim
            if size != want:
                raise InputError(f"{graph}: input '{name}' | dimension {dim} is {size}, elsewhere {want}")
    if "past_plus_seq" in sizes and sizes["past_plus_seq"] != sizes.get("past", 0) + sizes.get("seq", 0):
        raise InputError(f"{graph}: input 'attention_mask' | last dimension {sizes.get('past_plus_seq')} | "
                         f"expected past + seq = {sizes.get('past', 0) + sizes.get('seq', 0)}")


def cast_feeds(spec: dict, feeds: dict) -> dict:
    """Float feeds in the graph's declared precision (the loop keeps features in float32)."""
    out = dict(feeds)
    for name, t in spec["inputs"].items():
        arr = out.get(name)
        if isinstance(arr, np.ndarray) and arr.dtype.kind == "f" and t["dtype"].startswith(("float", "bfloat")):
            want = numpy_dtype(t["dtype"])
            if arr.dtype != want:
                out[name] = arr.astype(want)
    return out
