"""Hugging Face Llama / Qwen2 checkpoints load with transformers' logits; bad checkpoints fail clearly."""
import json
import re

import pytest
import torch
import transformers

from padrec_export.checkpoint import load_draft, load_target, save_draft, save_target
from padrec_export.tiny import TinySpec, tiny_setup
from padrec_runtime.errors import CheckpointError

SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, max_position_embeddings=256)
HF = {  # name -> (model class, config class, config fields)
    "llama-gqa-bias": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                       dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, rope_theta=5000.0)),
    "llama-mha-bias": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                       dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True, rms_norm_eps=1e-5)),
    "llama-plain": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                    dict(num_attention_heads=4, num_key_value_heads=1)),
    "qwen2-tied": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config,
                   dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-untied": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config,
                     dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
}


def _hf_model(name: str, seed: int = 0, **override):
    """A tiny random Hugging Face model with noise on every weight, bias and norm (zero biases and unit norms
    would hide a missing or misplaced one)."""
    cls, cfg_cls, extra = HF[name]
    torch.manual_seed(seed)
    hf = cls(cfg_cls(**{**SIZES, **extra, **override})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


def _our_logits(model, ids):
    B, T = ids.shape
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None].expand(B, T, T)
    pos = torch.arange(T, dtype=torch.int32)[None].expand(B, T)
    with torch.inference_mode():
        return model(ids.int(), pos, mask, model.empty_past(B))[0]


@pytest.mark.parametrize("name", list(HF))
def test_hf_checkpoint_matches_transformers(tmp_path, name):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = load_target(tmp_path)
    c = ours.cfg
    llama_bias = hf.config.model_type == "llama" and hf.config.attention_bias
    assert (c.qkv_bias, c.o_bias) == ((True, False) if hf.config.model_type == "qwen2" else (llama_bias,) * 2)
    assert c.n_kv_heads == hf.config.num_key_value_heads and c.tie_embeddings == hf.config.tie_word_embeddings
    if c.o_bias:  # the output projection's bias is loaded, not left at zero
        assert ours.layers[0].self_attn.o_proj.bias.abs().max() > 0
    ids = torch.randint(0, 97, (3, 17))
    with torch.inference_mode():
        ref = hf(ids).logits
    assert (_our_logits(ours, ids) - ref).abs().max().item() <= 1e-4


REFUSED = [  # (model, config override or config.json edit, the field the error must name)
    ("llama-plain", dict(hidden_act="gelu"), "hidden_act"),
    ("llama-plain", dict(hidden_act="relu"), "hidden_act"),
    ("llama-plain", dict(mlp_bias=True), "mlp_bias"),
    ("llama-plain", dict(head_dim=32), "head_dim"),
    ("llama-plain", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type"),
    ("qwen2-untied", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), "sliding_window"),
    ("qwen2-untied", {"json": {"layer_types": None, "use_sliding_window": True, "max_window_layers": 1}},
     "sliding_window"),
    ("llama-plain", {"json": {"intermediate_size": 1e9}}, "intermediate_size"),
    ("llama-plain", {"json": {"intermediate_size": 10 ** 9}}, "_proj.weight | got shape"),
    ("llama-plain", {"json": {"num_attention_heads": 5}}, "num_attention_heads"),
    ("llama-plain", {"json": {"quantization_config": {"bits": 4}}}, "quantization_config"),
    ("llama-plain", {"json": {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}}, "architectures"),
]


@pytest.mark.parametrize("name,change,field", REFUSED, ids=[f"{f}-{i}" for i, (_, _, f) in enumerate(REFUSED)])
def test_config_the_model_does_not_compute_is_refused_by_name(tmp_path, name, change, field):
    """A config field that changes the computation and is not modelled raises CheckpointError naming it,
    before any weight is read (so absurd sizes allocate nothing); transformers computes something else there."""
    edit = change.get("json")
    hf = _hf_model(name, **({} if edit else change))
    hf.save_pretrained(tmp_path)
    if edit:
        path = tmp_path / "config.json"
        cfg = json.loads(path.read_text())
        cfg.update({k: v for k, v in edit.items() if v is not None})
        for k in [k for k, v in edit.items() if v is None]:
            cfg.pop(k, None)
        path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=field.replace("|", r"\|")):
        load_target(tmp_path)


def test_sharded_bf16_checkpoint_loads_in_its_own_dtype(tmp_path):
    """Shards named by model.safetensors.index.json load; a bf16 checkpoint loads as bf16 tensors bit for bit
    (dtype=None keeps the stored dtype: no fp32 copy is made), or converted tensor by tensor when asked."""
    hf = _hf_model("qwen2-untied").to(torch.bfloat16)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = load_target(tmp_path, dtype=None)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    theirs = {k.removeprefix("model.").replace("mlp.", ""): v for k, v in hf.state_dict().items()}
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    ids = torch.randint(0, 97, (2, 9))
    with torch.inference_mode():
        ref = hf.float()(ids).logits
    fp32 = load_target(tmp_path)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert (_our_logits(fp32, ids) - ref).abs().max().item() <= 1e-4
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    (tmp_path / next(iter(index["weight_map"].values()))).unlink()
    with pytest.raises(CheckpointError, match="shards"):
        load_target(tmp_path)


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
    with pytest.raises(CheckpointError, match=r"draft .*d: hidden \d+, vocab \d+ \| its target has hidden 32, .* "
                                              r"\| give the draft trained with this target"):
        load_draft(tmp_path / "d", other)


def test_llama_attention_bias_target_exports_with_its_output_bias(tmp_path):
    """Both target graphs (standard and ONNX Runtime's fused, cache in place) carry the o_proj bias: their logits
    equal PyTorch's, which equal transformers'."""
    from padrec_export.onnx_export import ExportLimits, export_engines
    from padrec_export.parity import compare_fused_target, compare_graph
    from padrec_export.tiny import tiny_catalogue
    from padrec_runtime.backends.onnxruntime import OrtBackend
    _hf_model("llama-gqa-bias").save_pretrained(tmp_path / "t")
    target = load_target(tmp_path / "t")
    cat = tiny_catalogue(TinySpec(levels=2, codebook=46, n_items=40))  # 5 special + 2 x 46 codes = 97 tokens
    m = export_engines(target, None, cat, tmp_path / "e", "fp32", ExportLimits(max_seq_len=64), progress=False)
    rows = compare_graph("target", target, False, OrtBackend(m, "target"), m.graph("target"), "fp32")
    rows += compare_fused_target(target, OrtBackend(m, "target_gqa"), m.graph("target_gqa"), "fp32")
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok][:3]


def test_bf16_checkpoint_exports_in_bf16_without_a_copy(tmp_path, monkeypatch):
    """`padrec export --precision bf16` of a bf16 checkpoint reads the tensors as stored and exports that model:
    no fp32 model and no converted copy are made (copy.deepcopy is what a conversion would call)."""
    import copy

    from padrec_export import onnx_export
    from padrec_export.pipeline import export_checkpoints
    from padrec_export.tiny import tiny_catalogue
    _hf_model("qwen2-tied").to(torch.bfloat16).save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "padrec.json").write_text(json.dumps({"layout": {"levels": 2, "codebook": 46}}))
    tiny_catalogue(TinySpec(levels=2, codebook=46, n_items=40)).save(tmp_path / "t" / "catalogue.json")
    copies, exported = [], []
    monkeypatch.setattr(onnx_export.copy, "deepcopy", lambda x, *a: copies.append(x) or copy.deepcopy(x, *a))
    real = onnx_export.export_graph
    monkeypatch.setattr(onnx_export, "export_graph", lambda model, *a: exported.append(model) or real(model, *a))
    m = export_checkpoints(tmp_path / "t", None, tmp_path / "e", precision="bf16", max_seq_len=64)
    assert m.data["precision"] == "bf16" and not copies and len(exported) == 1
    assert {p.dtype for p in exported[0].parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("text, words", [("[1]", "holds a JSON list | expected an object"),
                                         ("{bad", "is not valid JSON")])
def test_a_damaged_padrec_json_is_a_checkpoint_error_in_export_and_evaluate(tmp_path, text, words):
    import shutil

    from padrec_export.demo import default_model_dir
    from padrec_export.pipeline import evaluate, export_checkpoints
    models = tmp_path / "m"
    shutil.copytree(default_model_dir(), models)
    (models / "target" / "padrec.json").write_text(text)
    with pytest.raises(CheckpointError, match=f"padrec.json: .*padrec.json {words}"):
        export_checkpoints(models / "target", None, tmp_path / "e")
    with pytest.raises(CheckpointError, match=words):
        evaluate(models, users=1, progress=False)


@pytest.mark.parametrize("field, value", [("hidden_size", "128"), ("n_slots", 2.5), ("use_slot", 1), ("n_heads", 0),
                                          ("hidden_size", -32), ("rms_eps", float("inf"))])
def test_a_draft_config_of_the_wrong_types_names_the_field(tmp_path, field, value):
    _, target, draft = tiny_setup(TinySpec())
    save_draft(draft, tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "draft.json").read_text())
    meta["config"][field] = value
    (tmp_path / "d" / "draft.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"DraftConfig.{field}: got {re.escape(repr(value))} \| expected"):
        load_draft(tmp_path / "d", target)


def test_numpy_sizes_make_a_config_of_python_numbers():
    import numpy as np

    from padrec_export.models import DraftConfig
    cfg = DraftConfig(hidden_size=np.int64(64), vocab_size=np.int32(100), alpha_init=np.float32(0.5),
                      use_slot=np.bool_(True))
    assert json.loads(json.dumps(cfg.to_dict()))["hidden_size"] == 64 and type(cfg.use_slot) is bool
