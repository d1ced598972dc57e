"""Bring your own target: `padrec train-draft` on an outside Hugging Face checkpoint, then export, then recommend;
resumable training; a draft refuses a target it was not trained against."""
import json

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from padrec_export.cli import main
from padrec_runtime.errors import CheckpointError
from padrec_runtime.grammar import Catalogue, TokenLayout

LAYOUT = TokenLayout(levels=2, codebook=48)  # 5 special + 96 code tokens; 48 x 48 IDs hold ml-100k's 1,682 items


def _outside_target(path, seed: int = 0):
    """A Llama checkpoint made by transformers (random weights), with the token layout and a catalogue of every
    ml-100k item beside it: what an engineer brings."""
    data = pytest.importorskip("padrec_export.data").load_dataset("ml-100k")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=LAYOUT.vocab_size, hidden_size=64, intermediate_size=112,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(3.0).add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(path)
    (path / "padrec.json").write_text(json.dumps({"layout": {"levels": 2, "codebook": 48}}))
    flat = np.random.default_rng(seed).choice(48 * 48, size=len(data.item_ids), replace=False)
    Catalogue(LAYOUT, data.item_ids, np.stack([flat // 48, flat % 48], axis=1)).save(path / "catalogue.json")
    return data


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    pytest.importorskip("recbole")
    root = tmp_path_factory.mktemp("byot")
    data = _outside_target(root / "target")
    return root, data


@pytest.fixture(autouse=True)
def few_examples(monkeypatch):
    """The first 8 training windows only: CPU training time is what these tests would otherwise measure."""
    from padrec_export import own_target
    full = own_target.draft_examples
    monkeypatch.setattr(own_target, "draft_examples", lambda *args: full(*args)[:8])


def test_train_draft_export_recommend_equals_ar(outside, tmp_path):
    """The CLI path on a target padrec did not train: one epoch over three users, export, then greedy lists with
    the fused draft chain equal target-only lists, with more than one token committed per target pass."""
    from padrec_runtime import DecodeParams, Recommender
    root, data = outside
    cli = CliRunner()
    res = cli.invoke(main, ["train-draft", "--target", str(root / "target"), "--dataset", "ml-100k", "--out",
                            str(tmp_path / "draft"), "--epochs", "1", "--users", "1", "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["examples"] > 0 and report["steps"] >= 1 and report["resumed_from_epoch"] == 0
    assert (tmp_path / "draft" / "train_state.pt").exists()
    res = cli.invoke(main, ["export", "--target", str(root / "target"), "--draft", str(tmp_path / "draft"), "--out",
                            str(tmp_path / "engines"), "--max-seq-len", "160", "--max-history", "20",
                            "--max-batch", "4", "--draft-steps", "3", "--no-in-place"])
    assert res.exit_code == 0, res.output
    rec = Recommender(tmp_path / "engines")
    histories = [seq[:12] for seq in list(data.sequences.values())[:4]]
    ar = rec.recommend(histories, n_items=6, params=DecodeParams(speculate="off"))
    spec = rec.recommend(histories, n_items=6, params=DecodeParams(speculate="chain", draft_steps=3))
    assert [r.tokens for r in spec.lists] == [r.tokens for r in ar.lists]
    print(f"tau {spec.tau:.3f} over {spec.rounds} rounds")
    assert spec.tau > 1.0 and spec.rounds < ar.rounds


def test_train_draft_resumes_where_it_stopped(outside, tmp_path, monkeypatch):
    """A run stopped after its first epoch's state was saved, then rerun, ends with the draft an uninterrupted
    run writes (same batches, optimizer and schedule); a rerun with other settings is refused."""
    from padrec_export import own_target
    from padrec_export.train import TrainConfig
    root, _ = outside
    full = own_target.draft_examples
    monkeypatch.setattr(own_target, "draft_examples", lambda *args: full(*args)[:4])
    cfg = TrainConfig(epochs=2, batch_size=2)
    whole = own_target.train_draft_for(root / "target", "ml-100k", tmp_path / "whole", cfg=cfg, users=2,
                                       progress=False)
    save = own_target._save_state

    def save_then_stop(out, settings, progress):
        save(out, settings, progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(own_target, "_save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        own_target.train_draft_for(root / "target", "ml-100k", tmp_path / "cut", cfg=cfg, users=2, progress=False)
    monkeypatch.setattr(own_target, "_save_state", save)
    again = own_target.train_draft_for(root / "target", "ml-100k", tmp_path / "cut", cfg=cfg, users=2,
                                       progress=False)
    assert again["resumed_from_epoch"] == 1 and again["steps"] == whole["steps"]
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / d / "draft.safetensors") for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="other settings \\(kind"):
        own_target.train_draft_for(root / "target", "ml-100k", tmp_path / "cut", kind="eagle", cfg=cfg, users=2,
                                   progress=False)


def test_draft_refuses_a_target_it_was_not_trained_against(outside, tmp_path):
    from padrec_export import own_target
    from padrec_export.pipeline import export_checkpoints
    from padrec_export.train import TrainConfig
    root, _ = outside
    own_target.train_draft_for(root / "target", "ml-100k", tmp_path / "draft", cfg=TrainConfig(epochs=1), users=1,
                               progress=False)
    _outside_target(tmp_path / "other", seed=1)  # same shapes, other weights
    with pytest.raises(CheckpointError, match="train the draft against this target"):
        export_checkpoints(tmp_path / "other", tmp_path / "draft", tmp_path / "engines")
