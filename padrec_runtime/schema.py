"""The checkers both engine-directory schemas (manifest.json, catalogue.json) are written with: each takes a
value and its dotted path, returns the checked value or raises ManifestError naming the path."""
from __future__ import annotations

import math
import re
from pathlib import PurePosixPath

from .errors import ManifestError

DIMS = ("batch", "seq", "past", "past_plus_seq")  # the symbolic dimension names a shape may use
MAX_DIM = 1 << 24  # any fixed dimension (vocabulary, hidden size, trie width) stays below this
TEMPLATE = re.compile(r"[A-Za-z0-9_.:/-]{0,100}%d[A-Za-z0-9_.:/-]{0,100}")


def short(v) -> str:
    """repr of a value, cut short (a hostile manifest may hold megabytes in one value)."""
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


MISSING = object()  # what `fail` is given for a key that is not there


def fail(path: str, got, expected: str):
    where = "top level" if path == "(top)" else path.removeprefix("(top).")
    got = "no such key" if got is MISSING else short(got)
    raise ManifestError(f"manifest {short(where)[1:-1]}: got {got} | expected {expected} | the file was edited or "
                        "written by another padrec version: restore it, or re-export the engines with this one")


def obj(value, path: str, required: dict, optional: dict | None = None) -> dict:
    """Check an object's keys exactly and each value with its checker; returns the checked values."""
    if not isinstance(value, dict):
        fail(path, type(value).__name__, "an object")
    optional = optional or {}
    unknown = sorted(set(value) - set(required) - set(optional), key=str)
    if unknown:
        fail(f"{path}.{unknown[0]}", "an unknown key", f"only {', '.join(sorted({**required, **optional}))}")
    out = {}
    for key, check in required.items():
        if key not in value:
            fail(f"{path}.{key}", MISSING, "this key to be present")
        out[key] = check(value[key], f"{path}.{key}")
    for key, check in optional.items():
        if key in value:
            out[key] = check(value[key], f"{path}.{key}")
    return out


def integer(lo: int = 0, hi: int = 1 << 40):
    def check(v, path):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            fail(path, v, f"an integer in {lo}..{hi}")
        return v
    return check


def string(v, path):
    if not isinstance(v, str) or not 0 < len(v) <= 200:
        fail(path, v, "a non-empty string of at most 200 characters")
    return v


def boolean(v, path):
    if not isinstance(v, bool):
        fail(path, v, "true or false")
    return v


def number(v, path):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not 0 <= v <= 1e3:
        fail(path, v, "a finite number in 0..1000")
    return float(v)


def one_of(*choices):
    def check(v, path):
        if not isinstance(v, str) or v not in choices:
            fail(path, v, f"one of {', '.join(map(str, choices))}")
        return v
    return check


def mapping(check_value, max_len: int = 4096):
    def check(v, path):
        if not isinstance(v, dict) or not 0 < len(v) <= max_len:
            fail(path, v, f"a non-empty object of at most {max_len} keys")
        return {k: check_value(x, f"{path}.{k}") for k, x in v.items()}
    return check


def listing(check_item, max_len: int = 64):
    def check(v, path):
        if not isinstance(v, list) or len(v) > max_len:
            fail(path, v, f"a list of at most {max_len} entries")
        return [check_item(x, f"{path}[{i}]") for i, x in enumerate(v)]
    return check


def shape(v, path):
    """A shape: at most 4 entries, each a known dimension name or a size in 1..MAX_DIM."""
    def dim(d, p):
        if isinstance(d, str) and d in DIMS:
            return d
        if isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_DIM:
            return d
        fail(p, d, f"one of {', '.join(DIMS)} or a size in 1..{MAX_DIM}")
    return listing(dim, 4)(v, path)


def file_name(v, path):
    """A relative POSIX path inside the engine directory: no '..', no absolute path, no backslash."""
    string(v, path)
    p = PurePosixPath(v)
    if p.is_absolute() or ".." in p.parts or "\\" in v or "\0" in v or v.startswith("~") or str(p) != v:
        fail(path, v, "a plain relative file name inside the engine directory (no '..' or absolute path)")
    return v


def sha(v, path):
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{64}", v):
        fail(path, v, "64 lowercase hex digits")
    return v


def file_entry(v, path):
    return obj(v, path, {"sha256": sha, "bytes": integer(0, 1 << 42)})


def template(v, path):
    if not isinstance(v, str) or not TEMPLATE.fullmatch(v) or v.count("%") != 1:
        fail(path, v, "a tensor name template with one %d and no other % (e.g. past.%d.key)")
    return v
