"""TensorRT engine build from an engine directory's ONNX graphs; the same code drives `tensorrt_rtx`.

Profiles come from the manifest's limits; precision comes from the ONNX graphs themselves (strongly typed
networks), so the fp32 norms, softmax and logits the exporter kept stay fp32 in the engine.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from padrec_runtime.errors import BackendError, InputError
from padrec_runtime.manifest import Manifest, load_manifest, write_manifest

BUILDERS = ("tensorrt", "tensorrt_rtx")


@dataclass(frozen=True)
class BuildOptions:
    """How engines are built."""

    builder: str = "tensorrt"  # tensorrt | tensorrt_rtx (TensorRT for RTX)
    version_compatible: bool = False  # plan runs on later TensorRT (lean runtime); embeds host code
    hardware_compatibility: str = "NONE"  # NONE | AMPERE_PLUS | SAME_COMPUTE_CAPABILITY
    timing_cache: str | None = None  # file read before and written after the build
    compute_capability: str | None = None  # tensorrt_rtx only, e.g. "SM89"; default: the builder's choice
    workspace_mib: int = 2048
    precision: str | None = None  # must equal the graphs' precision; None takes the manifest's


def import_builder(name: str):
    if name not in BUILDERS:
        raise InputError(f"builder: got {name!r} | expected one of {', '.join(BUILDERS)}")
    try:
        return importlib.import_module(name)
    except ImportError:
        hint = ("pip install tensorrt-rtx-cu13" if name == "tensorrt_rtx" else
                "install TensorRT from NVIDIA (pip install tensorrt --extra-index-url https://pypi.nvidia.com)")
        raise BackendError(f"{name}: TensorRT builder module not installed | {hint}") from None
    except OSError as exc:  # the module's shared libraries did not load
        raise BackendError(f"{name}: installed but its libraries failed to load ({exc})") from None


def profile_shapes(manifest: Manifest, graph: str) -> dict:
    """min / opt / max shape of every input of a graph, from the manifest's limits."""
    m, g = manifest.model, manifest.graph(graph)
    kv = g["kv"]
    prompt = min(2 + m["max_history"] * (manifest.layout.max_item_tokens + 1), m["max_seq_len"])
    dims = {
        "batch": (1, 1, m["max_batch"]),
        "seq": (1, 1 + m["tree_size"], max(prompt, 1 + m["tree_size"] * max(1, m["tree_topk"]))),
        "past": (0, prompt, m["max_seq_len"]),
    }
    dims["past_plus_seq"] = tuple(dims["past"][i] + dims["seq"][i] for i in range(3))
    shapes = {}
    for name, t in g["inputs"].items():
        shapes[name] = [[d if isinstance(d, int) else dims[d][i] for d in t["shape"]] for i in range(3)]
    for i in range(kv["n_layers"]):
        for part in ("key", "value"):
            shapes[kv[f"{part}_input"] % i] = [[dims["batch"][j], kv["n_kv_heads"], dims["past"][j], kv["head_dim"]]
                                               for j in range(3)]
    return shapes


def _build_one(trt, manifest: Manifest, graph: str, opts: BuildOptions, cache_bytes: bytes | None):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    path = manifest.verify_file(manifest.graph(graph)["file"])
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{path}: {opts.builder} cannot parse it: {errors[:600]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    profile = builder.create_optimization_profile()
    shapes = profile_shapes(manifest, graph)
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    if opts.hardware_compatibility != "NONE":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, opts.hardware_compatibility)
    if opts.compute_capability:
        if not hasattr(config, "set_compute_capability"):
            raise InputError("compute_capability: only the tensorrt_rtx builder takes it")
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, opts.compute_capability.upper()), 0)
    if opts.timing_cache:
        config.set_timing_cache(config.create_timing_cache(cache_bytes or b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"{graph}: {opts.builder} failed to build the engine (see the builder's log above)")
    cache = bytes(config.get_timing_cache().serialize()) if opts.timing_cache else None
    return bytes(plan), cache, shapes


def build_engines(engine_dir, opts: BuildOptions = BuildOptions(), progress: bool = True) -> Manifest:
    """Build target.plan and draft.plan next to the ONNX graphs and record the build in the manifest."""
    if opts.hardware_compatibility not in ("NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"):
        raise InputError(f"hardware_compatibility: got {opts.hardware_compatibility!r} | "
                         "expected NONE, AMPERE_PLUS or SAME_COMPUTE_CAPABILITY")
    if opts.timing_cache and opts.builder == "tensorrt_rtx":
        raise InputError("timing_cache: TensorRT for RTX does not use a timing cache | drop --timing-cache")
    manifest = load_manifest(engine_dir)
    if opts.precision not in (None, manifest.precision):
        raise InputError(f"precision: got {opts.precision} | the graphs in {manifest.root} are {manifest.precision} "
                         f"and TensorRT builds them strongly typed | re-export with --precision {opts.precision}")
    quantized = [g for g in manifest.data["graphs"] if manifest.quantization(g)]
    if quantized:
        q = manifest.quantization(quantized[0])
        raise InputError(f"graphs.{quantized[0]}.quantization: {q['kind']} (ONNX Runtime's MatMulNBits) | TensorRT "
                         "cannot build ONNX Runtime's contrib ops | export without --quantize for TensorRT engines, "
                         "or run these with the onnxruntime backend")
    trt = import_builder(opts.builder)
    cache_path = Path(opts.timing_cache) if opts.timing_cache else None
    cache = cache_path.read_bytes() if cache_path and cache_path.exists() else None
    plans, profile = {}, {}
    # graphs in ONNX Runtime's own contrib ops (the fused target) have no TensorRT build: the standard ones do
    graphs = [g for g, spec in manifest.data["graphs"].items() if not spec.get("onnxruntime_only")]
    for graph in tqdm(graphs, desc=f"build ({opts.builder})", unit="engine", disable=not progress):
        plan, cache, shapes = _build_one(trt, manifest, graph, opts, cache)
        file = f"{graph}.plan"
        (manifest.root / file).write_bytes(plan)
        plans[graph] = file
        profile[graph] = {name: {"min": s[0], "opt": s[1], "max": s[2]} for name, s in shapes.items()}
    if cache_path:
        cache_path.write_bytes(cache)
    data = json.loads(json.dumps(manifest.data))
    data["tensorrt"] = {
        "builder": opts.builder, "builder_version": trt.__version__, "precision": manifest.precision,
        "version_compatible": opts.version_compatible, "hardware_compatibility": opts.hardware_compatibility,
        "embeds_host_code": opts.version_compatible, "plans": plans, "profile": profile,
    }
    if cache_path:
        data["tensorrt"]["timing_cache"] = str(cache_path)
    if opts.compute_capability:
        data["tensorrt"]["compute_capability"] = opts.compute_capability
    for file in plans.values():
        data["files"][file] = {}
    return write_manifest(manifest.root, data)
