"""ONNX export of the target and draft graphs and the engine directory's manifest."""
from __future__ import annotations

import copy
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from padrec_runtime.errors import InputError
from padrec_runtime.cache.host import KV_INPUT, KV_OUTPUT
from padrec_runtime.grammar import SPECIAL_TOKENS, Catalogue
from padrec_runtime.manifest import (FORMAT, GRAPHS, PRECISIONS, SCHEMA_VERSION, Manifest, load_manifest, trie_digest,
                                    write_manifest)

from .fused import GRAPH as FUSED_TARGET, build_gqa_target, gqa_inputs, gqa_io, in_place_kv
from .gate_up import fuse_gate_up_graph
from .models import Draft, DraftChain, Target
from .quantize import BlockCache, Quantization, quantize_model
from .streamed import DataFile, export_streamed

OPSET = 17
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (5e-2, 5e-2), "bf16": (2e-1, 1e-1)}  # logits (atol, rtol)
# protobuf cannot serialise a message of 2 GiB or more: past this many bytes of weights (with room for the graph
# itself) a graph is written with its weights in one external data file beside it
EXTERNAL_DATA_BYTES = (1 << 31) - (64 << 20)
# past this many bytes of weights a graph is exported by streaming its weights (streamed.py): the exporter and
# onnxslim would hold several copies of them (a 7B target's 13 GB: about 85 GB of memory and 20 minutes)
STREAMED_BYTES = 1 << 30


@dataclass(frozen=True)
class ExportLimits:
    """The shapes engines are built for; the runtime refuses requests beyond them."""

    max_seq_len: int = 512  # KV positions per row: prompt + list + one round of speculation
    max_history: int = 50  # items in a history
    max_batch: int = 64
    max_items: int = 20  # longest list
    n_items: int = 10  # default list length
    draft_steps: int = 4  # default K (and the K of the fused greedy chain graph)
    fused_chain: bool = True  # also export draft_chain.onnx: a greedy chain round's K draft steps in one call
    fused_target: bool = True  # also export target_gqa.onnx (fp32 / fp16): the target in ONNX Runtime's fused ops
    tree_topk: int = 4
    tree_size: int = 16


class _FlatChain(nn.Module):
    """Positional inputs / flat outputs around a DraftChain (its in-place form with in_place)."""

    def __init__(self, chain: DraftChain, in_place: bool = False):
        super().__init__()
        self.chain, self.in_place = chain, in_place

    def forward(self, *args):
        if self.in_place:
            return self.chain.forward_in_place(*args)
        hidden_in, ids, pos, slot, last, node, left, banned, mask, past_k, past_v = args
        return self.chain(hidden_in, ids, pos, slot, last, node, left, banned, mask, [(past_k, past_v)])


class _Flat(nn.Module):
    """Positional inputs / flat outputs around a model, in the engine's tensor order."""

    def __init__(self, model: nn.Module, is_draft: bool):
        super().__init__()
        self.model, self.is_draft = model, is_draft

    def forward(self, *args):
        if self.is_draft:
            hidden_in, ids, pos, step, slot, mask, *kv = args
        else:
            ids, pos, mask, *kv = args
        past = [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]
        if self.is_draft:
            logits, hidden, new = self.model(hidden_in, ids, pos, step, slot, mask, past)
        else:
            logits, hidden, new = self.model(ids, pos, mask, past)
        flat = [logits, hidden]
        for k, v in new:
            flat += [k, v]
        return tuple(flat)


def graph_io(model, is_draft: bool, precision: str) -> tuple[dict, dict, dict]:
    """Inputs, outputs (name -> dtype, symbolic shape) and the KV description of one graph."""
    dt = PRECISIONS[precision]
    c = model.cfg
    inputs = {}
    if is_draft:
        inputs["hidden_in"] = {"dtype": dt, "shape": ["batch", "seq", c.hidden_size]}
    inputs["input_ids"] = {"dtype": "int32", "shape": ["batch", "seq"]}
    inputs["position_ids"] = {"dtype": "int32", "shape": ["batch", "seq"]}
    if is_draft:
        inputs["step"] = {"dtype": "int32", "shape": ["batch", "seq"]}
        inputs["slot"] = {"dtype": "int32", "shape": ["batch", "seq"]}
    inputs["attention_mask"] = {"dtype": "bool", "shape": ["batch", "seq", "past_plus_seq"]}
    outputs = {"logits": {"dtype": "float32", "shape": ["batch", "seq", c.vocab_size]},
               "hidden": {"dtype": dt, "shape": ["batch", "seq", c.hidden_size]}}
    n_layers = 1 if is_draft else c.n_layers
    kv = {"key_input": KV_INPUT[0], "value_input": KV_INPUT[1], "key_output": KV_OUTPUT[0],
          "value_output": KV_OUTPUT[1], "n_layers": n_layers, "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim,
          "dtype": dt}
    return inputs, outputs, kv


def chain_io(draft, steps: int, precision: str, n_nodes: int, max_len: int = 0) -> tuple[dict, dict, dict]:
    """Inputs, outputs and KV description of the fused greedy draft-chain graph (see DraftChain); with max_len
    its in-place form (DraftChain.forward_in_place: no positions or mask, the whole cache bound in place)."""
    inputs, _, kv = graph_io(draft, True, precision)
    del inputs["step"]
    row = {"dtype": "int32", "shape": ["batch"]}
    inputs = {**{k: v for k, v in inputs.items() if k != "attention_mask"}, "last": row, "node": row, "left": row,
              "banned": {"dtype": "float16", "shape": ["batch", n_nodes + 2]},
              "attention_mask": inputs["attention_mask"]}
    outputs = {"tokens": {"dtype": "int32", "shape": ["batch", steps]}, "finite": {"dtype": "bool", "shape": ["batch"]}}
    if max_len:
        del inputs["position_ids"], inputs["attention_mask"]
        inputs.update(gqa_inputs())
        kv.update(in_place_kv(max_len))
    return inputs, outputs, kv


def _export(module: nn.Module, example: tuple, path: Path, names_in: list, names_out: list, dyn: dict,
            external: bool | None = None, weight_uses: int = 1) -> list[str]:
    """Trace to ONNX (in a scratch directory: past 2 GB the tracer writes a file per weight), slim, and write
    `path`; returns the external data files written beside it (see save_graph). Past STREAMED_BYTES of weights
    as the exporter would fold them (weight_uses: how often a graph repeats them, e.g. a chain's steps) the
    weights bypass the exporter (streamed.py): the same graph, written with external data."""
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters()) * weight_uses
    if weight_bytes > STREAMED_BYTES:
        return export_streamed(module, example, path, names_in, names_out, dyn, OPSET)
    with tempfile.TemporaryDirectory() as tmp:
        traced = Path(tmp) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(traced), input_names=names_in, output_names=names_out,
                              dynamic_axes=dyn, opset_version=OPSET, dynamo=False, do_constant_folding=True)
        return slim_graph(traced, path, external)


def export_chain_graph(draft: Draft, catalogue: Catalogue, steps: int, precision: str, path: Path,
                       max_len: int = 0, external: bool | None = None) -> list[str]:
    """Write the fused greedy draft-chain graph: dynamic batch, seq and past axes, K fixed, trie tables inside.
    max_len: its in-place form over a cache of max_len positions (ONNX Runtime's GroupQueryAttention).
    Returns its external data files (see save_graph)."""
    dtype = TORCH_DTYPES[precision]
    model = copy.deepcopy(draft).to(dtype) if _dtype_of(draft) != dtype else draft  # no copy when already in dtype
    dev = next(model.parameters()).device
    chain = DraftChain(model.eval(), catalogue, steps, max_len, report_finite=True).to(dev).eval()
    inputs, outputs, kv = chain_io(draft, steps, precision, catalogue.n_nodes, max_len)
    B, T, P = 2, 3, 5
    c = draft.cfg
    head = (torch.randn(B, T, c.hidden_size, dtype=dtype, device=dev),
            torch.randint(0, c.vocab_size, (B, T), dtype=torch.int32, device=dev))
    rows = (torch.zeros(B, T, dtype=torch.int32, device=dev),
            torch.full((B,), T - 1, dtype=torch.int32, device=dev),
            torch.zeros(B, dtype=torch.int32, device=dev),
            torch.full((B,), 3, dtype=torch.int32, device=dev),
            torch.zeros(B, catalogue.n_nodes + 2, dtype=torch.float16, device=dev))
    kv_in, kv_out = [kv["key_input"] % 0, kv["value_input"] % 0], [kv["key_output"] % 0, kv["value_output"] % 0]
    dyn = {name: {0: "batch", 1: "seq"} for name in ("hidden_in", "input_ids", "position_ids", "slot")}
    dyn.update({"last": {0: "batch"}, "node": {0: "batch"}, "left": {0: "batch"}, "banned": {0: "batch"},
                "tokens": {0: "batch"}, "finite": {0: "batch"}})
    if max_len:
        cache = torch.randn(B, c.n_kv_heads, max_len, c.head_dim, dtype=dtype, device=dev)
        example = head + rows + (torch.full((B,), P + T - 1, dtype=torch.int32, device=dev),
                                 torch.tensor(max_len, dtype=torch.int32, device=dev), cache, cache.clone())
        dyn.update({"seqlens_k": {0: "batch"}, **{n: {0: "batch", 2: "max_seq_len"} for n in kv_in + kv_out}})
        del dyn["position_ids"]
    else:
        example = head + (torch.arange(P, P + T, dtype=torch.int32, device=dev).repeat(B, 1),) + rows + (
            torch.ones(B, T, P + T, dtype=torch.bool, device=dev),
            torch.randn(B, c.n_kv_heads, P, c.head_dim, dtype=dtype, device=dev),
            torch.randn(B, c.n_kv_heads, P, c.head_dim, dtype=dtype, device=dev))
        dyn.update({"attention_mask": {0: "batch", 1: "seq", 2: "past_plus_seq"},
                    kv_in[0]: {0: "batch", 2: "past"}, kv_in[1]: {0: "batch", 2: "past"},
                    kv_out[0]: {0: "batch", 2: "seq_plus_steps"}, kv_out[1]: {0: "batch", 2: "seq_plus_steps"}})
    return _export(_FlatChain(chain, in_place=bool(max_len)), example, path, list(inputs) + kv_in,
                   list(outputs) + kv_out, dyn, external, weight_uses=steps)


def _dtype_of(model: nn.Module) -> torch.dtype | None:
    """The one dtype of a model's floating-point parameters (None when they are mixed)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def export_graph(model: nn.Module, is_draft: bool, precision: str, path: Path,
                 external: bool | None = None) -> list[str]:
    """Write one ONNX graph with dynamic batch, seq and past axes; returns its external data files."""
    dtype = TORCH_DTYPES[precision]
    if _dtype_of(model) != dtype:  # a model read in the export precision is exported as it is, never copied
        model = copy.deepcopy(model).to(dtype)
    model = model.eval()
    inputs, outputs, kv = graph_io(model, is_draft, precision)
    B, T, P = 2, 3, 5
    c = model.cfg
    dev = next(model.parameters()).device
    example = []
    if is_draft:
        example.append(torch.randn(B, T, c.hidden_size, dtype=dtype, device=dev))
    example += [torch.randint(0, c.vocab_size, (B, T), dtype=torch.int32, device=dev),
                torch.arange(P, P + T, dtype=torch.int32, device=dev).repeat(B, 1)]
    if is_draft:
        example += [torch.ones(B, T, dtype=torch.int32, device=dev), torch.zeros(B, T, dtype=torch.int32, device=dev)]
    example.append(torch.ones(B, T, P + T, dtype=torch.bool, device=dev))
    names_in = list(inputs)
    names_out = list(outputs)
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
           "attention_mask": {0: "batch", 1: "seq", 2: "past_plus_seq"},
           "logits": {0: "batch", 1: "seq"}, "hidden": {0: "batch", 1: "seq"}}
    if is_draft:
        dyn.update({"hidden_in": {0: "batch", 1: "seq"}, "step": {0: "batch", 1: "seq"},
                    "slot": {0: "batch", 1: "seq"}})
    for i in range(kv["n_layers"]):
        for part in ("key", "value"):
            name_in, name_out = kv[f"{part}_input"] % i, kv[f"{part}_output"] % i
            example.append(torch.randn(B, c.n_kv_heads, P, c.head_dim, dtype=dtype, device=dev))
            names_in.append(name_in)
            names_out.append(name_out)
            dyn[name_in] = {0: "batch", 2: "past"}
            dyn[name_out] = {0: "batch", 2: "seq"}
    return _export(_Flat(model, is_draft), tuple(example), path, names_in, names_out, dyn, external)


def slim_graph(path: Path, out: Path | None = None, external: bool | None = None) -> list[str]:
    """Fold the exporter's shape arithmetic and dead nodes (onnxslim): fewer nodes, fewer launches per step;
    then keep one copy of each constant (the exporter folds a weight once per use: the unrolled chain's
    steps would each carry the draft layer's weights). Writes `out` (default: over `path`, see save_graph)."""
    import onnx
    try:
        import onnxslim
        model = onnxslim.slim(str(path))
    except ImportError:  # optional: the graph is valid without it, only slower
        model = onnx.load(str(path))
    dedupe_initializers(model.graph)
    return save_graph(model, Path(out or path), external)


def save_graph(model, path: Path, external: bool | None = None) -> list[str]:
    """Write an onnx ModelProto; its weights go to one external data file `<name>.data` beside it when
    `external`, or (None) when they pass EXTERNAL_DATA_BYTES. Returns the external data file names (relative to
    the graph's directory), which the manifest lists and hashes like every other file."""
    import onnx
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # save_as_external_data appends to an existing file
    if external is None:
        external = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    if not external:
        onnx.save(model, str(path))
        return []
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
              size_threshold=1024)
    return [data.name] if data.exists() else []


# onnx TensorProto data types the runtime can hand to ONNX Runtime as shared initializers
_SHARED_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool", 2: "uint8"}


def weight_table(path: Path) -> list[dict]:
    """Where each external tensor of the graph at `path` lies in its data file, with its type, shape and sha256
    (the manifest's `graphs.<graph>.weights`): the runtime makes one device copy of each distinct tensor and
    gives it to every session of every graph that holds those bytes."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    table = []
    for init in model.graph.initializer:
        where = {e.key: e.value for e in init.external_data}
        if init.data_location != onnx.TensorProto.EXTERNAL or init.data_type not in _SHARED_TYPES:
            continue
        offset, length = int(where.get("offset", 0)), int(where["length"])
        with open(path.parent / where["location"], "rb") as f:
            f.seek(offset)
            digest = hashlib.sha256(f.read(length)).hexdigest()
        table.append({"name": init.name, "file": where["location"], "offset": offset, "length": length,
                      "dtype": _SHARED_TYPES[init.data_type], "shape": list(init.dims), "sha256": digest})
    return table


def dedupe_initializers(graph) -> int:
    """Point every use of a repeated constant (same type, shape and bytes) at its first copy and drop the
    rest; returns how many were dropped."""
    first, rename, keep = {}, {}, []
    for init in graph.initializer:
        # by digest: a dict of the bytes themselves would hold a second copy of every weight
        key = (init.data_type, tuple(init.dims), hashlib.sha256(init.raw_data or init.SerializeToString()).digest())
        if key in first:
            rename[init.name] = first[key]
        else:
            first[key] = init.name
            keep.append(init)
    if rename:
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        inputs = [i for i in graph.input if i.name not in rename]  # old IRs list constants as inputs too
        del graph.input[:]
        graph.input.extend(inputs)
    return len(rename)


def _versions() -> dict:
    out = {"padrec": "0.1.0", "opset": str(OPSET)}
    for pkg in ("torch", "onnx"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _export_part(name: str, model, is_draft: bool, catalogue: Catalogue, precision: str, limits: ExportLimits,
                 out: Path, external: bool | None, quantization: Quantization | None = None,
                 blocks: BlockCache | None = None) -> dict:
    """Write one graph into `out` (its decoder layers quantized when `quantization` covers it, weights met before
    taken from `blocks`); returns its manifest entry (files are hashed later, with the others)."""
    file, atol, rtol = f"{name}.onnx", *TOLERANCES[precision]
    tol = {"logits": {"atol": atol, "rtol": rtol}, "hidden": {"atol": atol, "rtol": rtol}}
    extra: dict = {}
    if name in ("draft_chain", "draft_chain_gqa"):
        K, max_len = limits.draft_steps, (limits.max_seq_len if name == "draft_chain_gqa" else 0)
        ext = export_chain_graph(model, catalogue, K, precision, out / file, max_len, external)
        inputs, outputs, kv = chain_io(model, K, precision, catalogue.n_nodes, max_len)
        # the trie inside the graph: the runtime checks the catalogue it loads is the same one
        tol, extra = {"tokens": {"atol": 0.0, "rtol": 0.0}}, {"chain_steps": K, "catalogue": trie_digest(catalogue)}
        if max_len:
            extra["onnxruntime_only"] = True
    elif name == FUSED_TARGET:
        ext = _write_fused_target(model, precision, limits.max_seq_len, out / file, external)
        inputs, outputs, kv = gqa_io(model, precision, limits.max_seq_len)
        extra["onnxruntime_only"] = True
    else:
        ext = export_graph(model, is_draft, precision, out / file, external)
        if name == "target" and _has_fused_target(limits, precision):  # gate|up: one device copy for both targets
            ext = fuse_gate_up_graph(out / file, model, TORCH_DTYPES[precision], external or bool(ext) or None)
        inputs, outputs, kv = graph_io(model, is_draft, precision)
    if quantization is not None and quantization.covers(name):
        # a streamed graph keeps its weights external (its runtime sessions share them with the other graphs')
        ext, extra["quantization"] = quantize_graph(out / file, model, quantization, precision,
                                                    external or bool(ext) or None, blocks)
    if ext:
        extra["external_data"] = ext
        extra["weights"] = weight_table(out / file)
    return {"file": file, "hidden_size": model.cfg.hidden_size,
            "inputs": inputs, "outputs": outputs, "kv": kv, "tolerances": tol, **extra}


def quantize_graph(path: Path, model, quantization: Quantization, precision: str, external: bool | None,
                   blocks: BlockCache | None = None) -> tuple[list[str], dict]:
    """Rewrite the graph at `path` with its decoder layers' MatMuls quantized (quantize.py; weights in `blocks`
    are not quantized again); returns its external data files (see save_graph) and the manifest record. The
    graph is loaded whole with its weights (ONNX Runtime's quantizer rewrites a ModelProto): a 7B target's
    13 GB in fp16."""
    import onnx
    proto = onnx.load(str(path))  # with its external data, before save_graph replaces the file
    record = quantize_model(proto, model, quantization, TORCH_DTYPES[precision], path.name, blocks)
    dedupe_initializers(proto.graph)  # a weight quantized at each of its uses (the chain's steps): keep one copy
    return save_graph(proto, path, external), record


def _has_fused_target(limits: ExportLimits, precision: str) -> bool:
    return limits.fused_target and precision in ("fp32", "fp16")  # ONNX Runtime's fused ops have no bf16 on CPU


def _write_fused_target(target: Target, precision: str, max_seq_len: int, path: Path, external: bool | None) -> list:
    """The fused target graph; past STREAMED_BYTES its weights are streamed into `<name>.data` as it is built
    (never all in memory at once), else built in memory and written by save_graph."""
    if sum(p.numel() * p.element_size() for p in target.parameters()) <= STREAMED_BYTES:
        return save_graph(build_gqa_target(target, precision, max_seq_len), path, external)
    import onnx
    with DataFile(path.with_name(path.name + ".data")) as data:
        model = build_gqa_target(target, precision, max_seq_len, data=data)
    onnx.save(model, str(path))
    return [data.path.name]


STALE = ("manifest.json", *(f"{g}{ext}" for g in GRAPHS for ext in (".onnx", ".onnx.data", ".plan")))  # an earlier
# export's files: each graph's, whether or not this export writes that graph again


def export_engines(target: Target, draft: Draft | None, catalogue: Catalogue, out_dir,
                   precision: str = "fp32", limits: ExportLimits = ExportLimits(), progress: bool = True,
                   external_data: bool | None = None, reuse_target: Path | None = None,
                   quantization: Quantization | None = None) -> Manifest:
    """Write out_dir/{target,draft,draft_chain}.onnx, catalogue.json and manifest.json. external_data: every
    graph's weights in a `<graph>.onnx.data` file beside it, listed in the manifest (None: for fp16 / bf16, the
    GPU precisions, whose sessions then share one device copy of each weight; for fp32 only graphs past 2 GB).
    reuse_target: an engine directory exported from this same target checkpoint (same precision and
    max_seq_len and quantization): its target graphs are hard-linked in instead of exported again (a second
    draft of a 7B target then costs no second 26 GB of target graphs on disk, nor their export time).
    quantization: weight-only quantization of the target's decoder layers (and the draft's, with its `draft`),
    ONNX Runtime's MatMulNBits; fp32 and fp16 engines (quantize.py).
    All or nothing: the files are written in a temporary directory beside out_dir and moved in at the end, so a
    failed export leaves no half-made engine directory (and an earlier export there untouched)."""
    if precision not in TORCH_DTYPES:
        raise InputError(f"precision: got {precision!r} | expected one of {', '.join(TORCH_DTYPES)}")
    if external_data is None and precision != "fp32":
        external_data = True
    if quantization is not None and precision == "bf16":
        raise InputError("quantize with precision bf16 | ONNX Runtime's CPU kernels cannot run the graphs to check "
                         "them | expected fp16 or fp32 | export with --precision fp16")
    if target.cfg.vocab_size != catalogue.layout.vocab_size:
        raise InputError(f"target vocab {target.cfg.vocab_size} != catalogue layout vocab "
                         f"{catalogue.layout.vocab_size} | the target was trained on another token layout")
    if draft is not None and draft.cfg.n_slots < catalogue.layout.n_slots:
        raise InputError(f"draft n_slots | got {draft.cfg.n_slots} | expected at least {catalogue.layout.n_slots} for "
                         f"the {catalogue.layout.kind} layout | train the draft for this layout")
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file | expected an engine directory to write | give a directory path")
    earlier_export(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        _write_engines(target, draft, catalogue, Path(tmp), precision, limits, progress, external_data, reuse_target,
                       quantization)
        _move_into(Path(tmp), out)
    return load_manifest(out, verify=False)  # hashed just now


def earlier_export(out_dir) -> bool:
    """Whether out_dir holds an earlier export, which an export replaces (False: it is new or empty). A directory
    holding anything else is refused before any work: an export replaces and removes files by name (STALE), so it
    would overwrite or delete the user's own."""
    out = Path(out_dir)
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not names:
        return False
    manifest = out / "manifest.json"
    try:  # a foreign manifest.json is as much the user's as any other file
        data = json.loads(manifest.read_text()) if manifest.is_file() else None
    except (OSError, ValueError):
        data = None
    ours = isinstance(data, dict) and data.get("format") == FORMAT
    if not ours:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise InputError(f"--out {out_dir}: holds files that are not a padrec export ({shown}) | expected a new or "
                         "empty directory, or an earlier export to replace | pick another path")
    return True


def _move_into(src: Path, out: Path) -> None:
    """A finished export's files into out: renamed whole when out is new, else file by file over the old ones
    (files of the user's own in out stay). Modes follow the umask, as for any file the user writes: mkdtemp's 0700
    and onnx's 0600 external data files would hide the engines from a server running as another user."""
    umask = os.umask(0)
    os.umask(umask)
    for f in src.iterdir():
        f.chmod(0o666 & ~umask)
    if not out.exists():
        src.chmod(0o777 & ~umask)
        src.rename(out)
        src.mkdir()  # TemporaryDirectory removes it on exit
        return
    for stale in STALE:
        (out / stale).unlink(missing_ok=True)
    for f in src.iterdir():
        f.replace(out / f.name)


def _reused_graph(name: str, src: Path, out: Path, precision: str, limits: ExportLimits,
                  quantization: Quantization | None) -> dict:
    """Graph `name` of the engine directory src, its files hard-linked into out (copied where the file system
    cannot link); returns its manifest entry."""
    m = load_manifest(src, verify=False)
    have = m.quantization("target")
    have = Quantization.from_record(have) if have else None
    want = Quantization(quantization.kind, quantization.block_size) if quantization else None
    if m.data["precision"] != precision or m.data["model"]["max_seq_len"] != limits.max_seq_len or have != want:
        raise InputError(f"reuse_target {src}: precision {m.data['precision']}, max_seq_len "
                         f"{m.data['model']['max_seq_len']}, quantization {have} | expected {precision}, "
                         f"{limits.max_seq_len}, {want} | export with the same settings or without reusing")
    entry = json.loads((src / "manifest.json").read_text())["graphs"][name]  # as written (checked just above)
    for f in (entry["file"], *entry.get("external_data", [])):
        try:
            os.link(src / f, out / f)
        except OSError:
            shutil.copyfile(src / f, out / f)
    return entry


def _write_engines(target, draft, catalogue, out: Path, precision: str, limits: ExportLimits,
                   progress: bool, external_data: bool | None, reuse_target: Path | None = None,
                   quantization: Quantization | None = None) -> None:
    graphs, blocks = {}, BlockCache()  # each distinct weight quantized once, whichever graphs hold it
    parts = [("target", target, False)] + ([("draft", draft, True)] if draft is not None else [])
    if draft is not None and limits.fused_chain:  # a greedy chain round's K draft steps in one engine call
        parts.append(("draft_chain", draft, True))
    if _has_fused_target(limits, precision):
        parts.append((FUSED_TARGET, target, False))
        if draft is not None and limits.fused_chain:
            parts.append(("draft_chain_gqa", draft, True))
    for name, model, is_draft in tqdm(parts, desc="export", unit="graph", disable=not progress):
        if reuse_target is not None and not is_draft:
            graphs[name] = _reused_graph(name, Path(reuse_target), out, precision, limits, quantization)
        else:
            graphs[name] = _export_part(name, model, is_draft, catalogue, precision, limits, out, external_data,
                                        quantization, blocks)
    catalogue.save(out / "catalogue.json")
    files = {f: {} for g in graphs.values() for f in (g["file"], *g.get("external_data", []))}
    files["catalogue.json"] = {}
    data = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "producer": _versions(), "precision": precision,
        "model": {"layout": {**catalogue.layout.to_json(), "vocab_size": catalogue.layout.vocab_size,
                             "special_tokens": list(SPECIAL_TOKENS)},
                  "max_seq_len": limits.max_seq_len, "max_history": limits.max_history,
                  "max_batch": limits.max_batch, "max_items": limits.max_items, "n_items": limits.n_items,
                  "draft_steps": limits.draft_steps, "tree_topk": limits.tree_topk, "tree_size": limits.tree_size,
                  "catalogue": "catalogue.json"},
        "graphs": graphs, "files": files,
    }
    write_manifest(out, data)

