"""The initializers a serialized ONNX model declares, read from its protobuf wire format (the runtime has no onnx
package): name, type, dims and where external data says their bytes lie. The manifest's weight entries are held
against these, so a manifest that names the wrong tensor cannot feed a session another tensor's bytes."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import IntegrityError

# field numbers of onnx.proto: ModelProto.graph, GraphProto.initializer and the TensorProto fields read here
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_DIMS, _DATA_TYPE, _NAME, _EXTERNAL_DATA = 1, 2, 8, 13
_GRAPH_NODE, _NODE_INPUT, _NODE_OP_TYPE = 1, 1, 4
COS_CACHE = 7  # GroupQueryAttention's input of the rotary cosines, a row per position


@dataclass(frozen=True)
class Initializer:
    data_type: int
    dims: tuple
    external: dict  # external_data's key -> value (location, offset, length); empty for a tensor inside the graph


def _varint(buf, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return value, i


def _fields(buf):
    """(field number, wire type, value) of one message: an int for varints and fixed widths, a memoryview else."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, i = int.from_bytes(buf[i:i + width], "little"), i + width
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated field")
        yield number, wire, value


def _tensor(buf) -> tuple[str, Initializer]:
    name, data_type, dims, external = "", 0, [], {}
    for number, wire, value in _fields(buf):
        if number == _NAME and wire == 2:
            name = bytes(value).decode()
        elif number == _DATA_TYPE and wire == 0:
            data_type = value
        elif number == _DIMS and wire == 0:
            dims.append(value)
        elif number == _DIMS and wire == 2:  # packed
            j = 0
            while j < len(value):
                d, j = _varint(value, j)
                dims.append(d)
        elif number == _EXTERNAL_DATA and wire == 2:
            entry = {n: bytes(v).decode() for n, w, v in _fields(value) if w == 2}
            external[entry.get(1, "")] = entry.get(2, "")
    return name, Initializer(data_type, tuple(dims), external)


def _graph_parts(model: bytes, label: str, number: int) -> list:
    """The main graph's fields of one number (initializers, nodes), each as its bytes."""
    try:
        graphs = [v for n, w, v in _fields(memoryview(model)) if n == _MODEL_GRAPH and w == 2]
        return [v for g in graphs for n, w, v in _fields(g) if n == number and w == 2]
    except ValueError as exc:
        raise IntegrityError(f"{label}: not a readable ONNX model ({exc}) | re-export the engines") from None


def initializers(model: bytes, label: str) -> dict:
    """name -> Initializer of every initializer of the model's main graph."""
    parts = _graph_parts(model, label, _GRAPH_INITIALIZER)
    try:
        return dict(_tensor(v) for v in parts)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{label}: not a readable ONNX model ({exc}) | re-export the engines") from None


def rotary_positions(model: bytes, label: str, declared: dict) -> int | None:
    """The fewest positions any GroupQueryAttention node's cosine table holds (its rows), where the tables are
    among `declared` (the model's initializers); None without such nodes."""
    tables = set()
    try:
        for node in _graph_parts(model, label, _GRAPH_NODE):
            fields = list(_fields(node))
            op = next((bytes(v).decode() for n, w, v in fields if n == _NODE_OP_TYPE and w == 2), "")
            inputs = [bytes(v).decode() for n, w, v in fields if n == _NODE_INPUT and w == 2]
            if op == "GroupQueryAttention" and len(inputs) > COS_CACHE:
                tables.add(inputs[COS_CACHE])
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{label}: not a readable ONNX model ({exc}) | re-export the engines") from None
    rows = [init.dims[0] for name, init in declared.items() if name in tables and init.dims]
    return min(rows) if rows else None
