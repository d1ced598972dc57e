"""Checkpoints: Hugging Face Llama / Qwen2 directories (config.json + safetensors) and the draft's own format.

A padrec target checkpoint *is* a Hugging Face checkpoint (so `LlamaForCausalLM.from_pretrained` opens it)
plus `padrec.json` with the token layout. A draft checkpoint is `draft.json` + `draft.safetensors`.
Weights are read with safetensors only: nothing on the load path unpickles.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from padrec_runtime.errors import CheckpointError

from .models import Draft, DraftConfig, Target, TargetConfig

HF_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise CheckpointError(f"config.json rope_type: got {kind!r} | only default RoPE is supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def target_config_from_hf(hf: dict) -> TargetConfig:
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in HF_ARCHS:
        raise CheckpointError(f"config.json architectures: got {arch} | expected one of {', '.join(HF_ARCHS)}")
    try:
        n_heads = int(hf["num_attention_heads"])
        if hf.get("head_dim") not in (None, int(hf["hidden_size"]) // n_heads):
            raise CheckpointError(f"config.json head_dim: got {hf['head_dim']} | only hidden_size / heads is supported")
        return TargetConfig(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            intermediate_size=int(hf["intermediate_size"]), rope_theta=_rope_theta(hf),
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise CheckpointError(f"config.json: missing key {exc} | not a Llama/Qwen2 config") from None


def hf_config(cfg: TargetConfig) -> dict:
    arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    return {
        "architectures": [arch], "model_type": HF_ARCHS[arch], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.intermediate_size,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": 4096,
        "attention_bias": cfg.qkv_bias and arch == "LlamaForCausalLM", "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }


def _hf_to_ours(name: str) -> str:
    name = name.removeprefix("model.")
    return name.replace("mlp.", "")


def _ours_to_hf(name: str) -> str:
    if name == "lm_head.weight":
        return name
    for proj in ("gate_proj", "up_proj", "down_proj"):
        name = name.replace(f".{proj}.", f".mlp.{proj}.")
    return "model." + name


def _load_state(model: torch.nn.Module, state: dict, what: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(f"{what}: weights do not match the config | missing {missing[:5]} | "
                              f"unexpected {extra[:5]} | check config.json against the weights")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{what}: {k} | got shape {tuple(v.shape)} | expected {tuple(own[k].shape)}")
    model.load_state_dict(state)


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise CheckpointError(f"{what}: {path} not found | point at a checkpoint directory")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({exc})") from None


def _read_safetensors(directory: Path, what: str) -> dict:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{what}: no *.safetensors in {directory} | save with safe_serialization=True")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{what}: {f.name} is not a readable safetensors file ({exc})") from None
    return state


def load_target(path) -> Target:
    """A Target from a Hugging Face Llama/Qwen2 directory (ours are the same format)."""
    path = Path(path)
    cfg = target_config_from_hf(_read_json(path / "config.json", "target"))
    model = Target(cfg)
    state = {_hf_to_ours(k): v.float() for k, v in _read_safetensors(path, "target").items()
             if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state.get("embed_tokens.weight")
    _load_state(model, state, f"target {path}")
    return model.eval()


def save_target(model: Target, path, extra: dict | None = None) -> None:
    """Write a Hugging Face-compatible checkpoint (+ padrec.json with `extra`, e.g. the token layout)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(model.cfg), indent=2))
    state = {_ours_to_hf(k): v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    if extra is not None:
        (path / "padrec.json").write_text(json.dumps(extra, indent=2))


def save_draft(model: Draft, path, extra: dict | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "draft.json").write_text(json.dumps({"format": "padrec-draft", "version": 1,
                                                 "config": model.cfg.to_dict(), **(extra or {})}, indent=2))
    save_file({k: v.detach().contiguous() for k, v in model.trainable_state().items()},
              str(path / "draft.safetensors"))


def load_draft(path, target: Target) -> Draft:
    """A Draft bound to its target (whose embedding and head it shares)."""
    path = Path(path)
    meta = _read_json(path / "draft.json", "draft")
    if meta.get("format") != "padrec-draft" or meta.get("version") != 1:
        raise CheckpointError(f"draft: {path / 'draft.json'} is not a padrec-draft v1 checkpoint")
    try:
        cfg = DraftConfig(**meta["config"])
    except TypeError as exc:
        raise CheckpointError(f"draft: draft.json config: {exc}") from None
    model = Draft(cfg, target)
    state = _read_safetensors(path, "draft")
    state.update({k: v for k, v in model.state_dict().items() if k.startswith(("embed_tokens.", "lm_head."))})
    _load_state(model, state, f"draft {path}")
    return model.eval()
