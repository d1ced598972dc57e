"""Per-graph parity: the same real-shaped feeds through PyTorch and an engine backend, error per output."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from padrec_runtime.backends.base import numpy_dtype

from .onnx_export import TORCH_DTYPES
from .reference import _call


@dataclass
class Comparison:
    """One output of one case: how far the engine is from PyTorch."""

    graph: str
    case: str
    output: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ok: bool  # every element within atol + rtol * |reference|

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _tree_mask(parents: list) -> np.ndarray:
    T = len(parents)
    m = np.zeros((T, T), dtype=bool)
    for i, p in enumerate(parents):
        m[i, i] = True
        while p >= 0:
            m[i, p] = True
            p = parents[p]
    return m


def graph_cases(model, is_draft: bool, precision: str, seed: int = 0, batch: int = 2, past: int = 13) -> list:
    """(name, feeds) pairs: prefill, chain verify and tree verify over a past KV; every step and slot for a draft."""
    rng = np.random.default_rng(seed)
    c = model.cfg
    dt = numpy_dtype("float32")
    n_layers = 1 if is_draft else c.n_layers
    cases = []

    def feeds(T, P, mask_new, steps=None, slots=None):
        f = {"input_ids": rng.integers(5, c.vocab_size, (batch, T)).astype(np.int32),
             "position_ids": (P + np.arange(T, dtype=np.int32))[None].repeat(batch, 0)}
        mask = np.ones((batch, T, P + T), dtype=bool)
        mask[:, :, P:] = mask_new
        if P > 2:
            mask[0, :, P - 2:P] = False  # row 0 is shorter: its last two past slots are padding
        f["attention_mask"] = mask
        for i in range(n_layers):
            for part in ("key", "value"):
                f[f"past.{i}.{part}"] = rng.standard_normal((batch, c.n_kv_heads, P, c.head_dim)).astype(dt)
        if is_draft:
            f["hidden_in"] = rng.standard_normal((batch, T, c.hidden_size)).astype(dt)
            f["step"] = np.full((batch, T), 0 if steps is None else steps, np.int32)
            f["slot"] = rng.integers(0, c.n_slots, (batch, T)).astype(np.int32) if slots is None else \
                np.full((batch, T), slots, np.int32)
        return f

    causal = lambda T: np.tril(np.ones((T, T), dtype=bool))  # noqa: E731
    cases.append(("prefill", feeds(11, 0, causal(11))))
    cases.append(("chain-verify", feeds(5, past, causal(5))))
    cases.append(("tree-verify", feeds(7, past, _tree_mask([-1, 0, 0, 1, 1, 2, 3]))))
    if is_draft:
        for step in range(c.max_steps + 1):  # one past the last embedding: the clamp must hold too
            cases.append((f"step-{step}", feeds(3, past, _tree_mask([-1, -1, 0]), steps=step)))
        for slot in range(c.n_slots):
            cases.append((f"slot-{slot}", feeds(2, past, causal(2), steps=1, slots=slot)))
    if precision != "fp32":
        lowp = numpy_dtype({"fp16": "float16", "bf16": "bfloat16"}[precision])
        for _, f in cases:
            for k in list(f):
                if f[k].dtype == np.float32:
                    f[k] = f[k].astype(lowp)
    return cases


def torch_outputs(model, is_draft: bool, feeds: dict, precision: str) -> dict:
    """PyTorch outputs (as float32 numpy) of the model cast to the engine's precision."""
    if precision != "fp32":
        model = copy.deepcopy(model).to(TORCH_DTYPES[precision])
    return _call(model, feeds, 1 if is_draft else model.cfg.n_layers, is_draft)


def compare_graph(name: str, model, is_draft: bool, backend, spec: dict, precision: str, seed: int = 0) -> list:
    """Comparisons of every output of every case between PyTorch and the backend."""
    rows = []
    for case, feeds in graph_cases(model, is_draft, precision, seed):
        ref = torch_outputs(model, is_draft, feeds, precision)
        got = backend.infer(feeds)
        for out, r in ref.items():
            g = np.asarray(got[out]).astype(np.float32)
            r = np.asarray(r).astype(np.float32)
            tol = spec["tolerances"]["logits" if out == "logits" else "hidden"]
            diff = np.abs(g - r)
            rows.append(Comparison(name, case, out, float(diff.max()), float((diff / (np.abs(r) + 1e-3)).max()),
                                   tol["atol"], tol["rtol"],
                                   bool(np.all(diff <= tol["atol"] + tol["rtol"] * np.abs(r)))))
    return rows
