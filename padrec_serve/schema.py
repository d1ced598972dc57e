"""The served model's tensors and the one validation of a request: Triton arrays in, a checked Job out."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from padrec_runtime import DecodeParams
from padrec_runtime.errors import InputError

MODEL_NAME = "padrec"  # the model's name on the server (/v2/models/padrec)
SPECULATE = ("auto", "off", "chain", "tree")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the served model (shape without Triton's batch dimension)."""

    name: str
    dtype: type
    shape: tuple
    optional: bool = False


INPUTS = (
    TensorSpec("history", np.int64, (-1,)),  # item ids, oldest first; the length is the tensor's own
    TensorSpec("n_items", np.int32, (1,), optional=True),
    TensorSpec("speculate", np.bytes_, (1,), optional=True),  # auto | off | chain | tree
    TensorSpec("greedy", np.bool_, (1,), optional=True),
    TensorSpec("temperature", np.float32, (1,), optional=True),
    TensorSpec("top_k", np.int32, (1,), optional=True),
    TensorSpec("top_p", np.float32, (1,), optional=True),
    TensorSpec("seed", np.int64, (1,), optional=True),
)
OUTPUTS = (
    TensorSpec("item_ids", np.int64, (-1,)),  # the list, best first
    TensorSpec("sids", np.int32, (-1, -1)),  # (items, levels) semantic IDs
    TensorSpec("titles", np.bytes_, (-1,)),  # empty strings where the catalogue has no titles
    TensorSpec("tau", np.float32, (1,)),  # tokens per target pass of the batch this request was decoded in
)


@dataclass(frozen=True)
class Job:
    """One checked history and how to decode it; jobs with equal (n_items, params) decode as one batch."""

    history: tuple
    n_items: int
    params: DecodeParams


def _scalar(req: dict, name: str, kinds: str, default, rows: int):
    """The one value of an optional (1,)-shaped input: (rows, 1), one value per history row, all equal."""
    if name not in req:
        return default
    a = np.asarray(req[name])
    values = a.reshape(-1).tolist()  # Python scalars (bytes and str as they are)
    if a.dtype.kind == "O" and not all(isinstance(v, (bytes, str)) for v in values):
        raise InputError(f"{name}: got objects other than strings ({values[:4]!r:.80}) | expected "
                         f"{kinds_name(kinds)} | send the documented type")
    if a.shape != (rows, 1) or len({repr(v) for v in values}) != 1:  # repr: two NaNs are the same value
        raise InputError(f"{name}: got {values[:8]!r:.120} of shape {list(a.shape)} | expected one value per history "
                         f"row ({rows}), the same for all rows | send [[value]] per row, or one request per setting")
    if a.dtype.kind not in kinds:
        raise InputError(f"{name}: got dtype {a.dtype} | expected {kinds_name(kinds)} | send the documented type")
    v = values[0]
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def kinds_name(kinds: str) -> str:
    return {"iu": "an integer", "f": "a float", "fiu": "a number", "b": "a bool", "SOU": "a string"}.get(kinds, kinds)


def parse_params(req: dict, limits: dict, has_draft: bool, calibrated: bool,
                 deadline_s: float | None = None, rows: int = 1) -> tuple:
    """(n_items, DecodeParams) of one request, every value checked against the engines' limits (speculate
    defaults to auto on a calibrated server, else to the engines' chain); the server's deadline goes along. rows:
    the request's history rows, each of which carries the same value of every setting."""
    n_items = _scalar(req, "n_items", "iu", limits["n_items"], rows)
    if not 1 <= n_items <= limits["max_items"]:
        raise InputError(f"n_items: got {n_items} | expected 1..{limits['max_items']} | ask for that many items")
    default = "off" if not has_draft else "auto" if calibrated else "chain"
    speculate = _scalar(req, "speculate", "SOU", default, rows)
    if speculate not in SPECULATE:
        raise InputError(f"speculate: got {speculate!r:.40} | expected one of {', '.join(SPECULATE)}")
    if speculate != "off" and not has_draft:
        raise InputError(f"speculate: got {speculate!r} | these engines have no draft | send 'off'")
    if speculate == "auto" and not calibrated:
        raise InputError("speculate: got 'auto' | the server was started with --no-calibrate | send off, chain or "
                         "tree, or restart the server with --calibrate")
    greedy = _scalar(req, "greedy", "b", True, rows)
    temperature = _scalar(req, "temperature", "f", 1.0, rows)
    if not (np.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature: got {temperature} | expected a finite value > 0")
    top_k = _scalar(req, "top_k", "iu", 0, rows)
    if top_k < 0:
        raise InputError(f"top_k: got {top_k} | expected >= 0 (0 keeps every allowed token)")
    top_p = _scalar(req, "top_p", "f", 1.0, rows)
    if not (np.isfinite(top_p) and 0 < top_p <= 1):
        raise InputError(f"top_p: got {top_p} | expected 0 < top_p <= 1")
    seed = _scalar(req, "seed", "iu", 0, rows)
    if seed < 0:
        raise InputError(f"seed: got {seed} | expected >= 0")
    if greedy:  # sampling settings do not change a greedy list: one group for all greedy requests
        temperature, top_k, top_p, seed = 1.0, 0, 1.0, 0
    return int(n_items), DecodeParams(speculate=speculate, greedy=bool(greedy), temperature=float(temperature),
                                      top_k=int(top_k), top_p=float(top_p), seed=int(seed), deadline_s=deadline_s)


def parse_histories(req: dict, limits: dict, known: dict) -> list:
    """The histories of one request: (rows, length) integer ids, each row non-empty, known, without repeats."""
    if "history" not in req:
        raise InputError("history: missing | send the item ids as INT64 [[id, id, ...]]")
    a = np.asarray(req["history"])
    if a.dtype.kind not in "iu":
        raise InputError(f"history: got dtype {a.dtype} | expected INT64 item ids | send integers")
    if a.ndim != 2:
        raise InputError(f"history: got shape {list(a.shape)} | expected (rows, length) | send [[id, id, ...]]")
    if a.shape[0] == 0:
        raise InputError("history: no rows | send one row of item ids per user: [[id, id, ...]]")
    if a.shape[1] == 0:
        raise InputError("history: empty | give at least one item the user interacted with")
    if a.shape[1] > limits["max_history"]:
        raise InputError(f"history: {a.shape[1]} items | the engines take at most {limits['max_history']}; "
                         "keep the most recent ones")
    out = []
    for row in a.tolist():
        unknown = [i for i in row if i not in known]
        if unknown:
            raise InputError(f"history: unknown item ids {unknown[:10]} | use ids from the engine's catalogue")
        if len(set(row)) != len(row):
            raise InputError("history: item ids repeat | give each item once")
        out.append(tuple(row))
    return out


def parse_request(req: dict, limits: dict, known: dict, has_draft: bool, calibrated: bool,
                  deadline_s: float | None = None) -> list:
    """Jobs of one Triton request (a request of b rows is b histories with the same params)."""
    extra = sorted(set(req) - {s.name for s in INPUTS})
    if extra:
        raise InputError(f"inputs: unknown {extra} | expected {[s.name for s in INPUTS]}")
    histories = parse_histories(req, limits, known)
    n_items, params = parse_params(req, limits, has_draft, calibrated, deadline_s, len(histories))
    return [Job(h, n_items, params) for h in histories]
