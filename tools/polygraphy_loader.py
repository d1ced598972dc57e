"""Polygraphy data loader for padrec engines: real-shaped feeds generated from the manifest (numpy only).

    polygraphy run ENGINES/target.onnx --onnxrt --trt --data-loader-script tools/polygraphy_loader.py:load_target
    polygraphy run ENGINES/draft.onnx --onnxrt --trt --data-loader-script tools/polygraphy_loader.py:load_draft

The engine directory is the folder of the model file given to polygraphy (PADREC_ENGINES overrides it).
"""
import os
import sys
from pathlib import Path

from padrec_runtime.manifest import load_manifest
from padrec_export.qa_feeds import graph_cases


def _engine_dir() -> Path:
    if os.environ.get("PADREC_ENGINES"):
        return Path(os.environ["PADREC_ENGINES"])
    model = next(a for a in sys.argv if a.endswith(".onnx"))
    return Path(model).parent


def _load(graph: str):
    m = load_manifest(_engine_dir())
    for _, feeds in graph_cases(m.graph(graph), graph == "draft", vocab_size=m.layout.vocab_size,
                                n_slots=m.layout.n_slots, n_steps=m.model["draft_steps"] + 1):
        yield feeds


def load_target():
    yield from _load("target")


def load_draft():
    yield from _load("draft")
