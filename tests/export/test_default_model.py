"""The embedded default: speculative lists equal AR lists for held-out users, through the ONNX runtime."""
import shutil

import pytest

from padrec_export.data import load_dataset, make_split
from padrec_export.demo import cached_default_engines, default_engines_key, default_model_dir, run_demo
from padrec_runtime import DecodeParams, Recommender


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """The default model exported once into a private demo cache ($PADREC_CACHE) for this module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PADREC_CACHE", str(tmp_path_factory.mktemp("cache")))
    out = cached_default_engines("ml-100k")
    yield out
    mp.undo()


@pytest.fixture(scope="module")
def default_engines(demo_cache):
    return Recommender(demo_cache)


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


def test_demo_runs_from_the_cache_without_exporting_again(demo_cache, capsys, monkeypatch):
    """A demo after the first one reuses the cached export: no export runs (it would raise here)."""
    pytest.importorskip("recbole")
    import padrec_export.pipeline as pipeline

    def no_export(*args, **kwargs):
        raise AssertionError("the demo exported again")
    monkeypatch.setattr(pipeline, "export_checkpoints", no_export)
    assert cached_default_engines("ml-100k") == demo_cache
    summary = run_demo(users=2, repeats=1)
    out = capsys.readouterr().out
    assert "tau" in out and "identical to AR: True" in out and len(summary["users"]) == 2
    assert "exporting" not in out


def test_a_damaged_demo_cache_is_named_with_its_fix(demo_cache, tmp_path, monkeypatch):
    """A cached export whose target graph changed is refused, naming the cache entry to delete; a cache place that
    is a file is refused before any export."""
    from padrec_runtime.errors import InputError, IntegrityError
    copy = tmp_path / "cache" / demo_cache.name
    shutil.copytree(demo_cache, copy)
    graph = copy / "target.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + bytes([graph.read_bytes()[-1] ^ 1]))
    monkeypatch.setenv("PADREC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(IntegrityError, match=rf"target.onnx: sha256 differs .* \| the demo's cached engines are "
                                             rf"damaged: delete {copy}"):
        run_demo(users=1, repeats=1)
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("PADREC_CACHE", str(tmp_path / "file"))
    with pytest.raises(InputError, match=r"demo cache .*file: cannot be made .* \| point PADREC_CACHE"):
        run_demo(users=1, repeats=1)


def test_demo_cache_key_follows_the_model_files(tmp_path):
    """The cache entry is keyed by the default model's bytes: a changed draft gets a new entry."""
    model = tmp_path / "ml-100k"
    shutil.copytree(default_model_dir("ml-100k"), model)
    key = default_engines_key(model)
    assert key == default_engines_key(default_model_dir("ml-100k"))
    f = model / "draft_padrec" / "draft.json"
    f.write_text(f.read_text() + " ")
    assert default_engines_key(model) != key


def test_evaluate_refuses_a_data_set_the_models_were_not_trained_on():
    from padrec_export.pipeline import evaluate
    from padrec_runtime import InputError
    with pytest.raises(InputError, match=r"--dataset ml-9k: the models in .* were trained on ml-100k .* \| drop "
                                         r"--dataset, or pass --dataset ml-100k"):
        evaluate(default_model_dir(), "ml-9k", users=2, progress=False)
    report = evaluate(default_model_dir(), users=2, progress=False)  # no --dataset: the models' own
    assert report["dataset"] == "ml-100k" and report["users"] == 2 and report["ar"]["tau"] == 1.0
