"""The engine manifest: the only contract between exporter and runtime. One strict schema, dotted-key errors.

Schema (format "padrec-engines", schema_version 3) is documented in docs/manifest.md. Every value is checked
for type and range, every tensor against the one shape its name may have, every file name for confinement;
engine files are read through `Manifest.read` (padrec_runtime/integrity.py), which hands out the bytes it hashed.
"""
from __future__ import annotations

import os

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .schema import (MAX_DIM, MISSING, boolean, fail, file_entry, file_name, integer, listing, mapping, number,
                     obj, one_of, sha, shape, short, string, template)
from .errors import ManifestError
from .integrity import confined, parse_json, read_verified, sha256, verify
from .grammar import LAYOUT_KINDS, SPECIAL_TOKENS, Catalogue, TokenLayout

FORMAT = "padrec-engines"
SCHEMA_VERSION = 3  # 3: external data files, the chain graphs' `finite` flag and catalogue digest
SUPPORTED_VERSIONS = (3,)
DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "bool")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8, "bool": 1, "uint8": 1}
WEIGHT_DTYPES = DTYPES + ("uint8",)  # a quantized graph's weights: packed blocks and zero points are uint8
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
HARDWARE_COMPATIBILITY = ("NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY")
QUANT_KINDS = {"int4": 4, "int8": 8}  # weight-only quantization (MatMulNBits) -> bits per weight
QUANT_BLOCK_SIZES = (16, 32, 64, 128, 256)  # weights per scale that ONNX Runtime's MatMulNBits kernels take
QUANT_FAMILIES = (("target", "target_gqa"), ("draft", "draft_chain", "draft_chain_gqa"))  # graphs run as one model


# (key input, value input, key output, value output) of a layer's KV, by whether the graph writes its cache in place
KV_TEMPLATES = {False: ("past.%d.key", "past.%d.value", "new.%d.key", "new.%d.value"),
                True: ("cache.%d.key", "cache.%d.value", "cache.%d.key.out", "cache.%d.value.out")}


def _kv(v, path):
    # in_place: the whole cache (max_len positions) is bound as input and output, the graph writes new KV
    kv = obj(v, path, {"key_input": template, "value_input": template, "key_output": template,
                        "value_output": template, "n_layers": integer(1, 1024), "n_kv_heads": integer(1, 1024),
                        "head_dim": integer(1, 4096), "dtype": one_of(*DTYPES)},
              {"in_place": boolean, "max_len": integer(1, 1 << 20)})
    # the contract's names: the host cache reads past/new by these, so a swapped key and value would pass unseen
    want = KV_TEMPLATES[bool(kv.get("in_place"))]
    for key, name in zip(("key_input", "value_input", "key_output", "value_output"), want):
        if kv[key] != name:
            fail(f"{path}.{key}", kv[key], name + (" (an in-place graph)" if kv.get("in_place") else ""))
    return kv


def _trie(v, path):
    """The catalogue a chain graph was built from: its trie's node count and the digest of its codes."""
    return obj(v, path, {"nodes": integer(2, MAX_DIM - 2), "sha256": sha})


def trie_digest(catalogue: Catalogue) -> dict:
    """What a chain graph records of its catalogue (`graphs.draft_chain.catalogue`): the trie and every table
    of the graph follow from the semantic IDs in catalogue order."""
    sids = np.ascontiguousarray(catalogue.sids, dtype="<i8")
    return {"nodes": catalogue.n_nodes, "sha256": hashlib.sha256(sids.tobytes()).hexdigest()}


# draft_chain: a greedy chain round's K draft steps in one call; target_gqa, draft_chain_gqa: the target and the
# chain round with ONNX Runtime's GroupQueryAttention writing the cache in place, for causal calls
# (padrec_export/fused.py, DraftChain.forward_in_place)
GRAPHS = ("target", "draft", "draft_chain", "target_gqa", "draft_chain_gqa")
IN_PLACE = {"target_gqa": "target", "draft_chain_gqa": "draft_chain"}  # in-place graph -> the graph it stands in for
CHAINS = ("draft_chain", "draft_chain_gqa")
_IO = {  # graph -> (inputs, outputs) it has, exactly (KV tensors come from kv's templates)
    "target": (("input_ids", "position_ids", "attention_mask"), ("logits", "hidden")),
    "draft": (("hidden_in", "input_ids", "position_ids", "step", "slot", "attention_mask"), ("logits", "hidden")),
    "draft_chain": (("hidden_in", "input_ids", "position_ids", "slot", "last", "node", "left", "banned",
                     "attention_mask"), ("tokens", "finite")),
    "target_gqa": (("input_ids", "seqlens_k", "total_sequence_length"), ("logits", "hidden")),
    "draft_chain_gqa": (("hidden_in", "input_ids", "slot", "last", "node", "left", "banned", "seqlens_k",
                         "total_sequence_length"), ("tokens", "finite")),
}
# tensor -> (dtype, shape); "model": the engines' precision; HIDDEN, VOCAB, STEPS, NODES: the graph's hidden_size,
# the layout's vocabulary, chain_steps and the trie's nodes + 2 (the `banned` row)
HIDDEN, VOCAB, STEPS, NODES = "<hidden_size>", "<vocab_size>", "<chain_steps>", "<trie nodes + 2>"
TENSORS = {
    "input_ids": ("int32", ["batch", "seq"]), "position_ids": ("int32", ["batch", "seq"]),
    "step": ("int32", ["batch", "seq"]), "slot": ("int32", ["batch", "seq"]),
    "attention_mask": ("bool", ["batch", "seq", "past_plus_seq"]), "hidden_in": ("model", ["batch", "seq", HIDDEN]),
    "last": ("int32", ["batch"]), "node": ("int32", ["batch"]), "left": ("int32", ["batch"]),
    "seqlens_k": ("int32", ["batch"]), "banned": ("float16", ["batch", NODES]), "total_sequence_length": ("int32", []),
    "logits": ("float32", ["batch", "seq", VOCAB]), "hidden": ("model", ["batch", "seq", HIDDEN]),
    "tokens": ("int32", ["batch", STEPS]), "finite": ("bool", ["batch"]),
}


def _graph(v, path):
    name = path.rsplit(".", 1)[-1]
    g = obj(v, path, {"file": file_name, "hidden_size": integer(1, 1 << 16), "inputs": mapping(_tensor, 64),
                       "outputs": mapping(_tensor, 64), "kv": _kv, "tolerances": mapping(_tolerance, 8)},
             {"chain_steps": integer(1, 16), "onnxruntime_only": boolean, "catalogue": _trie,
              "external_data": listing(file_name, 256), "weights": listing(_weight, 1 << 16),
              "quantization": _quantization})
    if name not in _IO:
        return g  # an unknown graph: parse_manifest names it
    inputs, outputs = _IO[name]
    for side, names in (("inputs", inputs), ("outputs", outputs)):
        for missing in sorted(set(names) - set(g[side])):
            fail(f"{path}.{side}.{missing}", MISSING, f"this {side[:-1]}")
        for extra in sorted(set(g[side]) - set(names)):
            fail(f"{path}.{side}.{extra}", "an unknown tensor", f"only {', '.join(names)}")
    if name in CHAINS:
        for key in ("chain_steps", "catalogue"):
            if key not in g:
                fail(f"{path}.{key}", MISSING, "this key on a chain graph")
    return g


def _quantization(v, path):
    """Weight-only quantization of the graph's decoder-layer projections (MatMulNBits): kind and its bits, the
    weights per scale, asymmetric blocks (a zero point each), how many MatMuls it replaced."""
    q = obj(v, path, {"kind": one_of(*QUANT_KINDS), "bits": integer(1, 8), "block_size": integer(1, 1 << 12),
                      "symmetric": boolean, "matmuls": integer(1, 1 << 20)})
    if q["bits"] != QUANT_KINDS[q["kind"]]:
        fail(f"{path}.bits", q["bits"], f"{QUANT_KINDS[q['kind']]} (kind {q['kind']})")
    if q["block_size"] not in QUANT_BLOCK_SIZES:
        fail(f"{path}.block_size", q["block_size"], f"one of {', '.join(map(str, QUANT_BLOCK_SIZES))}")
    if q["symmetric"]:
        fail(f"{path}.symmetric", True, "false (padrec writes asymmetric blocks: a zero point per block)")
    return q


def _check_quantization(data: dict) -> None:
    """The graphs that stand in for one another (target and target_gqa; the draft and its chains) are quantized
    alike, or the runtime would switch between two different models; TensorRT builds no quantized graph."""
    for family in QUANT_FAMILIES:
        present = [g for g in family if g in data["graphs"]]
        settings = {g: {k: v for k, v in data["graphs"][g].get("quantization", {}).items() if k != "matmuls"}
                    for g in present}
        for g in present[1:]:
            if settings[g] != settings[present[0]]:
                fail(f"graphs.{g}.quantization", data["graphs"][g].get("quantization"),
                     f"the same quantization as graphs.{present[0]} ({settings[present[0]] or 'none'})")
    for graph in (data.get("tensorrt") or {}).get("plans", {}):
        if "quantization" in data["graphs"].get(graph, {}):
            fail(f"tensorrt.plans.{graph}", "a plan for a quantized graph",
                 "no TensorRT plan: MatMulNBits is an ONNX Runtime contrib op")


def _weight(v, path):
    """One external tensor: where its bytes lie in a data file of the graph (see backends/weights.py)."""
    w = obj(v, path, {"name": string, "file": file_name, "offset": integer(0, 1 << 42),
                      "length": integer(1, 1 << 42), "dtype": one_of(*WEIGHT_DTYPES),
                      "shape": listing(integer(0, 1 << 40), 8), "sha256": sha})
    elements = math.prod(w["shape"])  # Python ints: a product of huge dimensions cannot wrap to a small one
    if elements * DTYPE_BYTES[w["dtype"]] != w["length"]:
        fail(f"{path}.length", w["length"], f"{elements} x {DTYPE_BYTES[w['dtype']]} bytes ({w['dtype']} "
             f"{w['shape']})")
    return w


def _tensor(v, path):
    return obj(v, path, {"dtype": one_of(*DTYPES), "shape": shape})


def _tolerance(v, path):
    return obj(v, path, {"atol": number, "rtol": number})


def _check_tensors(name: str, g: dict, precision: str, vocab: int) -> None:
    """Every input and output has the one dtype and shape its name allows (sizes tied to the manifest's own)."""
    sizes = {HIDDEN: g["hidden_size"], VOCAB: vocab, STEPS: g.get("chain_steps"),
             NODES: g["catalogue"]["nodes"] + 2 if "catalogue" in g else None}
    for side in ("inputs", "outputs"):
        for tensor, t in g[side].items():
            dtype, shape = TENSORS[tensor]
            want_dtype = PRECISIONS[precision] if dtype == "model" else dtype
            want = [sizes.get(d, d) for d in shape]
            where = f"graphs.{name}.{side}.{tensor}"
            if t["dtype"] != want_dtype:
                fail(f"{where}.dtype", t["dtype"], want_dtype)
            if t["shape"] != want:
                fail(f"{where}.shape", t["shape"], str(want))
    if g["kv"]["dtype"] != PRECISIONS[precision]:
        fail(f"graphs.{name}.kv.dtype", g["kv"]["dtype"], f"{PRECISIONS[precision]} (the engines' precision)")
    taken = set(g["inputs"]) | set(g["outputs"])
    for key in ("key_input", "value_input", "key_output", "value_output"):
        if g["kv"][key] % 0 in taken:
            fail(f"graphs.{name}.kv.{key}", g["kv"][key], "a template naming no other input or output")


def _layout(v, path):
    """The token layout; `kind` left out (manifests written before layouts were a choice) means per_level."""
    lay = obj(v, path, {"levels": integer(1, 16), "codebook": integer(1, 1 << 16), "vocab_size": integer(1, MAX_DIM),
                         "special_tokens": listing(string, 16)}, {"kind": one_of(*LAYOUT_KINDS)})
    lay.setdefault("kind", "per_level")
    expected = TokenLayout(lay["levels"], lay["codebook"], lay["kind"])
    if lay["vocab_size"] != expected.vocab_size:
        fail(f"{path}.vocab_size", lay["vocab_size"], str(expected.vocab_size))
    if lay["special_tokens"] != list(SPECIAL_TOKENS):
        fail(f"{path}.special_tokens", lay["special_tokens"], str(list(SPECIAL_TOKENS)))
    return lay


def _model(v, path):
    m = obj(v, path, {"layout": _layout, "max_seq_len": integer(8, 1 << 20), "max_history": integer(1, 1 << 16),
                       "max_batch": integer(1, 1 << 16), "max_items": integer(1, 1 << 12), "n_items": integer(1, 1 << 12),
                       "draft_steps": integer(1, 16), "tree_topk": integer(1, 64), "tree_size": integer(1, 1024),
                       "catalogue": file_name})
    if m["n_items"] > m["max_items"]:
        fail(f"{path}.n_items", m["n_items"], f"at most max_items={m['max_items']}")
    return m


def _profile_shape(v, path):
    return listing(integer(0, 1 << 24), 4)(v, path)


def _engines(v, path):
    return obj(v, path, {"builder": one_of("tensorrt", "tensorrt_rtx"), "builder_version": string,
                          "precision": one_of(*PRECISIONS), "version_compatible": boolean,
                          "hardware_compatibility": one_of(*HARDWARE_COMPATIBILITY), "embeds_host_code": boolean,
                          "plans": mapping(file_name, 16), "profile": mapping(mapping(mapping(_profile_shape, 3), 4096), 16)},
                {"timing_cache": string, "compute_capability": string})


def _check_chains(data: dict) -> None:
    for name in CHAINS:
        if name not in data["graphs"]:
            continue
        if "draft" not in data["graphs"]:
            fail(f"graphs.{name}", "a chain graph without a draft", "a draft graph beside it")
    a, b = (data["graphs"].get(n, {}).get("catalogue") for n in CHAINS)
    if a and b and a != b:
        fail("graphs.draft_chain_gqa.catalogue", b, f"{a} (draft_chain's: both come from one catalogue)")


def _check_in_place(data: dict) -> None:
    for name, stands_for in IN_PLACE.items():
        if name not in data["graphs"]:
            continue
        if stands_for not in data["graphs"]:
            fail(f"graphs.{name}", f"an in-place graph without {stands_for}", f"a {stands_for} graph beside it")
        if data["graphs"][name].get("onnxruntime_only") is not True:  # ONNX Runtime contrib ops: no TensorRT plan
            fail(f"graphs.{name}.onnxruntime_only", data["graphs"][name].get("onnxruntime_only"), "true")
        kv = data["graphs"][name]["kv"]
        if not kv.get("in_place") or kv.get("max_len") != data["model"]["max_seq_len"]:
            fail(f"graphs.{name}.kv", {k: kv.get(k) for k in ("in_place", "max_len")},
                  f"in_place true and max_len {data['model']['max_seq_len']} (model.max_seq_len)")


def _check_files(data: dict) -> None:
    """Every file a graph, the catalogue or a plan names is listed under `files` (so it is hashed)."""
    named = {"model.catalogue": data["model"]["catalogue"]}
    for name, g in data["graphs"].items():
        named[f"graphs.{name}.file"] = g["file"]
        for i, ext in enumerate(g.get("external_data", [])):
            if PurePosixPath(ext).parent != PurePosixPath(g["file"]).parent:
                fail(f"graphs.{name}.external_data[{i}]", ext, f"a file beside {g['file']}")
            named[f"graphs.{name}.external_data[{i}]"] = ext
        for i, w in enumerate(g.get("weights", [])):
            where = f"graphs.{name}.weights[{i}]"
            if w["file"] not in g.get("external_data", []):
                fail(f"{where}.file", w["file"], f"one of graphs.{name}.external_data")
            size = data["files"].get(w["file"], {}).get("bytes", 0)
            if w["offset"] + w["length"] > size:
                fail(f"{where}.offset", w["offset"], f"a span of {w['length']} bytes inside {w['file']} ({size} bytes)")
        _check_spans(name, g.get("weights", []))
    build = data.get("tensorrt")
    if build is not None:
        for graph, g in data["graphs"].items():
            if not g.get("onnxruntime_only") and graph not in build["plans"]:
                fail(f"tensorrt.plans.{graph}", MISSING, "a plan for every graph that is not onnxruntime_only")
        for graph, plan in build["plans"].items():
            if graph not in data["graphs"]:
                fail(f"tensorrt.plans.{graph}", "a plan for no graph", f"one of {', '.join(data['graphs'])}")
            named[f"tensorrt.plans.{graph}"] = plan
    for where, file in named.items():
        if file not in data["files"]:
            fail(where, file, "a file listed under files")
    for file in data["files"]:
        file_name(file, f"files.{file}")


def _check_spans(graph: str, weights: list) -> None:
    """A graph's tensors lie in spans of their data files that do not overlap: an offset moved onto another
    tensor's bytes, or part of them, would feed a session the wrong weights (the data files are hashed whole,
    the spans only here)."""
    ends: dict = {}  # file -> (end of the last span, its index)
    for i in sorted(range(len(weights)), key=lambda i: (weights[i]["file"], weights[i]["offset"])):
        w = weights[i]
        end, j = ends.get(w["file"], (0, None))
        if w["offset"] < end:
            fail(f"graphs.{graph}.weights[{i}].offset", w["offset"], f"a span of {w['file']} clear of "
                 f"graphs.{graph}.weights[{j}] (bytes up to {end})")
        ends[w["file"]] = (w["offset"] + w["length"], i)


def parse_manifest(data, root: Path = Path("."), allow_outside: bool = False) -> "Manifest":
    """Check a manifest object strictly; raises ManifestError naming the dotted key. allow_outside: the
    caller trusts engine files that lie outside `root` (default: they are refused)."""
    if not isinstance(data, dict):
        fail("(top)", type(data).__name__, "an object")
    if data.get("format") != FORMAT:
        fail("format", data.get("format"), f"{FORMAT!r}")
    version = data.get("schema_version")
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise ManifestError(f"manifest schema_version: got {short(version)} | this padrec reads versions "
                            f"{', '.join(map(str, SUPPORTED_VERSIONS))} | re-export with a matching padrec "
                            "or upgrade padrec")
    obj(data, "(top)", {"format": string, "schema_version": integer(), "producer": mapping(string, 32),
                         "precision": one_of(*PRECISIONS), "model": _model,
                         "graphs": mapping(_graph, 8), "files": mapping(file_entry, 4096)}, {"tensorrt": _engines})
    unknown = sorted(set(data["graphs"]) - set(GRAPHS))
    if unknown or "target" not in data["graphs"]:
        fail("graphs", sorted(data["graphs"]),
              "a target graph and optionally draft, draft_chain and the in-place target_gqa, draft_chain_gqa")
    for name, g in data["graphs"].items():
        _check_tensors(name, g, data["precision"], data["model"]["layout"]["vocab_size"])
    if "tensorrt" in data and data["tensorrt"]["precision"] != data["precision"]:
        fail("tensorrt.precision", data["tensorrt"]["precision"], data["precision"])
    _check_chains(data)
    _check_in_place(data)
    _check_quantization(data)
    _check_files(data)
    return Manifest(Path(root), data, allow_outside)


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked manifest and the directory it describes."""

    root: Path
    data: dict
    allow_outside: bool = False  # engine files may lie outside root (the caller trusts where they point)
    checked: set = field(default_factory=set, compare=False)  # files whose bytes matched since the load

    @property
    def layout(self) -> TokenLayout:
        lay = self.data["model"]["layout"]
        return TokenLayout(lay["levels"], lay["codebook"], lay.get("kind", "per_level"))

    @property
    def model(self) -> dict:
        return self.data["model"]

    def graph(self, name: str) -> dict:
        if name not in self.data["graphs"]:
            raise ManifestError(f"manifest graphs.{name}: missing | export the {name} model")
        return self.data["graphs"][name]

    @property
    def precision(self) -> str:
        return self.data["precision"]

    def quantization(self, graph: str) -> dict | None:
        """The graph's weight-only quantization record (graphs.<graph>.quantization), None when it has none."""
        return self.graph(graph).get("quantization")

    @property
    def tensorrt(self) -> dict | None:
        return self.data.get("tensorrt")

    def path(self, file: str) -> Path:
        return confined(self.root, file, self.allow_outside)

    def _entry(self, file: str) -> dict:
        entry = self.data["files"].get(file)
        if entry is None:
            raise ManifestError(f"manifest files.{file}: not listed | the manifest does not vouch for {file}")
        return entry

    def read(self, file: str, mutable: bool = False):
        """The file's bytes, exactly those whose size and sha256 matched the manifest (IntegrityError if not):
        hand these to the engine, never the path. mutable: a bytearray (large external data, no extra copy)."""
        data = read_verified(self.root, file, self._entry(file), self.allow_outside, mutable)
        self.checked.add(file)
        return data

    def verify_file(self, file: str) -> Path:
        """The file's (confined) path once its size and sha256 match the manifest. For tools that must pass a
        path (the TensorRT builder); the runtime loads `read` bytes instead."""
        verify(self.root, file, self._entry(file), self.allow_outside)
        self.checked.add(file)
        return self.path(file)

    def verify_all(self) -> None:
        """Check every listed file not checked since the load (a file read through `read` was hashed as read)."""
        for f in self.data["files"]:
            if f not in self.checked:
                self.verify_file(f)

    def load_catalogue(self) -> Catalogue:
        """The catalogue, parsed from its checked bytes, and checked against the chain graphs built from it."""
        file = self.model["catalogue"]
        cat = Catalogue.from_json(parse_json(self.read(file), f"catalogue {file}"), self.layout)
        digest = trie_digest(cat)
        for name in CHAINS:
            want = self.data["graphs"].get(name, {}).get("catalogue")
            if want is not None and want != digest:
                raise ManifestError(f"{file}: trie of {digest['nodes']} nodes (codes sha256 {digest['sha256'][:12]}"
                                    f"...) | graphs.{name} was built from one of {want['nodes']} nodes (sha256 "
                                    f"{want['sha256'][:12]}...) | the catalogue and the chain graph come from "
                                    "different exports; re-export them together")
        return cat


def load_manifest(engine_dir, verify: bool = True, allow_outside: bool = False) -> Manifest:
    """Read DIR/manifest.json, check it, and (by default) check every file's sha256. allow_outside: engine
    files may lie outside DIR (default: refused, see docs/security.md)."""
    root = Path(engine_dir)
    path = root / "manifest.json"
    try:
        os.stat(root)
    except PermissionError:
        raise ManifestError(f"{root}: not readable by this user | check its permissions, or copy the engine "
                            "directory somewhere this user can read") from None
    except OSError:
        pass  # missing: said below
    if root.is_file():
        raise ManifestError(f"{root}: is a file | expected an engine directory holding manifest.json | pass the "
                            "directory `padrec export --out` wrote")
    if not root.exists():
        raise ManifestError(f"{root}: directory not found | expected an engine directory holding manifest.json | "
                            "check the path, or make one with `padrec export`")
    if path.exists() and not path.is_file():
        raise ManifestError(f"{path}: not a regular file | expected the JSON `padrec export` writes | re-export the "
                            "engine directory, or copy it again")
    if not path.is_file():
        raise ManifestError(f"{path}: not found | point at an engine directory made by `padrec export`")
    data = parse_json(confined(root, "manifest.json", allow_outside).read_bytes(), str(path))
    m = parse_manifest(data, root, allow_outside)
    if verify:
        m.verify_all()
    return m


def write_manifest(engine_dir, data: dict) -> Manifest:
    """Hash every listed file (streamed), check the result as the runtime will, then write manifest.json."""
    root = Path(engine_dir)
    for f in list(data["files"]):
        p = root / f
        data["files"][f] = {"sha256": sha256(p), "bytes": p.stat().st_size}
    m = parse_manifest(data, root)
    (root / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
    return m
