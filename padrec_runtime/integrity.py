"""Engine files read once and checked as they are read: confined to the engine directory, sized and hashed.

The bytes a caller gets are the bytes that were hashed, so nothing can swap a file between the check and
its use (the runtime hands these bytes to ONNX Runtime, TensorRT and the JSON parser; it never reopens a
checked file by name).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import IntegrityError, ManifestError

CHUNK = 1 << 20  # bytes hashed per read: large files are streamed, never hashed in one piece


def confined(root: Path, name: str, allow_outside: bool = False) -> Path:
    """root / name with symlinks resolved; outside root (`..`, an absolute path, a symlink out) it raises
    IntegrityError before touching the file, so the error says nothing about files elsewhere."""
    try:
        path = (Path(root) / name).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13), a path past the OS's
        raise IntegrityError(f"{Path(root) / name}: cannot be resolved ({type(exc).__name__}: {str(exc)[:120]}) | "
                             "re-copy the engines without the looping symlink") from None
    if allow_outside:
        return path
    top = Path(root).resolve()
    if path != top and top not in path.parents:
        raise IntegrityError(f"{name}: outside the engine directory {root} | engine files must lie inside it "
                             "(no '..', absolute paths or symlinks out); copy them in, or opt in with "
                             "allow_outside=True if you trust where they point")
    return path


def _open(root: Path, name: str, allow_outside: bool):
    path = confined(root, name, allow_outside)
    # a regular file before opening it: opening a named pipe would block until someone writes to it
    if path.exists() and not path.is_file():
        raise IntegrityError(f"{Path(root) / name}: not a regular file | re-export or re-copy the engines")
    try:
        f = open(path, "rb")
    except OSError:
        raise IntegrityError(f"{Path(root) / name}: missing or unreadable | the engine directory is incomplete; "
                             "re-export or re-copy it") from None
    if not os.path.isfile(path):  # swapped for something else between the check and the open
        f.close()
        raise IntegrityError(f"{Path(root) / name}: not a regular file | re-export or re-copy the engines")
    return f


def _read_checked(f, into: memoryview, label: str, entry: dict) -> None:
    """Fill `into` from f, hashing each chunk as it lands; the file must end exactly there."""
    h, pos, size = hashlib.sha256(), 0, len(into)
    while pos < size:
        n = f.readinto(into[pos:pos + CHUNK])
        if not n:
            break
        h.update(into[pos:pos + n])
        pos += n
    if pos != size or f.read(1):
        raise IntegrityError(f"{label}: changed size while it was read | something is writing the engine "
                             "directory; stop it and re-copy the engines")
    if h.hexdigest() != entry["sha256"]:
        raise IntegrityError(f"{label}: sha256 differs from the manifest | the file was altered; "
                             "re-export or re-copy it")


def _listed_size(f, label: str, entry: dict) -> int:
    """The open file's size, once it is the size the manifest lists."""
    size = os.fstat(f.fileno()).st_size
    if size != entry["bytes"]:
        raise IntegrityError(f"{label}: {size} bytes, manifest says {entry['bytes']} | "
                             "the file is truncated or replaced; re-export or re-copy it")
    return size


def read_verified(root: Path, name: str, entry: dict, allow_outside: bool = False, mutable: bool = False):
    """The file's contents once their size and sha256 match `entry` ({"sha256", "bytes"}): bytes, or a
    bytearray with `mutable` (filled in place: no second copy of a large external data file)."""
    label = str(Path(root) / name)
    with _open(root, name, allow_outside) as f:
        size = _listed_size(f, label, entry)
        buf = bytearray(size)
        _read_checked(f, memoryview(buf), label, entry)
    return buf if mutable else bytes(buf)


def verify(root: Path, name: str, entry: dict, allow_outside: bool = False) -> None:
    """Check a file's size and sha256 against `entry`, streaming it (constant memory)."""
    label = str(Path(root) / name)
    with _open(root, name, allow_outside) as f:
        size = _listed_size(f, label, entry)
        h, left = hashlib.sha256(), size
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
            left -= len(block)
        if left != 0:
            raise IntegrityError(f"{label}: changed size while it was read | re-copy the engines")
        if h.hexdigest() != entry["sha256"]:
            raise IntegrityError(f"{label}: sha256 differs from the manifest | the file was altered; "
                                 "re-export or re-copy it")


def sha256(path: Path) -> str:
    """A file's sha256, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are all different: with a key twice, which one counts is the parser's choice."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = [k for i, (k, _) in enumerate(pairs) if k in (p for p, _ in pairs[:i])]
        raise ValueError(f"key {seen[0]!r} appears more than once in one object")
    return out


def parse_json(raw: bytes, label: str):
    """JSON from checked bytes; malformed or absurdly nested text is a ManifestError. (The decoder itself
    raises RecursionError past Python's recursion limit: no valid engine file nests more than a few levels.)"""
    try:
        return json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{label}: not valid JSON ({str(exc)[:200]}) | re-export the engines") from None
    except RecursionError:
        raise ManifestError(f"{label}: JSON nested too deeply | expected the few levels padrec writes; "
                            "re-export the engines") from None
