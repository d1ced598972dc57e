"""Golden files: the PyTorch reference's lists for given histories, for runtime tests that run without torch."""
from __future__ import annotations

import json
from pathlib import Path

from padrec_runtime.loop import DecodeConfig
from padrec_runtime.grammar import ListConstraint

from .reference import reference_generate

GOLDEN_FORMAT, GOLDEN_VERSION = "padrec-golden", 1


def write_golden(path, target, draft, catalogue, cases: list) -> dict:
    """cases: dicts with histories, n_items, speculate, draft_steps, tree_topk, tree_size."""
    out = {"format": GOLDEN_FORMAT, "version": GOLDEN_VERSION, "cases": []}
    for case in cases:
        con = ListConstraint(catalogue, n_items=case["n_items"])
        cfg = DecodeConfig(speculate=case["speculate"], draft_steps=case["draft_steps"],
                           tree_topk=case["tree_topk"], tree_size=case["tree_size"])
        g = reference_generate(target, draft, case["histories"], con, cfg)
        out["cases"].append({**case, "tokens": g.tokens, "committed": g.committed})
    Path(path).write_text(json.dumps(out))
    return out
