"""A checkpoint that kept its 32k text vocabulary, with the semantic-ID tokens at an offset and its own special
tokens, exports through a vocabulary map and decodes the lists transformers' generate writes."""
import json

import numpy as np
import pytest
import torch
import transformers

from padrec_export.pipeline import export_checkpoints
from padrec_export.tiny import TinySpec, tiny_catalogue
from padrec_runtime.errors import CheckpointError
from padrec_runtime.grammar import ListConstraint

TEXT, L, C = 32000, 2, 8  # text tokens, then L x C code tokens, then <sep> and <list>
NAMES = {**{f"<{'ab'[lv]}_{c}>": TEXT + lv * C + c for lv in range(L) for c in range(C)},
         "<sep>": TEXT + L * C, "<list>": TEXT + L * C + 1}
VOCAB = {"special": {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<sep>": "<sep>", "<list>": "<list>"},
         "codes": {"pattern": "<{level}_{code}>", "levels": ["a", "b"]}}


@pytest.fixture(scope="module")
def text_target(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "target"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=TEXT + L * C + 2, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(3.0).add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(path)
    added = [{"id": i, "content": name, "special": True} for name, i in NAMES.items()]
    (path / "tokenizer.json").write_text(json.dumps({"added_tokens": added, "model": {"vocab": {"hello": 5}}}))
    (path / "padrec.json").write_text(json.dumps({"layout": {"levels": L, "codebook": C}, "vocab": VOCAB}))
    cat = tiny_catalogue(TinySpec(levels=L, codebook=C, n_items=40))
    cat.save(path / "catalogue.json")
    return path, hf, cat


def _generate(hf, cat, history, n_items: int, full_ids: np.ndarray) -> list:
    """transformers' greedy generate over the full vocabulary, constrained by padrec's grammar (mapped to the
    checkpoint's ids); the output in padrec's token ids."""
    con = ListConstraint(cat, n_items=n_items)
    to_padrec = {int(f): i for i, f in enumerate(full_ids)}
    prompt = torch.from_numpy(full_ids[cat.prompt(history)][None])

    def allowed(_, sent):
        state = con.start(history)
        for tok in sent[prompt.shape[1]:].tolist():
            state = con.advance(state, to_padrec[tok])
        return full_ids[con.allowed(state)].tolist()

    out = hf.generate(prompt, max_new_tokens=con.list_length(), do_sample=False, prefix_allowed_tokens_fn=allowed,
                      pad_token_id=0, eos_token_id=None)
    return [to_padrec[t] for t in out[0, prompt.shape[1]:].tolist()]


def test_text_vocabulary_checkpoint_decodes_the_lists_generate_writes(text_target, tmp_path):
    from padrec_runtime import DecodeParams, Recommender
    path, hf, cat = text_target
    m = export_checkpoints(path, None, tmp_path / "engines", max_seq_len=96, max_history=8, max_batch=4)
    assert m.data["model"]["layout"]["vocab_size"] == 5 + L * C
    full_ids = np.array([0, 1, 2, NAMES["<sep>"], NAMES["<list>"]] + [TEXT + i for i in range(L * C)])
    rec = Recommender(tmp_path / "engines")
    histories = [cat.item_ids[[3, 7, 11]].tolist(), cat.item_ids[[0]].tolist(), cat.item_ids[20:26].tolist()]
    got = rec.recommend(histories, n_items=4, params=DecodeParams(speculate="off"))
    for h, r in zip(histories, got.lists):
        assert r.tokens == _generate(hf, cat, h, 4, full_ids)


@pytest.mark.parametrize("vocab,field", [
    ({**VOCAB, "special": {**VOCAB["special"], "<sep>": "<nope>"}}, "special <sep>"),
    ({**VOCAB, "special": {"<bos>": 1}}, "missing"),
    ({**VOCAB, "codes": {"offset": TEXT + 10}}, "expected 0.."),
    ({**VOCAB, "codes": {"ids": [[1, 2]]}}, "codes.ids"),
    ({**VOCAB, "special": {**VOCAB["special"], "<list>": 2}}, "two padrec tokens"),
    (None, "add a \"vocab\" map"),
])
def test_bad_vocabulary_map_names_the_entry(text_target, tmp_path, vocab, field):
    import shutil
    path, _, _ = text_target
    bad = tmp_path / "target"
    shutil.copytree(path, bad)
    meta = {"layout": {"levels": L, "codebook": C}, **({"vocab": vocab} if vocab else {})}
    (bad / "padrec.json").write_text(json.dumps(meta))
    from padrec_export.pipeline import load_target_dir
    with pytest.raises(CheckpointError, match=field):
        load_target_dir(bad)
