"""Export of graphs too large to pass through the ONNX exporter with their weights (a 7B target: 13 GB in fp16,
which the exporter, onnxslim and protobuf would copy several times over): the graph is traced with its
parameters as inputs (seconds, a few MB), slimmed, then each weight - or what the exporter would have folded
from weights alone (a transpose, the q|k|v concatenation, a cast) - is computed in PyTorch one tensor at a
time and streamed into `<graph>.onnx.data`. Memory stays at the model plus one tensor."""
from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

# onnx TensorProto data types <-> torch
_TORCH = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 11: torch.float64, 7: torch.int64,
          6: torch.int32, 9: torch.bool, 2: torch.uint8, 3: torch.int8}
_ONNX = {v: k for k, v in _TORCH.items()}


def export_streamed(module: nn.Module, example: tuple, path: Path, names_in: list, names_out: list, dyn: dict,
                    opset: int) -> list[str]:
    """Write `path` and `<name>.data` for module (as onnx_export._export does); returns the data file's name."""
    import onnx
    wrapper = _WeightsAsInputs(module)
    params = {name: p.detach() for name, p in zip(wrapper.names, wrapper.weights)}
    with tempfile.TemporaryDirectory() as tmp, wrapper:
        traced = Path(tmp) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the weights as the traced function's inputs, not the module's parameters: the exporter then sees
            # only their shapes (given parameters, its shape inference serialises every one of them, twice)
            torch.onnx.export(wrapper, (*example, *params.values()), str(traced), input_names=names_in + wrapper.names,
                              output_names=names_out, dynamic_axes=dyn, opset_version=opset, dynamo=False,
                              do_constant_folding=False)
        model = _slim(onnx.load(str(traced)))
    weights = _Weights(model.graph, params)
    weights.fold()
    return [weights.write(model, path)]


class _WeightsAsInputs(nn.Module):
    """module(*inputs) with its weights passed in after the inputs: inside `with`, every parameter (a tied one in
    each module holding it) is a plain attribute that forward sets from its argument."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = (module,)  # a tuple: the wrapped module's parameters are not this one's
        self.names, self.weights, self.holders, index = [], [], [], {}
        for prefix, m in module.named_modules():
            for attr, p in m._parameters.items():
                if p is None:
                    continue
                if id(p) not in index:
                    index[id(p)] = len(self.names)
                    self.names.append(f"{prefix}.{attr}" if prefix else attr)
                    self.weights.append(p)
                    self.holders.append([])
                self.holders[index[id(p)]].append((m, attr))

    def __enter__(self):
        for holders in self.holders:
            for m, attr in holders:
                del m._parameters[attr]
        return self

    def __exit__(self, *exc):
        for p, holders in zip(self.weights, self.holders):
            for m, attr in holders:
                m.__dict__.pop(attr, None)
                m._parameters[attr] = p

    def forward(self, *args):
        n = len(self.names)
        for t, holders in zip(args[-n:], self.holders):
            for m, attr in holders:
                m.__dict__[attr] = t
        return self.inner[0](*args[:-n])


def _slim(model):
    """onnxslim over the weightless graph: it folds the shape arithmetic, which needs no weight."""
    try:
        import onnxslim
    except ImportError:  # optional, as in onnx_export.slim_graph
        return model
    return onnxslim.slim(model)


class _Weights:
    """The values of a graph computable from weights alone, each as a recipe (the node that makes it); fold()
    removes those nodes and write() turns the values the rest of the graph reads into initializers."""

    def __init__(self, graph, params: dict):
        self.graph, self.params = graph, params
        self.recipes: dict = {}  # value name -> ("param", name) | ("const", tensor) | (node, input names)
        for name in (i.name for i in graph.input):
            if name in params:
                self.recipes[name] = ("param", name)
        for init in graph.initializer:  # the exporter's own small constants (if any)
            self.recipes[init.name] = ("const", _tensor(init))

    def fold(self) -> None:
        """Take the weight-only nodes out of the graph (as recipes) and the weights out of its inputs."""
        keep = []
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.recipes[node.output[0]] = ("const", _tensor(node.attribute[0].t))
                keep.append(node)  # still a Constant for whatever else reads it; dropped below if unread
            elif node.op_type in _OPS and node.input and all(i in self.recipes or i == "" for i in node.input):
                for j, out in enumerate(node.output):
                    self.recipes[out] = (node, j)
            else:
                keep.append(node)
        read = {i for n in keep for i in n.input} | {o.name for o in self.graph.output}
        keep = [n for n in keep if n.op_type != "Constant" or n.output[0] in read]
        del self.graph.node[:]
        self.graph.node.extend(keep)
        # what the remaining graph reads of the weights: each becomes an initializer (Constant nodes stay as they are)
        reads = [*(i for n in keep for i in n.input), *(o.name for o in self.graph.output)]
        self.needed = [name for name in dict.fromkeys(reads) if name in self.recipes and self.recipes[name][0] != "const"]
        inputs = [i for i in self.graph.input if i.name not in self.params]
        del self.graph.input[:]
        self.graph.input.extend(inputs)

    def value(self, name: str, memo: dict) -> torch.Tensor:
        if name == "":
            return None
        if name in memo:
            return memo[name]
        recipe = self.recipes[name]
        if recipe[0] == "param":
            out = self.params[recipe[1]].detach()
        elif recipe[0] == "const":
            out = recipe[1]
        else:
            node, j = recipe
            device = next(iter(self.params.values())).device
            args = [self.value(i, memo) for i in node.input]
            args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
            out = _OPS[node.op_type](node, *args)
            out = out[j] if isinstance(out, tuple) else out
        memo[name] = out
        return out

    def key(self, name: str) -> tuple:
        """What a value is computed from: two values with one key are equal (deduplicated on write)."""
        recipe = self.recipes[name]
        if recipe[0] == "param":
            return recipe
        if recipe[0] == "const":
            t = recipe[1]
            return ("const", str(t.dtype), tuple(t.shape), hashlib.sha1(_bytes(t)).hexdigest())
        node, j = recipe
        attrs = tuple((a.name, a.SerializeToString()) for a in node.attribute)
        return (node.op_type, attrs, j, tuple(self.key(i) if i else "" for i in node.input))

    def write(self, model, path: Path) -> str:
        """Initializers for the needed values, their bytes appended to path.data one tensor at a time."""
        first: dict = {}
        renames: dict = {}
        with DataFile(path.with_name(path.name + ".data")) as data:
            for name in self.needed:
                k = self.key(name)
                if k in first:
                    renames[name] = first[k]
                    continue
                first[k] = name
                model.graph.initializer.append(data.add(name, self.value(name, {})))
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
        import onnx
        onnx.save(model, str(path))
        return data.path.name


INLINE_BYTES = 1024  # smaller tensors are written into the graph (onnx's own external-data writer does the same)


class DataFile:
    """An external data file written one tensor at a time: add() appends a tensor's bytes (64-byte aligned, as
    onnx's own writer aligns) and returns the initializer that points at them."""

    def __init__(self, path: Path):
        self.path, self.offset = Path(path), 0
        self.fh = open(self.path, "wb")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def add(self, name: str, t: torch.Tensor):
        from onnx import TensorProto
        raw = _bytes(t.contiguous())
        init = TensorProto(name=name, data_type=_ONNX[t.dtype], dims=list(t.shape))
        if len(raw) < INLINE_BYTES:  # shape constants stay in the graph: ONNX Runtime's shape inference reads them
            init.raw_data = raw  # and cannot read external data of a graph loaded from bytes
            return init
        pad = (-self.offset) % 64
        self.fh.write(b"\0" * pad)
        self.offset += pad
        self.fh.write(raw)
        init.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(raw)))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(raw)
        return init


def _tensor(proto) -> torch.Tensor:
    """A TensorProto's value as a torch tensor (bf16 from its bits: numpy has no bf16)."""
    from onnx import numpy_helper
    if proto.data_type == 16:
        bits = (np.frombuffer(proto.raw_data, dtype=np.uint16) if proto.raw_data else
                np.array(proto.int32_data, dtype=np.int64).astype(np.uint16))
        return torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16).reshape(tuple(proto.dims))
    return torch.from_numpy(np.array(numpy_helper.to_array(proto)))


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: its bits as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _attr(node, name: str, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _slice(node, x, starts, ends, axes=None, steps=None):
    axes = list(range(len(starts))) if axes is None else axes.tolist()
    steps = [1] * len(axes) if steps is None else steps.tolist()
    index = [slice(None)] * x.dim()
    for a, s, e, st in zip(axes, starts.tolist(), ends.tolist(), steps):
        if st != 1:
            raise NotImplementedError("strided slice of a weight")
        index[a] = slice(s, min(e, x.shape[a]))
    return x[tuple(index)]


def _gemm(node, a, b, c=None):
    a = a.t() if _attr(node, "transA", 0) else a
    b = b.t() if _attr(node, "transB", 0) else b
    alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
    if c is None:
        return alpha * (a @ b)
    return torch.addmm(c.expand(a.shape[0], b.shape[1]), a, b, beta=beta, alpha=alpha)  # as the exporter folds it


# the ops a weight-only subgraph of our models uses, in PyTorch (ONNX semantics; anything else stays in the graph)
_OPS = {
    "Identity": lambda n, x: x,
    "Transpose": lambda n, x: x.permute(*(_attr(n, "perm") or range(x.dim() - 1, -1, -1))),
    "Concat": lambda n, *xs: torch.cat(xs, dim=_attr(n, "axis")),
    "Cast": lambda n, x: x.to(_TORCH[_attr(n, "to")]),
    "Slice": _slice,
    "Gather": lambda n, x, i: torch.index_select(x, _attr(n, "axis", 0), i.flatten().long()).reshape(
        *x.shape[:_attr(n, "axis", 0)], *i.shape, *x.shape[_attr(n, "axis", 0) + 1:]),
    "MatMul": lambda n, a, b: a @ b,
    "Gemm": _gemm,
    "Add": lambda n, a, b: a + b,
    "Sub": lambda n, a, b: a - b,
    "Mul": lambda n, a, b: a * b,
    "Unsqueeze": lambda n, x, axes: x.reshape(_unsqueezed(x.shape, axes.tolist())),
    "Reshape": lambda n, x, shape: x.reshape([d if d != 0 else x.shape[i] for i, d in enumerate(shape.tolist())]),
}


def _unsqueezed(shape, axes) -> list:
    out = list(shape)
    rank = len(out) + len(axes)
    for a in sorted(a % rank for a in axes):
        out.insert(a, 1)
    return out
