"""Shared fixtures: a tiny exported engine directory (generated, never downloaded), and one per token layout."""
import dataclasses
import shutil
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from padrec_export.onnx_export import ExportLimits, export_engines  # noqa: E402
from padrec_export.tiny import TinySpec, tiny_setup  # noqa: E402
from padrec_runtime.grammar import LAYOUT_KINDS  # noqa: E402

TINY = TinySpec(seed=5, levels=3, codebook=8, n_items=60, hidden=64, layers=2, heads=4, kv_heads=2)
LIMITS = ExportLimits(max_seq_len=160, max_history=12, max_batch=8, max_items=8, n_items=5, draft_steps=3,
                      tree_topk=3, tree_size=8)


@pytest.fixture(scope="session")
def tiny():
    """(catalogue, target, draft) of the tiny test model."""
    return tiny_setup(TINY)


# one tiny model per token layout; codebook 12: the digits layout spells codes 10 and 11 with two digits, so its
# items take 6 to 9 tokens
LAYOUT_TINY = {kind: TinySpec(seed=5, levels=3, codebook=12, n_items=60, hidden=64, layers=2, heads=4, kv_heads=2,
                              kind=kind) for kind in LAYOUT_KINDS}
LAYOUT_LIMITS = dataclasses.replace(LIMITS, max_seq_len=256)  # digits: longer prompts and lists


@pytest.fixture(scope="session")
def layout_models():
    """kind -> (catalogue, target, draft) of the tiny model of that layout, made on first use."""
    made: dict = {}

    def get(kind):
        if kind not in made:
            made[kind] = tiny_setup(LAYOUT_TINY[kind])
        return made[kind]
    return get


@pytest.fixture(scope="session", params=LAYOUT_KINDS)
def layout_engines(request, layout_models, tmp_path_factory):
    """(kind, models, engine directory) for each token layout: the tests using it run once per layout."""
    kind = request.param
    cat, target, draft = layout_models(kind)
    out = tmp_path_factory.mktemp(f"engines_{kind}") / "tiny"
    export_engines(target, draft, cat, out, "fp32", LAYOUT_LIMITS, progress=False)
    return kind, (cat, target, draft), out


@pytest.fixture(scope="session")
def engines_master(tiny, tmp_path_factory):
    cat, target, draft = tiny
    out = tmp_path_factory.mktemp("engines") / "tiny"
    export_engines(target, draft, cat, out, "fp32", LIMITS, progress=False)
    return out


@pytest.fixture(scope="session")
def engines_external_master(tiny, tmp_path_factory):
    """The tiny engines with every graph's weights in a `<graph>.onnx.data` file beside it."""
    cat, target, draft = tiny
    out = tmp_path_factory.mktemp("engines_external") / "tiny"
    export_engines(target, draft, cat, out, "fp32", LIMITS, progress=False, external_data=True)
    return out


@pytest.fixture
def engines(engines_master, tmp_path):
    """A private copy of the tiny engine directory, free to tamper with."""
    dst = tmp_path / "tiny"
    shutil.copytree(engines_master, dst)
    return dst


def polygraphy_cli() -> str:
    """The polygraphy script of this interpreter's environment (CI runs without activating it)."""
    return shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or "polygraphy"
