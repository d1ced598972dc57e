"""The engine manifest: the only contract between exporter and runtime. Strict parsing, dotted-key errors.

Schema (format "padrec-engines", schema_version 1) is documented in docs/manifest.md.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import IntegrityError, ManifestError
from .grammar import SPECIAL_TOKENS, TokenLayout

FORMAT = "padrec-engines"
SCHEMA_VERSION = 2  # 2: the optional in-place graphs (target_gqa, draft_chain_gqa)
SUPPORTED_VERSIONS = (1, 2)
DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "bool")
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _fail(path: str, got, expected: str):
    raise ManifestError(f"manifest {path}: expected {expected}, got {got!r} | re-export the engines "
                        "with this padrec version")


def _obj(value, path: str, required: dict, optional: dict | None = None) -> dict:
    """Check an object's keys exactly and each value with its checker; returns the checked values."""
    if not isinstance(value, dict):
        _fail(path, type(value).__name__, "an object")
    optional = optional or {}
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        _fail(f"{path}.{unknown[0]}", "an unknown key", f"only {', '.join(sorted({**required, **optional}))}")
    out = {}
    for key, check in required.items():
        if key not in value:
            _fail(f"{path}.{key}", "nothing", "this key to be present")
        out[key] = check(value[key], f"{path}.{key}")
    for key, check in optional.items():
        if key in value:
            out[key] = check(value[key], f"{path}.{key}")
    return out


def _int(lo: int = 0, hi: int = 1 << 40):
    def check(v, path):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            _fail(path, v, f"an integer in {lo}..{hi}")
        return v
    return check


def _str(v, path):
    if not isinstance(v, str) or not v:
        _fail(path, v, "a non-empty string")
    return v


def _bool(v, path):
    if not isinstance(v, bool):
        _fail(path, v, "true or false")
    return v


def _num(v, path):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
        _fail(path, v, "a non-negative number")
    return float(v)


def _one_of(*choices):
    def check(v, path):
        if v not in choices:
            _fail(path, v, f"one of {', '.join(map(str, choices))}")
        return v
    return check


def _map(check_value):
    def check(v, path):
        if not isinstance(v, dict) or not v:
            _fail(path, v, "a non-empty object")
        return {k: check_value(x, f"{path}.{k}") for k, x in v.items()}
    return check


def _tensor(v, path):
    t = _obj(v, path, {"dtype": _one_of(*DTYPES), "shape": _shape})
    return t


def _shape(v, path):
    if not isinstance(v, list) or not all(isinstance(d, (str, int)) and not isinstance(d, bool) for d in v):
        _fail(path, v, "a list of dimension names or sizes")
    return v


def _file(v, path):
    f = _obj(v, path, {"sha256": _str, "bytes": _int()})
    if len(f["sha256"]) != 64:
        _fail(f"{path}.sha256", f["sha256"], "64 hex digits")
    return f


def _kv(v, path):
    # in_place: the whole cache (max_len positions) is bound as input and output, the graph writes new KV
    return _obj(v, path, {"key_input": _str, "value_input": _str, "key_output": _str, "value_output": _str,
                          "n_layers": _int(1, 1024), "n_kv_heads": _int(1, 1024),
                          "head_dim": _int(1, 4096), "dtype": _one_of(*DTYPES)},
                {"in_place": _bool, "max_len": _int(1, 1 << 20)})


# draft_chain: a greedy chain round's K draft steps in one call; target_gqa, draft_chain_gqa: the target and the
# chain round with ONNX Runtime's GroupQueryAttention writing the cache in place, for causal calls
# (padrec_export/fused.py, DraftChain.forward_in_place)
GRAPHS = ("target", "draft", "draft_chain", "target_gqa", "draft_chain_gqa")
IN_PLACE = {"target_gqa": "target", "draft_chain_gqa": "draft_chain"}  # in-place graph -> the graph it stands in for
_NEEDED = {  # graph -> (inputs, outputs) it must have
    "target": (("input_ids", "position_ids", "attention_mask"), ("logits", "hidden")),
    "draft": (("hidden_in", "input_ids", "position_ids", "step", "slot", "attention_mask"), ("logits", "hidden")),
    "draft_chain": (("hidden_in", "input_ids", "position_ids", "slot", "last", "node", "left", "banned",
                     "attention_mask"), ("tokens",)),
    "target_gqa": (("input_ids", "seqlens_k", "total_sequence_length"), ("logits", "hidden")),
    "draft_chain_gqa": (("hidden_in", "input_ids", "slot", "last", "node", "left", "banned", "seqlens_k",
                         "total_sequence_length"), ("tokens",)),
}


def _graph(v, path):
    g = _obj(v, path, {"file": _str, "hidden_size": _int(1, 1 << 16), "inputs": _map(_tensor),
                       "outputs": _map(_tensor), "kv": _kv, "tolerances": _map(_tolerance)},
             {"chain_steps": _int(1, 16), "onnxruntime_only": _bool})
    inputs, outputs = _NEEDED.get(path.rsplit(".", 1)[-1], _NEEDED["target"])
    for name in inputs:
        if name not in g["inputs"]:
            _fail(f"{path}.inputs.{name}", "nothing", "this input")
    for name in outputs:
        if name not in g["outputs"]:
            _fail(f"{path}.outputs.{name}", "nothing", "this output")
    return g


def _tolerance(v, path):
    return _obj(v, path, {"atol": _num, "rtol": _num})


def _layout(v, path):
    lay = _obj(v, path, {"levels": _int(1, 16), "codebook": _int(1, 1 << 16), "vocab_size": _int(1),
                         "special_tokens": lambda x, p: x})
    expected = TokenLayout(lay["levels"], lay["codebook"])
    if lay["vocab_size"] != expected.vocab_size:
        _fail(f"{path}.vocab_size", lay["vocab_size"], str(expected.vocab_size))
    if lay["special_tokens"] != list(SPECIAL_TOKENS):
        _fail(f"{path}.special_tokens", lay["special_tokens"], str(list(SPECIAL_TOKENS)))
    return lay


def _model(v, path):
    m = _obj(v, path, {"layout": _layout, "max_seq_len": _int(8, 1 << 20), "max_history": _int(1, 1 << 16),
                       "max_batch": _int(1, 1 << 16), "max_items": _int(1, 1 << 12), "n_items": _int(1, 1 << 12),
                       "draft_steps": _int(1, 16), "tree_topk": _int(1, 64), "tree_size": _int(1, 1024),
                       "catalogue": _str})
    if m["n_items"] > m["max_items"]:
        _fail(f"{path}.n_items", m["n_items"], f"at most max_items={m['max_items']}")
    return m


def _engines(v, path):
    return _obj(v, path, {"builder": _one_of("tensorrt", "tensorrt_rtx"), "builder_version": _str,
                          "precision": _one_of(*PRECISIONS), "version_compatible": _bool,
                          "hardware_compatibility": _str, "embeds_host_code": _bool,
                          "plans": _map(_str), "profile": _map(_map(_map(_shape)))},
                {"timing_cache": _str, "compute_capability": _str})


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked manifest and the directory it describes."""

    root: Path
    data: dict

    @property
    def layout(self) -> TokenLayout:
        lay = self.data["model"]["layout"]
        return TokenLayout(lay["levels"], lay["codebook"])

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

    @property
    def tensorrt(self) -> dict | None:
        return self.data.get("tensorrt")

    def path(self, file: str) -> Path:
        return self.root / file

    def verify_file(self, file: str) -> Path:
        """The file's path once its size and sha256 match the manifest."""
        entry = self.data["files"].get(file)
        if entry is None:
            raise ManifestError(f"manifest files.{file}: not listed | the manifest does not vouch for {file}")
        p = self.root / file
        if not p.is_file():
            raise IntegrityError(f"{p}: missing | the engine directory is incomplete; re-export or re-copy it")
        if p.stat().st_size != entry["bytes"]:
            raise IntegrityError(f"{p}: {p.stat().st_size} bytes, manifest says {entry['bytes']} | "
                                 "the file is truncated or replaced; re-export or re-copy it")
        if sha256(p) != entry["sha256"]:
            raise IntegrityError(f"{p}: sha256 differs from the manifest | the file was altered; "
                                 "re-export or re-copy it")
        return p

    def verify_all(self) -> None:
        for f in self.data["files"]:
            self.verify_file(f)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_manifest(data, root: Path = Path(".")) -> Manifest:
    """Check a manifest object strictly; raises ManifestError naming the dotted key."""
    if not isinstance(data, dict):
        _fail("(top)", type(data).__name__, "an object")
    if data.get("format") != FORMAT:
        _fail("format", data.get("format"), f"{FORMAT!r}")
    version = data.get("schema_version")
    if version not in SUPPORTED_VERSIONS:
        raise ManifestError(f"manifest schema_version: got {version!r} | this padrec reads versions "
                            f"{', '.join(map(str, SUPPORTED_VERSIONS))} | re-export with a matching padrec "
                            "or upgrade padrec")
    _obj(data, "(top)", {"format": _str, "schema_version": _int(), "producer": _map(_str),
                         "precision": _one_of(*PRECISIONS), "model": _model,
                         "graphs": _map(_graph), "files": _map(_file)}, {"tensorrt": _engines})
    unknown = sorted(set(data["graphs"]) - set(GRAPHS))
    if unknown or "target" not in data["graphs"]:
        _fail("graphs", sorted(data["graphs"]),
              "a target graph and optionally draft, draft_chain and the in-place target_gqa, draft_chain_gqa")
    for name in ("draft_chain", "draft_chain_gqa"):
        if name not in data["graphs"]:
            continue
        chain = data["graphs"][name]
        if "draft" not in data["graphs"]:
            _fail(f"graphs.{name}", "a chain graph without a draft", "a draft graph beside it")
        if "chain_steps" not in chain:
            _fail(f"graphs.{name}.chain_steps", "nothing", "the number of draft tokens per call")
        if chain["outputs"]["tokens"]["shape"][-1:] != [chain["chain_steps"]]:
            _fail(f"graphs.{name}.outputs.tokens.shape", chain["outputs"]["tokens"]["shape"],
                  f"['batch', {chain['chain_steps']}] (chain_steps)")
    for name, stands_for in IN_PLACE.items():
        if name not in data["graphs"]:
            continue
        if stands_for not in data["graphs"]:
            _fail(f"graphs.{name}", f"an in-place graph without {stands_for}", f"a {stands_for} graph beside it")
        kv = data["graphs"][name]["kv"]
        if not kv.get("in_place") or kv.get("max_len") != data["model"]["max_seq_len"]:
            _fail(f"graphs.{name}.kv", {k: kv.get(k) for k in ("in_place", "max_len")},
                  f"in_place true and max_len {data['model']['max_seq_len']} (model.max_seq_len)")
    for name, g in data["graphs"].items():
        if g["file"] not in data["files"]:
            _fail(f"graphs.{name}.file", g["file"], "a file listed under files")
        for key in ("key_input", "value_input", "key_output", "value_output"):
            if g["kv"][key].count("%d") != 1:
                _fail(f"graphs.{name}.kv.{key}", g["kv"][key], "a name template with one %d")
    if data["model"]["catalogue"] not in data["files"]:
        _fail("model.catalogue", data["model"]["catalogue"], "a file listed under files")
    return Manifest(Path(root), data)


def load_manifest(engine_dir, verify: bool = True) -> Manifest:
    """Read DIR/manifest.json, check it, and (by default) check every file's sha256."""
    root = Path(engine_dir)
    path = root / "manifest.json"
    if root.is_file():
        raise ManifestError(f"{root}: is a file | expected an engine directory holding manifest.json | pass the "
                            "directory `padrec export --out` wrote")
    if not root.exists():
        raise ManifestError(f"{root}: directory not found | expected an engine directory holding manifest.json | "
                            "check the path, or make one with `padrec export`")
    if not path.is_file():
        raise ManifestError(f"{path}: not found | point at an engine directory made by `padrec export`")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc}) | re-export the engines") from None
    m = parse_manifest(data, root)
    if verify:
        m.verify_all()
    return m


def write_manifest(engine_dir, data: dict) -> Manifest:
    """Hash every listed file, check the result as the runtime will, then write manifest.json."""
    root = Path(engine_dir)
    for f in list(data["files"]):
        p = root / f
        data["files"][f] = {"sha256": sha256(p), "bytes": p.stat().st_size}
    m = parse_manifest(data, root)
    (root / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
    return m
