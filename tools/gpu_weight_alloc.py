"""How much GPU memory one device copy of a target's weights costs, by the way it is allocated.

The runtime gives every ONNX Runtime session one device copy of the weights (backends/weights.py). Where that
copy's memory comes from decides what it costs beyond the tensors' own bytes: ONNX Runtime's Python allocator is
an arena that grows by doubling regions, so its last region is partly empty. Each method runs in a fresh process
(one CUDA context each) over the tensors of a Qwen2.5-shaped target (padrec_export.sizes), and reports the
process's GPU memory (NVML) beyond the tensors' bytes; `session_drop` reports what one CUDA session leaves
behind once it is dropped. Writes benchmarks/results/gpu_weight_alloc_<card>.json.

    python tools/gpu_weight_alloc.py --size qwen-1.5b --out $OUT
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from padrec_export.sizes import size_by_name  # noqa: E402

METHODS = ("ort_python_arena", "ort_shared_arena", "runtime_pool", "session_drop")
ONNX_TYPES = {"float16": 10, "bfloat16": 16}


def used() -> int:
    """This process's GPU bytes (NVML)."""
    import pynvml
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return next(int(p.usedGpuMemory) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.pid == os.getpid())


def shapes(size_name: str, vocab: int = 261) -> list:
    """The target's weight shapes, as the exporter lays them out (q/k/v with biases, as Qwen2.5)."""
    s = size_by_name(size_name)
    head_dim = s.hidden // s.heads
    kv = s.kv_heads * head_dim
    layer = [(s.hidden, s.hidden), (s.hidden, kv), (s.hidden, kv), (s.hidden,), (kv,), (kv,), (s.hidden, s.hidden),
             (s.hidden, s.intermediate), (s.hidden, s.intermediate), (s.intermediate, s.hidden), (s.hidden,), (s.hidden,)]
    return [(vocab, s.hidden)] + layer * s.layers + [(s.hidden,)]


def allocate(method: str, tensors: list, dtype: str) -> list:
    """The tensors' device copies made the way `method` names."""
    import onnxruntime as ort
    from padrec_runtime.backends.onnxruntime import share_cuda_arena
    if method == "ort_python_arena":  # what the pool did: the Python binding's own CUDA arena
        return [ort.OrtValue.ortvalue_from_shape_and_type(list(t), ONNX_TYPES[dtype], "cuda", 0) for t in tensors]
    if method == "ort_shared_arena":  # the arena the runtime registers (growth as requested)
        share_cuda_arena(ort)
        info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        return [ort.OrtValue.ortvalue_from_shape_and_type(list(t), ONNX_TYPES[dtype], memory_info=info)
                for t in tensors]
    if method == "runtime_pool":  # the runtime's WeightPool: one exact slab per graph, views by DLPack
        from padrec_runtime.backends.weights import WeightPool
        data = bytearray(max(int(np.prod(t)) for t in tensors) * 2)
        spec = {"weights": [{"name": f"w{i}", "file": "d", "offset": 0, "length": int(np.prod(t)) * 2,
                             "shape": list(t), "dtype": dtype, "sha256": f"{i:064x}"} for i, t in enumerate(tensors)]}
        return list(WeightPool("cuda").supply("g", spec, {"d": data}).values())
    raise ValueError(method)


def session_drop() -> dict:
    """GPU bytes around one CUDA session of a small fp16 MatMul: made, run, dropped."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from padrec_runtime.backends.onnxruntime import share_cuda_arena
    share_cuda_arena(ort)
    w = helper.make_tensor("w", TensorProto.FLOAT16, [1024, 1024], np.zeros(1024 * 1024, np.float16).tobytes(),
                           raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [None, 1024])], [w])
    # IR 10: what every ONNX Runtime we support reads (onnx 1.23 would write 14, which 1.31 refuses)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10).SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(model))
    out, base = {}, used()
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.use_env_allocators", "1")
    sess = ort.InferenceSession(model, opts, providers=["CUDAExecutionProvider"])
    out["made_mb"] = (used() - base) / 2**20
    sess.run(None, {"x": np.ones((8, 1024), np.float16)})
    out["run_mb"] = (used() - base) / 2**20
    del sess
    gc.collect()
    out["dropped_mb"] = (used() - base) / 2**20
    return out


def child(method: str, size_name: str, dtype: str) -> dict:
    import cupy
    cupy.zeros(1)  # the CUDA context first: it is not part of what is measured
    if method == "session_drop":
        return session_drop()
    tensors = shapes(size_name)
    nbytes = sum(int(np.prod(t)) * 2 for t in tensors)
    base = used()
    try:
        values = allocate(method, tensors, dtype)
    except Exception as exc:  # a method this build cannot do: recorded, not fatal
        return {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
    held = used() - base
    del values
    gc.collect()
    return {"tensors": len(tensors), "tensor_gb": nbytes / 1e9, "held_gb": held / 1e9,
            "over_gb": (held - nbytes) / 1e9, "after_drop_gb": (used() - base) / 1e9}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="qwen-1.5b")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--out", default="benchmarks/results", type=Path)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float16", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.size, args.dtype)))
        return
    from cupy.cuda import runtime
    gpu = runtime.getDeviceProperties(0)["name"].decode()
    args.out.mkdir(parents=True, exist_ok=True)
    card = "h200" if "H200" in gpu else "h100" if "H100" in gpu else "gpu"
    path = args.out / f"gpu_weight_alloc_{card}.json"
    # one file per card; each size's runs replace that size's earlier ones
    report = json.loads(path.read_text()) if path.exists() else {"gpu": gpu, "sizes": {}}
    report.update(cuda_module_loading=os.environ.get("CUDA_MODULE_LOADING"),
                  what=__doc__.split("\n\n")[1].replace("\n", " "))
    runs = report["sizes"][args.size] = {}
    for dtype in args.dtypes.split(","):
        for method in METHODS:
            if method == "session_drop" and dtype != "float16":
                continue
            proc = subprocess.run([sys.executable, __file__, "--child", method, "--size", args.size,
                                   "--dtype", dtype], capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            runs[f"{method}/{dtype}"] = (json.loads(lines[-1][7:]) if lines else
                                         {"failed": proc.returncode, "tail": proc.stderr[-1500:]})
            print(method, dtype, runs[f"{method}/{dtype}"], flush=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
