"""Hugging Face Llama / Qwen2 config.json -> TargetConfig: every field that changes the computation is either
modelled or refused by name, so a checkpoint never loads into a model that computes something else.

Fields fall in three sets: modelled (sizes, RoPE base, norm eps, biases, tied head), refused unless they hold
the value the model computes (activation, sliding window, RoPE scaling, head_dim, MLP bias ...), and inert
(ids, dropout, bookkeeping; no effect on a forward pass in eval). Any other key is refused: padrec cannot know
whether it changes the logits.
"""
from __future__ import annotations

import math

from padrec_runtime.errors import CheckpointError

from .models import TargetConfig

ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# keys with no effect on an eval forward pass (token ids, dropout, init, caching, generation defaults, labels)
INERT = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "initializer_range", "attention_dropout", "max_position_embeddings", "pad_token_id", "bos_token_id",
    "eos_token_id", "sep_token_id", "decoder_start_token_id", "output_hidden_states", "output_attentions",
    "return_dict", "use_return_dict", "torchscript", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "tie_encoder_decoder", "cross_attention_hidden_size", "id2label", "label2id",
    "problem_type", "finetuning_task", "prefix", "task_specific_params", "tokenizer_class", "pruned_heads",
    "tf_legacy_loss", "pretraining_tp",  # pretraining_tp only split the same matmuls in old transformers
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens"})
# keys refused unless they hold the value padrec computes: key -> (allowed values, why it matters)
FIXED = {
    "hidden_act": (("silu",), "the MLP's activation (SwiGLU with SiLU)"),
    "mlp_bias": ((False, None), "biases on the MLP projections"),
    "partial_rotary_factor": ((1, 1.0, None), "RoPE on part of each head"),
}
# keys handled by their own checks below
MODELLED = frozenset({*SIZES, "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings",
                      "attention_bias", "rope_theta", "rope_scaling", "rope_parameters", "use_sliding_window",
                      "sliding_window", "max_window_layers", "layer_types"})


def _refuse(key: str, got, expected: str, fix: str) -> CheckpointError:
    return CheckpointError(f"config.json {key} | got {got!r} | expected {expected} | {fix}")


def _positive_int(hf: dict, key: str) -> int:
    if key not in hf:
        raise _refuse(key, None, "a positive integer", "not a Llama / Qwen2 config.json")
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(key, value, "a positive integer", "fix config.json")
    return value


def _positive_float(hf: dict, key: str, default: float) -> float:
    value = hf.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _refuse(key, value, "a positive number", "fix config.json")
    return float(value)


def _architecture(hf: dict) -> str:
    """'llama' or 'qwen2', from architectures and model_type (which must agree)."""
    archs = hf.get("architectures") or []
    kinds = {ARCHS.get(a, a) for a in archs}
    if hf.get("model_type") is not None:
        kinds.add(hf["model_type"])
    if len(kinds) != 1 or not kinds <= set(ARCHS.values()):
        raise _refuse("architectures / model_type", sorted(kinds) or None,
                      f"one of {', '.join(ARCHS)} (model_type llama / qwen2)",
                      "padrec loads Llama and Qwen2 decoders")
    return kinds.pop()


def _rope_theta(hf: dict) -> float:
    """The RoPE base; scaled or partial RoPE is refused (the engines compute plain RoPE)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise _refuse("rope_parameters", params, "a mapping", "fix config.json")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise _refuse("rope_scaling.rope_type", kind, "'default' (plain RoPE)",
                      "RoPE scaling (linear, dynamic, yarn, llama3, ...) is not modelled")
    extra = set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if extra:
        raise _refuse("rope_parameters", sorted(extra), "rope_type and rope_theta only", "RoPE variant not modelled")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse("rope_parameters.partial_rotary_factor", params["partial_rotary_factor"], "1.0",
                      "RoPE on part of each head is not modelled")
    return _positive_float({"rope_theta": params.get("rope_theta", hf.get("rope_theta"))}, "rope_theta", 10000.0)


def _check_full_attention(hf: dict, arch: str, n_layers: int) -> None:
    """Every layer attends to the whole sequence (Qwen2's sliding window is not modelled)."""
    types = hf.get("layer_types")
    if types is None and hf.get("use_sliding_window"):
        first = hf.get("max_window_layers", n_layers)  # Qwen2: layers from max_window_layers on slide
        types = ["full_attention" if i < first else "sliding_attention" for i in range(n_layers)]
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers:
            raise _refuse("layer_types", types, f"a list of {n_layers} layer types", "fix config.json")
        sliding = [i for i, t in enumerate(types) if t != "full_attention"]
        if sliding:
            raise _refuse("use_sliding_window / layer_types", f"{types[sliding[0]]} at layers {sliding[:8]}",
                          "full_attention in every layer",
                          "sliding-window attention is not modelled; a window of at least the engines' "
                          "max_seq_len is full attention: set use_sliding_window false")
    if arch == "llama" and hf.get("use_sliding_window"):
        raise _refuse("use_sliding_window", True, "false for Llama", "fix config.json")


def _check_keys(hf: dict) -> None:
    unknown = sorted(set(hf) - INERT - MODELLED - set(FIXED))
    if unknown:
        raise _refuse(unknown[0], hf[unknown[0]], "a key padrec models or knows to be inert",
                      f"padrec cannot tell whether {', '.join(unknown[:5])} change the logits; remove them from a "
                      "copy of config.json if they do not")
    for key, (allowed, what) in FIXED.items():
        if key in hf and hf[key] not in allowed:
            raise _refuse(key, hf[key], " or ".join(repr(a) for a in allowed if a is not None),
                          f"{what} is not modelled")


def target_config_from_hf(hf: dict) -> TargetConfig:
    """The TargetConfig a Hugging Face config.json describes; CheckpointError naming the field otherwise."""
    if not isinstance(hf, dict):
        raise _refuse("(top level)", type(hf).__name__, "a JSON object", "not a Hugging Face config.json")
    arch = _architecture(hf)
    _check_keys(hf)
    hidden, n_layers, n_heads = (_positive_int(hf, k) for k in ("hidden_size", "num_hidden_layers",
                                                                "num_attention_heads"))
    n_kv = _positive_int(hf, "num_key_value_heads") if hf.get("num_key_value_heads") is not None else n_heads
    if hidden % n_heads or n_heads % n_kv:
        raise _refuse("num_attention_heads / num_key_value_heads", (n_heads, n_kv),
                      f"heads dividing hidden_size {hidden} and kv heads dividing heads", "fix config.json")
    if hf.get("head_dim") not in (None, hidden // n_heads):
        raise _refuse("head_dim", hf["head_dim"], f"hidden_size / num_attention_heads = {hidden // n_heads}",
                      "a head size other than hidden / heads is not modelled")
    _check_full_attention(hf, arch, n_layers)
    for key in ("tie_word_embeddings", "attention_bias"):
        if hf.get(key) not in (None, True, False):
            raise _refuse(key, hf[key], "true or false", "fix config.json")
    if arch == "qwen2" and hf.get("attention_bias") is not None:
        raise _refuse("attention_bias", hf["attention_bias"], "absent for Qwen2 (q/k/v always have biases)",
                      "fix config.json")
    llama_bias = arch == "llama" and bool(hf.get("attention_bias"))
    return TargetConfig(
        vocab_size=_positive_int(hf, "vocab_size"), hidden_size=hidden, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, intermediate_size=_positive_int(hf, "intermediate_size"), rope_theta=_rope_theta(hf),
        rms_eps=_positive_float(hf, "rms_norm_eps", 1e-6), qkv_bias=arch == "qwen2" or llama_bias,
        o_bias=llama_bias, tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def hf_config(cfg: TargetConfig) -> dict:
    """The config.json of a TargetConfig: Qwen2 for q/k/v biases alone, Llama otherwise."""
    arch = "Qwen2ForCausalLM" if cfg.qkv_bias and not cfg.o_bias else "LlamaForCausalLM"
    out = {
        "architectures": [arch], "model_type": ARCHS[arch], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.intermediate_size,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": 4096, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    if arch == "LlamaForCausalLM":
        out["attention_bias"] = cfg.o_bias
    return out
