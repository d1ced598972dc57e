"""The embedded default: speculative lists equal AR lists for held-out users, through the ONNX runtime."""
import pytest

from padrec_export.data import load_dataset, make_split
from padrec_export.demo import default_model_dir, run_demo
from padrec_export.pipeline import export_checkpoints
from padrec_runtime import DecodeParams, Recommender, RuntimeOptions


@pytest.fixture(scope="module")
def default_engines(tmp_path_factory):
    model = default_model_dir("ml-100k")
    out = tmp_path_factory.mktemp("default") / "eng"
    export_checkpoints(model / "target", model / "draft_padrec", out)
    return Recommender(out)


def test_speculative_equals_ar_on_held_out_users(default_engines):
    pytest.importorskip("recbole")
    split = make_split(load_dataset("ml-100k"))
    hist = [h for _, h, _ in split.test[:64]]
    for part in (hist[:32], hist[32:]):
        ar = [r.tokens for r in default_engines.recommend(part, params=DecodeParams(speculate="off")).lists]
        for mode in ("chain", "tree"):
            res = default_engines.recommend(part, params=DecodeParams(speculate=mode))
            assert [r.tokens for r in res.lists] == ar
            assert res.tau > 2.5  # a trained draft: most proposals accepted


def test_titles_come_from_the_installed_package(default_engines):
    pytest.importorskip("recbole")
    assert default_engines.catalogue.titles[0] == "Toy Story (1995)"


def test_demo_runs(capsys):
    pytest.importorskip("recbole")
    summary = run_demo(users=2, repeats=1)
    out = capsys.readouterr().out
    assert "tau" in out and "identical to AR: True" in out and len(summary["users"]) == 2
