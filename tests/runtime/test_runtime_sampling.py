"""The runtime's speculative sampling keeps the target's law (same statistical test as the reference)."""
import pytest

from padrec_export.onnx_export import ExportLimits, export_engines
from padrec_export.tiny import tiny_setup
from padrec_runtime.grammar import LAYOUT_KINDS, ListConstraint
from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
from padrec_runtime.loop.sampling import SamplingConfig
from tests.export.test_sampling import HISTORY, SPECS, chi_square_p, exact_law


@pytest.fixture(scope="module", params=LAYOUT_KINDS)
def setup(request, tmp_path_factory):
    """(recommender, target, constraint) of each token layout."""
    cat, target, draft = tiny_setup(SPECS[request.param])
    out = tmp_path_factory.mktemp("sampling") / "eng"
    export_engines(target, draft, cat, out, "fp32", ExportLimits(max_seq_len=64, max_history=4, max_batch=500,
                                                                 max_items=2, n_items=2), progress=False)
    return Recommender(out), target, ListConstraint(cat, n_items=2)


@pytest.mark.parametrize("speculate,options", [
    ("chain", {"draft_steps": 3}),
    ("tree", {"draft_steps": 3, "tree_topk": 2, "tree_size": 5, "temperature": 0.8}),
])
def test_runtime_sampling_keeps_target_law(setup, speculate, options):
    rec, target, con = setup
    law = exact_law(target, con, SamplingConfig(greedy=False, temperature=options.get("temperature", 1.0)))
    counts, taus = {}, []
    for seed in range(6):
        res = rec.recommend([HISTORY] * 500, params=DecodeParams(speculate=speculate, greedy=False, seed=seed, **options))
        taus.append(res.tau)
        for r in res.lists:
            counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
    assert max(taus) > 1.0
    assert chi_square_p(law, counts) > 1e-3
