"""The standard target graph rewritten to hold each decoder layer's gate and up projections as the fused target
does: one MatMul over the gate|up tensor, split in two. The tensor's bytes are the fused target's, so the
runtime's weight pool (keyed by sha256) keeps one device copy of it for both graphs instead of gate, up and
gate|up (7.6 GB more at 7B). The two MatMuls are found by their weights' bytes, as quantization finds
projections. A graph with external data is rewritten one tensor at a time: memory stays at the model plus a
layer's gate|up."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .models import Target
from .quantize import _as_stored, _digest
from .streamed import DataFile, _TORCH, _tensor


def fuse_gate_up_graph(path: Path, target: Target, dtype: torch.dtype, external: bool | None) -> list[str]:
    """Rewrite the standard target graph at `path` (fuse_gate_up); returns its external data files. Inline
    weights are rewritten in memory and written by save_graph (`external` as there); external ones are copied
    into a new data file one at a time."""
    import onnx
    from .onnx_export import save_graph
    proto = onnx.load(str(path), load_external_data=False)
    folder, layers = path.parent, len(target.layers)
    if not any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer):
        fused = fuse_gate_up(proto, target, dtype, read=_tensor, add=_inline)
        _warn_unless_all(path, fused, layers)
        return save_graph(proto, path, external)
    data = path.with_name(path.name + ".data")
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        with DataFile(Path(tmp) / data.name) as out:  # the same file name: the location the graph records
            written: set = set()

            def add(name, t):
                written.add(name)
                return out.add(name, t)
            fused = fuse_gate_up(proto, target, dtype, read=lambda init: stored(init, folder), add=add)
            for init in proto.graph.initializer:
                if init.name not in written and init.data_location == onnx.TensorProto.EXTERNAL:
                    init.CopyFrom(out.add(init.name, stored(init, folder)))
        os.replace(out.path, data)
    onnx.save(proto, str(path))
    _warn_unless_all(path, fused, layers)
    return [data.name]


def fuse_gate_up(proto, target: Target, dtype: torch.dtype, read: Callable, add: Callable) -> int:
    """Each layer's gate and up MatMuls of the graph (`proto`; `read(initializer)` gives a weight as a tensor)
    replaced by one MatMul over gate|up (`add(name, tensor)` makes its initializer) and a Split whose outputs
    are theirs. A layer whose pair is not found (or is one MatMul: gate and up the same bytes) is left as it is.
    Returns the layers rewritten."""
    from onnx import helper
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    layer0 = target.layers[0]
    shape = [layer0.gate_proj.in_features, layer0.gate_proj.out_features]  # (in, out): as a graph stores it
    users: dict = {}  # digest -> the MatMuls reading a weight of gate's stored shape (the others are never read)
    for node in g.node:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if init is not None and list(init.dims) == shape:
            users.setdefault(_digest(read(init)), []).append(node)
    fused = 0
    for i, layer in enumerate(target.layers):
        gate = users.get(_digest(_as_stored([layer.gate_proj], dtype)), [])
        up = users.get(_digest(_as_stored([layer.up_proj], dtype)), [])
        if len(gate) != 1 or len(up) != 1 or gate[0] is up[0] or gate[0].input[0] != up[0].input[0]:
            continue
        gate, up = gate[0], up[0]
        both, n = f"l{i}.gate_up", layer.gate_proj.out_features
        g.initializer.extend([add(both, _as_stored([layer.gate_proj, layer.up_proj], dtype)),
                              add(f"{both}.split", torch.tensor([n, n], dtype=torch.int64))])
        at = min(list(g.node).index(gate), list(g.node).index(up))  # both outputs' readers come after it
        new = [helper.make_node("MatMul", [gate.input[0], both], [f"{both}.out"], name=both),
               helper.make_node("Split", [f"{both}.out", f"{both}.split"], [gate.output[0], up.output[0]],
                                name=f"{both}.split", axis=-1)]
        g.node.remove(gate)
        g.node.remove(up)
        for k, node in enumerate(new):
            g.node.insert(at + k, node)
        fused += 1
    _drop_unused(g)
    return fused


def stored(init, folder: Path) -> torch.Tensor:
    """An external initializer's value, read from its span of the data file alone."""
    where = {e.key: e.value for e in init.external_data}
    dtype = _TORCH[init.data_type]
    raw = np.fromfile(folder / where["location"], dtype=np.uint8, count=int(where["length"]),
                      offset=int(where.get("offset", 0)))
    return torch.from_numpy(raw).view(dtype).reshape(tuple(init.dims))


def _inline(name: str, t: torch.Tensor):
    from onnx import numpy_helper
    return numpy_helper.from_array(t.numpy(), name)


def _drop_unused(g) -> None:
    """Initializers no node reads any more, and their entries among the graph's inputs (old IRs list them)."""
    read = {name for node in g.node for name in node.input} | {o.name for o in g.output}
    dropped = {i.name for i in g.initializer if i.name not in read}
    for field in (g.initializer, g.input):
        keep = [x for x in field if x.name not in dropped]
        del field[:]
        field.extend(keep)


def _warn_unless_all(path: Path, fused: int, layers: int) -> None:
    if fused < layers:  # the graph still computes the model; the card just holds those layers' gate and up twice
        warnings.warn(f"{path.name}: gate|up shared with the fused target in {fused} of {layers} layers (the "
                      "others' gate and up MatMuls were not found by their weights' bytes, or are one MatMul)")
