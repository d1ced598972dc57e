"""Weight-only quantization of exported graphs (ONNX Runtime's MatMulNBits over the decoder layers' linear
weights) and the PyTorch twin holding the same dequantized weights: the model a quantized engine computes.

Only the decoder layers' projections are quantized (q|k|v, o, gate, up, down). The embeddings, the fp32 output
head and the draft's fc and gate stay as exported: the fused chain graph folds halves of fc and gate into
per-token and per-step tables, which quantizing would make differ from the step-by-step draft graph. A graph's
MatMul is recognised as a layer projection by its weight's bytes, whatever the exporter named it.
"""
from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from padrec_runtime.errors import InputError
from padrec_runtime.manifest import QUANT_BLOCK_SIZES, QUANT_KINDS

TARGET_GRAPHS = ("target", "target_gqa")
DRAFT_GRAPHS = ("draft", "draft_chain", "draft_chain_gqa")


@dataclass(frozen=True)
class Quantization:
    """Weight-only quantization of an export: bits per weight, how many weights share a scale, which graphs."""

    kind: str = "int4"  # int4 | int8 (MatMulNBits' bits)
    block_size: int = 32  # consecutive weights along a projection's input sharing one scale and zero point
    draft: bool = False  # also the draft's graphs (its decoder layer), not only the target's

    def __post_init__(self):
        if self.kind not in QUANT_KINDS:
            raise InputError(f"quantize: got {self.kind!r} | expected one of {', '.join(QUANT_KINDS)} | pick one, "
                             "or leave quantization off")
        if self.block_size not in QUANT_BLOCK_SIZES:
            raise InputError(f"quantize block size: got {self.block_size} | expected one of "
                             f"{', '.join(map(str, QUANT_BLOCK_SIZES))} | pick a power of two in that range")

    @property
    def bits(self) -> int:
        return QUANT_KINDS[self.kind]

    def covers(self, graph: str) -> bool:
        """Whether the graph named `graph` is quantized under this setting."""
        return graph in TARGET_GRAPHS or (self.draft and graph in DRAFT_GRAPHS)

    def record(self, matmuls: int) -> dict:
        """The manifest's `graphs.<graph>.quantization` (asymmetric: a zero point per block)."""
        return {"kind": self.kind, "bits": self.bits, "block_size": self.block_size, "symmetric": False,
                "matmuls": matmuls}

    @classmethod
    def from_record(cls, record: dict) -> "Quantization":
        return cls(record["kind"], record["block_size"])


def parse_quantize(kind: str, block_size: int = 32, draft: bool = False) -> Quantization | None:
    """The CLI's --quantize none|int4|int8 (and its block size, draft flag) as a Quantization, None for none."""
    if kind == "none":
        if draft:
            raise InputError("--quantize-draft: given with --quantize none | expected --quantize int4 or int8 | "
                             "add --quantize, or drop --quantize-draft")
        return None
    return Quantization(kind, block_size, draft)


def _quantizer_module():
    """ONNX Runtime's weight-only quantizer. Its import calls logging.basicConfig(level=INFO), which would turn
    on every library's info logs in this process: a handler on the root logger for the import makes it a no-op."""
    root, guard = logging.getLogger(), logging.NullHandler()
    root.addHandler(guard)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    except ImportError as exc:
        raise InputError(f"--quantize: ONNX Runtime's quantizer cannot be imported ({exc}) | expected onnxruntime "
                         "and onnx-ir | pip install '.[export]' (in the padrec checkout)") from None
    finally:
        root.removeHandler(guard)
    logging.getLogger(mnq.__name__).setLevel(logging.WARNING)
    return mnq


def _layers(model: nn.Module) -> list:
    """The decoder layers of a Target (its stack) or a Draft (its one layer)."""
    return list(model.layers) if hasattr(model, "layers") else [model.layer]


def _projections(layer) -> list[list[nn.Linear]]:
    """A decoder layer's linear projections in the groups a graph holds as one weight (q|k|v concatenated). Blocks
    run along a weight's input, one column at a time, so a concatenation along the output (gate|up, which the
    fused target may use) quantizes exactly as its parts do alone."""
    a = layer.self_attn
    return [[a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [layer.gate_proj], [layer.up_proj], [layer.down_proj]]


def _as_stored(group: list[nn.Linear], dtype: torch.dtype) -> torch.Tensor:
    """A group's weight as a graph stores it: (in, out), concatenated along out, in the graph's dtype."""
    return torch.cat([m.weight.detach() for m in group]).to(dtype).t().contiguous().cpu()


def _digest(t: torch.Tensor | np.ndarray) -> str:
    arr = t.view(torch.uint8).numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t).view(np.uint8)
    return hashlib.sha256(arr.reshape(-1)).hexdigest()  # from the buffer: no copy of a weight's bytes


def _layer_digests(layer, dtype: torch.dtype) -> dict:
    """name -> sha256 of each projection group's weight as a graph stores it, and of gate|up concatenated (which
    the fused target may hold instead of gate and up)."""
    names = ("qkv", "o", "gate", "up", "down")
    out = {name: _digest(_as_stored(g, dtype)) for name, g in zip(names, _projections(layer))}
    out["gate_up"] = _digest(_as_stored([layer.gate_proj, layer.up_proj], dtype))
    return out


def _missing_layers(layer_digests: list[dict], found: set) -> list[int]:
    """The decoder layers (their _layer_digests) of which the graph quantized not every projection (gate and up,
    or gate|up)."""
    missing = []
    for i, d in enumerate(layer_digests):
        mlp = {d["gate"], d["up"]} <= found or d["gate_up"] in found
        if not ({d["qkv"], d["o"], d["down"]} <= found and mlp):
            missing.append(i)
    return missing


class BlockCache:
    """The blocks, scales and zero points ONNX Runtime's quantizer made of each distinct weight (by its dtype, shape
    and sha256), for one export: `target` and `target_gqa` hold the same projections, a chain graph repeats its
    layer once per step; each is quantized once. Holds the packed blocks (a 7B target's: about 4 GB in int4)."""

    def __init__(self):
        self.blocks: dict = {}  # (dtype, shape, sha256) -> (packed, scales, zero_points)
        self.quantized = 0  # weights quantized (the others were found here)
        self.digests: dict = {}  # (id(model), dtype) -> its layers' _layer_digests: target and target_gqa share them

    def layer_digests(self, model: nn.Module, dtype: torch.dtype) -> list[dict]:
        key = (id(model), dtype)
        if key not in self.digests:
            self.digests[key] = [_layer_digests(layer, dtype) for layer in _layers(model)]
        return self.digests[key]

    def node_quantizer(self, mnq, config):
        """The quantizer's own per-weight quantizer, its block quantization looked up here first."""
        cache = self

        class Cached(mnq.DefaultWeightOnlyQuantizer):
            def qbits_block_quant(self, fp32weight):
                w = np.ascontiguousarray(fp32weight)
                key = (str(w.dtype), w.shape, _digest(w))
                if key not in cache.blocks:
                    cache.blocks[key] = super().qbits_block_quant(w)
                    cache.quantized += 1
                return cache.blocks[key]
        return Cached(config)


def quantize_model(proto, model: nn.Module, q: Quantization, dtype: torch.dtype, where: str,
                   cache: BlockCache | None = None) -> dict:
    """Rewrite the onnx ModelProto in place: every MatMul whose weight is a decoder-layer projection of `model`
    (in `dtype`) becomes a MatMulNBits (ONNX Runtime's quantizer: round to nearest, asymmetric blocks); the other
    MatMuls stay. A weight used at several nodes (the chain's steps) comes out once per use: dedupe after.
    cache: blocks of weights quantized before (by another graph of the same export), reused and added to.
    Returns the manifest record; `where` names the graph in errors."""
    from onnx import numpy_helper
    mnq = _quantizer_module()
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    for i, node in enumerate(graph.node):  # the quantizer picks nodes by name: every node needs its own
        if not node.name:
            node.name = f"node_{i}_{node.op_type}"
    cache = BlockCache() if cache is None else cache
    layer_digests = cache.layer_digests(model, dtype)
    wanted = {d for layer in layer_digests for d in layer.values()}
    digests = {name: _digest(numpy_helper.to_array(inits[name])) for name in
               {n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits}}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    chosen = {n.name for n in matmuls if digests.get(n.input[1]) in wanted}
    # every projection found, or the engine would run a model partly quantized, unlike its PyTorch twin
    missing = _missing_layers(layer_digests, {digests[n.input[1]] for n in matmuls if n.name in chosen})
    if missing:
        raise InputError(f"{where}: decoder layers {missing[:8]} have projections no MatMul holds as exported | "
                         "expected every projection of the model as a MatMul weight | export and quantize in one "
                         "call (padrec export --quantize), from the checkpoint the graph came from")
    config = mnq.DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=False, bits=q.bits)
    quantizer = mnq.MatMulNBitsQuantizer(proto, algo_config=config,
                                         nodes_to_exclude=[n.name for n in matmuls if n.name not in chosen])
    quantizer.node_quantizer = cache.node_quantizer(mnq, config)
    quantizer.process()  # rewrites proto itself
    done = sum(n.op_type == "MatMulNBits" for n in graph.node)
    if done != len(chosen):
        raise InputError(f"{where}: {done} of {len(chosen)} layer MatMuls quantized | expected all | an ONNX Runtime "
                         "quantizer that skips some weight shape: try another --quantize-block")
    return q.record(done)


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """MatMulNBits' weight (rows, cols) in float32 from its blocks: packed (cols, blocks, block bytes) uint8,
    low bits first; scales (cols, blocks); zero_points (cols, blocks packed as packed is)."""
    cols, blocks, _ = packed.shape
    if bits == 4:
        values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(cols, blocks, -1)
        zp = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(cols, -1)[:, :blocks]
    else:
        values, zp = packed, zero_points[:, :blocks]
    w = (values.astype(np.float32) - zp[:, :, None].astype(np.float32)) * scales[:, :, None].astype(np.float32)
    return np.ascontiguousarray(w.reshape(cols, -1)[:, :rows].T)


def quantized_weight(weight: np.ndarray, q: Quantization) -> np.ndarray:
    """weight (rows, cols) as MatMulNBits holds it after ONNX Runtime's quantizer: quantized with the very
    function the graph's quantizer calls, dequantized (float32)."""
    mnq = _quantizer_module()
    config = mnq.DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=False, bits=q.bits)
    packed, scales, zero_points = mnq.DefaultWeightOnlyQuantizer(config).qbits_block_quant(weight)
    return dequantize(packed, scales, zero_points, q.bits, weight.shape[0])


@torch.no_grad()
def quantized_twin(model: nn.Module, q: Quantization, dtype: torch.dtype) -> nn.Module:
    """A copy of model (Target or Draft) whose decoder layers' projections hold the weights its quantized graphs
    compute with (each group quantized as the graph stores it, in `dtype`, then dequantized): PyTorch computing
    what the quantized engines compute."""
    twin = copy.deepcopy(model)
    for layer in _layers(twin):
        for group in _projections(layer):
            stored = _as_stored(group, dtype)
            dq = quantized_weight(stored.numpy(), q)
            parts = torch.from_numpy(dq.T).split([m.out_features for m in group])  # back to (out, in) each
            for m, w in zip(group, parts):
                m.weight.copy_(w.to(m.weight.dtype))
    return twin
