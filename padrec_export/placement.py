"""Where ONNX Runtime's CUDA provider would run each node of a graph, as far as CUDA-graph capture cares.

A CUDA session captures a CUDA graph only if no data crosses between host and device inside the graph (ONNX
Runtime refuses a graph with Memcpy nodes; shape arithmetic on the CPU is allowed). Its CUDA provider runs the
shape arithmetic that follows a Shape / Size node on the CPU (`GetCpuPreferredNodes` in ONNX Runtime's
fallback_cpu_capability.cc): a node moves there when every input is a CPU value, a small initializer (at most
100 elements) or a graph input, none is fp16 / bf16 or absent, and none of its CPU values is an input the CUDA
kernel itself reads on the host (a Reshape's shape, a Slice's bounds). `crossings` follows that rule and names
every place where data would be copied inside the graph: a CPU value into device work, a device value into an
input read on the host, a graph input (bound on the device) into the CPU, a CPU value as a graph output. With
none, a session with only the cache length fixed (`graph_sessions="per_graph"`) can capture each bucket shape.
It models the kernels the exported graphs use; ops without a CUDA kernel, and control flow (which ONNX Runtime
never captures), are reported rather than placed.
"""
from __future__ import annotations

import heapq
import math

import onnx
from onnx import TensorProto

# inputs that ONNX Runtime's CUDA kernels read on the host (their kernel definitions' OrtMemTypeCPUInput)
HOST_INPUTS = {"Reshape": {1}, "Expand": {1}, "ConstantOfShape": {0}, "Tile": {1}, "Slice": {1, 2, 3, 4},
               "Unsqueeze": {1}, "Squeeze": {1}, "Split": {1}, "Range": {0, 1, 2}, "ReduceSum": {1},
               "ReduceMean": {1}, "ReduceMax": {1}, "TopK": {1}, "Pad": {1, 2, 3}, "OneHot": {1}, "CumSum": {1},
               "Resize": {1, 2, 3}, "GroupQueryAttention": {6}, "Clip": {1, 2}, "Trilu": {1}, "Dropout": {1, 2},
               **{f"Reduce{r}": {1} for r in ("Min", "Prod", "L1", "L2", "LogSumExp", "SumSquare")}}
CONTROL_FLOW = {"If", "Loop", "Scan"}  # ONNX Runtime refuses to capture a graph holding any of them
HOST_OUTPUTS = {"Shape", "Size"}  # kernels whose output lies in host memory
SMALL = 100  # elements: ONNX Runtime's small-initializer threshold
_HALF = {TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _constants(graph) -> tuple[set, dict]:
    """Names of small initializers and Constant outputs, and the element type of every constant."""
    small, types = set(), {}
    for init in graph.initializer:
        types[init.name] = init.data_type
        if math.prod(init.dims) <= SMALL:
            small.add(init.name)
    for node in graph.node:
        if node.op_type != "Constant" or not node.attribute:
            continue
        attr = node.attribute[0]
        if attr.name == "value":
            types[node.output[0]] = attr.t.data_type
            size = math.prod(attr.t.dims)
        else:  # value_int(s) / value_float(s) / value_string(s): a scalar or a short list
            size = max(len(attr.ints), len(attr.floats), len(attr.strings), 1)
        if size <= SMALL:
            small.add(node.output[0])
    return small, types


def cpu_nodes(model: onnx.ModelProto) -> tuple[list, set]:
    """(indices into the graph's non-Constant nodes that run on the CPU, the values that live on the CPU)."""
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    small, types = _constants(g)
    types.update({v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)})
    inputs = {i.name for i in g.input} - {i.name for i in g.initializer}
    nodes = [n for n in g.node if n.op_type != "Constant"]
    consumers: dict = {}
    for k, n in enumerate(nodes):
        for name in n.input:
            consumers.setdefault(name, []).append(k)
    on_cpu, values, queue, seen = [], set(), [], set()

    def moved(k: int) -> None:  # node k's outputs are CPU values; their consumers are candidates
        values.update(nodes[k].output)
        for out in nodes[k].output:
            for c in consumers.get(out, []):
                heapq.heappush(queue, c)  # in graph order, as ONNX Runtime visits them
    for k, n in enumerate(nodes):
        if n.op_type in HOST_OUTPUTS:
            moved(k)
    while queue:
        k = heapq.heappop(queue)
        if k in seen:
            continue
        seen.add(k)
        n = nodes[k]
        host = HOST_INPUTS.get(n.op_type, set())
        if all(name and types.get(name) not in _HALF
               and (name in small or name in inputs or (name in values and i not in host))
               for i, name in enumerate(n.input)):  # an absent optional input keeps a node on the device
            on_cpu.append(k)
            moved(k)
    return on_cpu, values


def crossings(model: onnx.ModelProto) -> list[str]:
    """Every place where data would cross between host and device inside the graph (see the module's doc)."""
    on_cpu, values = cpu_nodes(model)
    g = model.graph
    nodes = [n for n in g.node if n.op_type != "Constant"]
    small, _ = _constants(g)
    inputs = {i.name for i in g.input} - {i.name for i in g.initializer}
    cpu, found, host_read, device_read = set(on_cpu), [], set(), set()
    for k, n in enumerate(nodes):
        if n.op_type in CONTROL_FLOW:
            found.append(f"{n.name} ({n.op_type}): control flow is never captured")
        if n.op_type in HOST_OUTPUTS:
            continue
        host = HOST_INPUTS.get(n.op_type, set())
        for i, name in enumerate(n.input):
            if not name or name in small:
                continue
            on_host = k in cpu or i in host
            (host_read if on_host else device_read).add(name)
            if k in cpu and name in inputs:
                found.append(f"{n.name} ({n.op_type}, on the CPU) reads graph input {name}")
            elif not on_host and name in values:
                found.append(f"{n.name} ({n.op_type}, on the device) reads CPU value {name}")
            elif i in host and k not in cpu and name not in values and name not in inputs:
                found.append(f"{n.name} ({n.op_type}) reads device value {name} on the host")
    found += [f"graph input {name} is read on the host and on the device" for name in sorted(inputs & host_read
                                                                                              & device_read)]
    found += [f"graph output {o.name} is a CPU value" for o in g.output if o.name in values]
    return found
