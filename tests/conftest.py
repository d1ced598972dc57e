"""Shared fixtures: a tiny exported engine directory (generated, never downloaded)."""
import shutil
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from padrec_export.onnx_export import ExportLimits, export_engines  # noqa: E402
from padrec_export.tiny import TinySpec, tiny_setup  # noqa: E402

TINY = TinySpec(seed=5, levels=3, codebook=8, n_items=60, hidden=64, layers=2, heads=4, kv_heads=2)
LIMITS = ExportLimits(max_seq_len=160, max_history=12, max_batch=8, max_items=8, n_items=5, draft_steps=3,
                      tree_topk=3, tree_size=8)


@pytest.fixture(scope="session")
def tiny():
    """(catalogue, target, draft) of the tiny test model."""
    return tiny_setup(TINY)


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
