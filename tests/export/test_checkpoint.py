"""Hugging Face Llama / Qwen2 checkpoints load with transformers' logits; bad checkpoints fail clearly."""
import json

import pytest
import torch
import transformers

from padrec_export.checkpoint import load_draft, load_target, save_draft, save_target
from padrec_export.tiny import TinySpec, tiny_setup
from padrec_runtime.errors import CheckpointError

HF = [
    (transformers.LlamaForCausalLM, transformers.LlamaConfig, {"rope_theta": 5000.0}),
    (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {"tie_word_embeddings": True}),
]


def _our_logits(model, ids):
    B, T = ids.shape
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None].expand(B, T, T)
    pos = torch.arange(T, dtype=torch.int32)[None].expand(B, T)
    with torch.inference_mode():
        return model(ids.int(), pos, mask, model.empty_past(B))[0]


@pytest.mark.parametrize("cls,cfg_cls,extra", HF, ids=["llama", "qwen2"])
def test_hf_checkpoint_matches_transformers(tmp_path, cls, cfg_cls, extra):
    cfg = cfg_cls(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_target(tmp_path)
    ids = torch.randint(0, 97, (3, 17))
    with torch.inference_mode():
        ref = hf(ids).logits
    assert (_our_logits(ours, ids) - ref).abs().max().item() <= 1e-4


def test_our_checkpoint_opens_in_transformers(tmp_path):
    cat, target, draft = tiny_setup(TinySpec(qkv_bias=True))
    save_target(target, tmp_path / "t")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "t").eval()
    ids = torch.randint(0, cat.layout.vocab_size, (2, 11))
    with torch.inference_mode():
        assert (_our_logits(target, ids) - hf(ids).logits).abs().max().item() <= 1e-4
    save_draft(draft, tmp_path / "d")
    again = load_draft(tmp_path / "d", load_target(tmp_path / "t"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), draft.state_dict().values()))


def test_mismatched_checkpoint_names_the_problem(tmp_path):
    _, target, draft = tiny_setup(TinySpec())
    save_target(target, tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["hidden_size"] = 96
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_target(tmp_path / "t")
    with pytest.raises(CheckpointError, match="not found"):
        load_target(tmp_path / "nowhere")
    _, other, _ = tiny_setup(TinySpec(hidden=32))
    save_draft(draft, tmp_path / "d")
    with pytest.raises(CheckpointError, match="hidden"):
        load_draft(tmp_path / "d", other)
