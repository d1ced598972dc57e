"""The target as an ONNX Runtime graph of fused contrib ops (GroupQueryAttention with the KV cache written in
place, SkipSimplifiedLayerNormalization, QuickGelu; the MLP's gate and up projections as one MatMul): about half the
standard graph's kernels per step.

Written node by node from the Target's weights (not traced), so its form does not depend on the exporter.
Its contract differs from the standard target's in two ways, both recorded in the manifest:
- The cache is bound whole, (batch, kv_heads, max_seq_len, head_dim) per layer, as both the past input and the
  present output (ONNX Runtime shares the buffer); the op writes each new token's KV at its position.
- No mask and no position ids: `seqlens_k` (batch,) is each row's cache length after this call minus one, and
  attention is causal over the row's cache. Token i of a call sits at position seqlens_k - seq + 1 + i, which
  is also its rotary position. So it serves prefill, AR steps and chain verify passes (every token sees all
  before it), not tree verify (the standard target does those, over the same cache).
`total_sequence_length` is a host scalar the op uses for checks only: the runtime passes max_seq_len.
ONNX Runtime only (com.microsoft ops): TensorRT builds skip it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .gqa import rotary_cache
from .models import Target

GRAPH = "target_gqa"
KV_IN_PLACE = ("cache.%d.key", "cache.%d.value")  # the layer's whole cache, bound as input and output
_ONNX_DTYPES = {"fp32": 1, "fp16": 10}  # onnx.TensorProto FLOAT, FLOAT16 (numpy has no bf16)


def gqa_inputs() -> dict:
    """The inputs every in-place graph has besides its own: where each row's tokens go, the host scalar."""
    return {"seqlens_k": {"dtype": "int32", "shape": ["batch"]},
            "total_sequence_length": {"dtype": "int32", "shape": []}}


def in_place_kv(max_seq_len: int) -> dict:
    """The KV description's keys of a graph writing the whole bound cache in place."""
    return {"key_input": KV_IN_PLACE[0], "value_input": KV_IN_PLACE[1], "key_output": KV_IN_PLACE[0] + ".out",
            "value_output": KV_IN_PLACE[1] + ".out", "in_place": True, "max_len": max_seq_len}


def gqa_io(target: Target, precision: str, max_seq_len: int) -> tuple[dict, dict, dict]:
    """Inputs, outputs (name -> dtype, symbolic shape) and the KV description of the fused target."""
    from padrec_runtime.manifest import PRECISIONS
    dt, c = PRECISIONS[precision], target.cfg
    inputs = {"input_ids": {"dtype": "int32", "shape": ["batch", "seq"]}, **gqa_inputs()}
    outputs = {"logits": {"dtype": "float32", "shape": ["batch", "seq", c.vocab_size]},
               "hidden": {"dtype": dt, "shape": ["batch", "seq", c.hidden_size]}}
    kv = {**in_place_kv(max_seq_len), "n_layers": c.n_layers, "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim,
          "dtype": dt}
    return inputs, outputs, kv


class _Builder:
    """Nodes and initializers of one graph, with unique value names; with `data` (a streamed.DataFile) each
    weight goes straight to that file, converted and transposed in PyTorch on the model's device."""

    def __init__(self, np_dtype, onnx_dtype: int, data=None):
        self.nodes, self.inits, self.np_dtype, self.onnx_dtype, self.data = [], [], np_dtype, onnx_dtype, data
        self._n = 0

    def const(self, name: str, value, dtype=None) -> str:
        """An initializer from a numpy array or a torch tensor (a weight), in `dtype` (default: the graph's)."""
        from onnx import numpy_helper
        dtype = dtype or self.np_dtype
        if isinstance(value, torch.Tensor) and self.data is not None:
            torch_dtype = torch.float16 if dtype == np.float16 else torch.float32
            self.inits.append(self.data.add(name, value.detach().to(torch_dtype)))
            return name
        arr = np.ascontiguousarray(_w(value) if isinstance(value, torch.Tensor) else value, dtype=dtype)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: list, n_out: int = 1, domain: str = "", **attrs):
        from onnx import helper
        self._n += 1
        outs = [f"{op_type}_{self._n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self._n}", domain=domain,
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    def linear(self, x: str, weight: torch.Tensor, name: str, bias: torch.Tensor | None = None) -> str:
        """x @ weight.T (+ bias). Weights stored (in, out): on an H200 faster than FusedMatMul with transB."""
        y = self.op("MatMul", [x, self.const(name, weight.t())])
        return y if bias is None else self.op("Add", [y, self.const(f"{name}_bias", bias)])


class _Residual:
    """The residual stream: a branch's output waits (`pending`) until the next norm adds it in, so the add and
    the norm run as one SkipSimplifiedLayerNormalization."""

    def __init__(self, b: _Builder, x: str, eps: float):
        self.b, self.residual, self.pending, self.eps = b, x, None, eps

    def norm(self, weight: torch.Tensor, name: str) -> str:
        """The RMS-normed stream (after adding the pending branch output, if any)."""
        gamma = self.b.const(name, weight)
        if self.pending is None:
            return self.b.op("SimplifiedLayerNormalization", [self.residual, gamma], axis=-1, epsilon=self.eps,
                             stash_type=1)
        out, _, _, self.residual = self.b.op("SkipSimplifiedLayerNormalization", [self.pending, self.residual, gamma],
                                             n_out=4, domain="com.microsoft", epsilon=self.eps)
        self.pending = None
        return out


def _w(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _padded_heads(a, c, group: int) -> tuple:
    """q's weight and bias, o's weight, with zero query heads added so that each KV head serves `group` of them:
    a padded head's output meets zero columns of o, so the layer computes what it did. Why: ONNX Runtime's XQA
    decode kernel takes only groups dividing 64 (a Qwen2.5 shape has 7)."""
    kv, g, d = c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim
    if group < g:
        raise ValueError(f"query_group {group} | the model has {g} query heads per KV head | expected at least {g}")

    def pad(t: torch.Tensor, axis: int) -> torch.Tensor:  # the heads' axis, (kv, g, d) flattened, padded to group
        shape = list(t.shape)
        t = t.reshape(shape[:axis] + [kv, g, d] + shape[axis + 1:])
        widths = [0, 0] * (t.dim() - axis - 2) + [0, group - g]  # F.pad: the last axis first
        return torch.nn.functional.pad(t, widths).reshape(shape[:axis] + [kv * group * d] + shape[axis + 1:])

    q_bias = None if a.q_proj.bias is None else pad(a.q_proj.bias, 0)
    return pad(a.q_proj.weight, 0), q_bias, pad(a.o_proj.weight, 1)


def _attention(b: _Builder, a, h: str, i: int, c, query_group: int | None) -> str:
    """Layer i's attention over its in-place cache: one QKV projection, GroupQueryAttention, the output
    projection; with `query_group`, zero query heads added (_padded_heads)."""
    from onnx import helper
    q_w, q_b, o_w = (a.q_proj.weight, a.q_proj.bias, a.o_proj.weight) if query_group is None else \
        _padded_heads(a, c, query_group)
    qkv_bias = None if q_b is None else torch.cat([q_b, a.k_proj.bias, a.v_proj.bias])
    qkv = b.linear(h, torch.cat([q_w, a.k_proj.weight, a.v_proj.weight]), f"l{i}.qkv", qkv_bias)
    k_in, v_in = KV_IN_PLACE[0] % i, KV_IN_PLACE[1] % i
    attn = f"l{i}.attn"
    b.nodes.append(helper.make_node(  # its cache outputs are the graph's (no copy): bound to the inputs
        "GroupQueryAttention", [qkv, "", "", k_in, v_in, "seqlens_k", "total_sequence_length", "rotary.cos",
                                "rotary.sin"], [attn, k_in + ".out", v_in + ".out"], name=f"l{i}.gqa",
        domain="com.microsoft", num_heads=c.n_kv_heads * (query_group or c.n_heads // c.n_kv_heads),
        kv_num_heads=c.n_kv_heads, do_rotary=1, rotary_interleaved=0, scale=float(c.head_dim ** -0.5)))
    return b.linear(attn, o_w, f"l{i}.o", a.o_proj.bias)  # o bias: Llama with attention_bias


def _mlp(b: _Builder, layer, h: str, i: int, gate_up: bool) -> str:
    """Layer i's SwiGLU MLP: down(silu(gate(h)) * up(h)), gate and up as one MatMul split in two with `gate_up`
    (one GEMM twice as wide reads the weights closer to the card's bandwidth: 3% off a 7B step on an H100)."""
    if gate_up:
        both = b.linear(h, torch.cat([layer.gate_proj.weight, layer.up_proj.weight]), f"l{i}.gate_up")
        gate, up = b.op("Split", [both], n_out=2, axis=-1)  # opset 17: equal halves
    else:
        gate = b.linear(h, layer.gate_proj.weight, f"l{i}.gate")
        up = b.linear(h, layer.up_proj.weight, f"l{i}.up")
    act = b.op("Mul", [b.op("QuickGelu", [gate], domain="com.microsoft", alpha=1.0), up])  # silu(gate) * up
    return b.linear(act, layer.down_proj.weight, f"l{i}.down")


def _head(b: _Builder, target: Target, hidden: str, precision: str) -> None:
    """The logits, and the graph's outputs named. The head runs in fp32, as Target computes it (its forward says
    why): fp32 weights, fp32 logits."""
    from onnx import helper, TensorProto
    head = b.const("lm_head", target.lm_head.weight.t(), np.float32)
    logits = b.op("MatMul", [b.op("Cast", [hidden], to=TensorProto.FLOAT) if precision == "fp16" else hidden, head])
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    b.nodes.append(helper.make_node("Identity", [hidden], ["hidden"], name="hidden"))


def _graph_io(target: Target, precision: str, max_seq_len: int, dt: int) -> tuple[list, list]:
    """The graph's input and output value infos (`dt`: the cache's and hidden's onnx dtype)."""
    from onnx import helper, TensorProto
    c = target.cfg
    _, _, kv = gqa_io(target, precision, max_seq_len)
    cache_shape = ["batch", c.n_kv_heads, "max_seq_len", c.head_dim]
    g_in = [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "seq"]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    g_out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", c.vocab_size]),
             helper.make_tensor_value_info("hidden", dt, ["batch", "seq", c.hidden_size])]
    for i in range(c.n_layers):
        for tmpl in (kv["key_input"], kv["value_input"]):
            g_in.append(helper.make_tensor_value_info(tmpl % i, dt, cache_shape))
        for tmpl in (kv["key_output"], kv["value_output"]):
            g_out.append(helper.make_tensor_value_info(tmpl % i, dt, cache_shape))
    return g_in, g_out


def build_gqa_target(target: Target, precision: str, max_seq_len: int, gate_up: bool = True, data=None,
                     query_group: int | None = None):
    """The fused target as an onnx ModelProto (weights inside, or with `data`, a streamed.DataFile, written to
    it one at a time). Profiling forms: `gate_up=False`, the MLP's gate and up projections as two MatMuls;
    `query_group`, zero query heads added up to that many per KV head."""
    from onnx import helper
    if precision not in ("fp32", "fp16"):
        raise NotImplementedError(f"fused target: precision {precision} | export fp16 or fp32")
    c = target.cfg
    b = _Builder(np.float16 if precision == "fp16" else np.float32, _ONNX_DTYPES[precision], data)
    # the padded tokens of a static bucket sit past the cache's last row: their rotary rows must exist too
    cos, sin = rotary_cache(c, max_seq_len + 256)
    b.const("rotary.cos", cos.numpy())
    b.const("rotary.sin", sin.numpy())
    stream = _Residual(b, b.op("Gather", [b.const("embed_tokens", target.embed_tokens.weight), "input_ids"]),
                       float(c.rms_eps))
    for i, layer in enumerate(target.layers):
        h = stream.norm(layer.input_layernorm.weight, f"l{i}.input_norm")
        stream.pending = _attention(b, layer.self_attn, h, i, c, query_group)
        h = stream.norm(layer.post_attention_layernorm.weight, f"l{i}.post_norm")
        stream.pending = _mlp(b, layer, h, i, gate_up)
    _head(b, target, stream.norm(target.norm.weight, "final_norm"), precision)
    graph = helper.make_graph(b.nodes, GRAPH, *_graph_io(target, precision, max_seq_len, b.onnx_dtype), b.inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="padrec",
                             ir_version=8)  # readable by older ONNX Runtimes too


def export_gqa_target(target: Target, precision: str, max_seq_len: int, path: Path, gate_up: bool = True,
                      query_group: int | None = None) -> None:
    """Write the fused target graph (see the module docstring; the profiling forms: build_gqa_target), its weights
    in `<name>.data` beside it past ONNX's 2 GB."""
    from .onnx_export import save_graph
    save_graph(build_gqa_target(target, precision, max_seq_len, gate_up, query_group=query_group), path)

