"""Checkpoints: Hugging Face Llama / Qwen2 directories (config.json + safetensors) and the draft's own format.

A padrec target checkpoint *is* a Hugging Face checkpoint (so `LlamaForCausalLM.from_pretrained` opens it)
plus `padrec.json` with the token layout. A draft checkpoint is `draft.json` + `draft.safetensors`.
Weights are read with safetensors only: nothing on the load path unpickles.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from padrec_runtime.errors import CheckpointError

from .hf_config import hf_config, target_config_from_hf  # noqa: F401  (re-exported: the checkpoint format)
from .models import Draft, DraftConfig, Target

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # safetensors dtype -> torch
INDEX = "model.safetensors.index.json"  # a sharded checkpoint's tensor -> file map


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


def read_json_object(path: Path, what: str) -> dict:
    """A checkpoint's JSON file (config.json, padrec.json, draft.json): an object, else a CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what}: {path} not found | point at a checkpoint directory")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({exc}) | restore the file from its training run") \
            from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} holds a JSON {type(data).__name__} | expected an object "
                              "({\"key\": value, ...}) | restore the file from its training run")
    return data


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


def _weight_files(directory: Path, what: str) -> list:
    """The safetensors files of a checkpoint: the shards its index names, else every *.safetensors."""
    index = directory / INDEX
    if index.exists():
        weight_map = read_json_object(index, what).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{what}: {index.name} weight_map | got {type(weight_map).__name__} | expected "
                                  "a mapping of tensor names to shard files | re-save the checkpoint")
        files = [directory / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{what}: shards {missing[:3]} named in {index.name} not found in {directory} | "
                                  "copy every shard of the checkpoint")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{what}: no *.safetensors in {directory} | save with safe_serialization=True")
    return files


def _headers(files: list, what: str) -> dict:
    """name -> (file, shape, safetensors dtype) of every tensor, read from the headers only (no weights)."""
    out = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as sf:
                for name in sf.keys():
                    sl = sf.get_slice(name)
                    if name in out:
                        raise CheckpointError(f"{what}: tensor {name} in both {out[name][0].name} and {f.name} | "
                                              "re-save the checkpoint")
                    out[name] = (f, tuple(sl.get_shape()), sl.get_dtype())
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{what}: {f.name} is not a readable safetensors file ({exc})") from None
    return out


def _check_against(model: torch.nn.Module, shapes: dict, what: str) -> None:
    """The checkpoint's tensor names and shapes equal the model's (checked before any weight is read)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
    if missing or extra:
        raise CheckpointError(f"{what}: weights do not match the config | missing {missing[:5]} | "
                              f"unexpected {extra[:5]} | check config.json against the weights")
    for k, shape in shapes.items():
        if shape != own[k]:
            raise CheckpointError(f"{what}: {k} | got shape {shape} | expected {own[k]} from config.json | "
                                  "check config.json against the weights")


def load_target(path, dtype: torch.dtype | None = torch.float32) -> Target:
    """A Target from a Hugging Face Llama/Qwen2 directory (ours are the same format): one safetensors file,
    several, or shards with model.safetensors.index.json. Names, shapes and dtypes are checked from the
    headers before a weight is read; each tensor is then read in the checkpoint's dtype and converted only
    where `dtype` differs (dtype None: keep the checkpoint's, e.g. bf16, with no fp32 copy made)."""
    path = Path(path)
    what = f"target {path}"
    cfg = target_config_from_hf(read_json_object(path / "config.json", "target"))
    headers = {_hf_to_ours(k): v for k, v in _headers(_weight_files(path, what), what).items()
               if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        headers.pop("lm_head.weight", None)  # Hugging Face may save the tied head; it is the embedding
        if "embed_tokens.weight" in headers:
            headers["lm_head.weight"] = headers["embed_tokens.weight"]
    with torch.device("meta"):  # sizes only: a config with absurd sizes allocates nothing
        model = Target(cfg)
    _check_against(model, {k: v[1] for k, v in headers.items()}, what)
    bad = {k: v[2] for k, v in headers.items() if v[2] not in DTYPES}
    if bad:
        name = next(iter(bad))
        raise CheckpointError(f"{what}: {name} | got dtype {bad[name]} | expected one of {', '.join(DTYPES)} | "
                              "dequantize the checkpoint first")
    want = dtype or DTYPES[headers["embed_tokens.weight"][2]]
    state = {}
    for f in sorted({v[0] for v in headers.values()}):
        with safe_open(str(f), "pt") as sf:
            for name in sf.keys():
                ours = _hf_to_ours(name)
                if ours in headers and headers[ours][0] == f:  # one tensor at a time, converted only if needed
                    t = sf.get_tensor(name)
                    state[ours] = t if t.dtype == want else t.to(want)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def target_digest(path) -> str:
    """sha256 of the raw bytes of the target's embedding and output head as stored (independent of the dtype
    they are loaded in): what a draft shares with its target, so a draft can name the target it was trained on."""
    path = Path(path)
    what = f"target {path}"
    headers = _headers(_weight_files(path, what), what)
    h = hashlib.sha256()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in headers:
            h.update(name.encode())
            _hash_tensor_bytes(h, headers[name][0], name)
    return h.hexdigest()


def _hash_tensor_bytes(h, file: Path, name: str, chunk: int = 1 << 24) -> None:
    """Feed one tensor's stored bytes to hash h, streamed from the safetensors file (never read whole)."""
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        begin, end = json.loads(fh.read(n))[name]["data_offsets"]
        fh.seek(8 + n + begin)
        left = end - begin
        while left:
            block = fh.read(min(chunk, left))
            h.update(block)
            left -= len(block)


def save_target(model: Target, path, extra: dict | None = None) -> None:
    """Write a Hugging Face-compatible checkpoint (+ padrec.json with `extra`, e.g. the token layout)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = hf_config(model.cfg)
    config["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    # each tensor as it is (a bf16 target stays bf16), copied to the host one at a time
    state = {_ours_to_hf(k): v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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
    # fp32 on the host whatever the draft trained in (its shared embedding and head are not written)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.trainable_state().items()},
              str(path / "draft.safetensors"))


def load_draft(path, target: Target) -> Draft:
    """A Draft bound to its target (whose embedding and head it shares)."""
    path = Path(path)
    meta = read_json_object(path / "draft.json", "draft")
    if meta.get("format") != "padrec-draft" or meta.get("version") != 1:
        raise CheckpointError(f"draft: {path / 'draft.json'} is not a padrec-draft v1 checkpoint")
    try:
        cfg = DraftConfig(**meta["config"])
    except TypeError as exc:
        raise CheckpointError(f"draft: draft.json config: {exc}") from None
    if (cfg.hidden_size, cfg.vocab_size) != (target.cfg.hidden_size, target.cfg.vocab_size):
        raise CheckpointError(f"draft {path}: hidden {cfg.hidden_size}, vocab {cfg.vocab_size} | its target has hidden "
                              f"{target.cfg.hidden_size}, vocab {target.cfg.vocab_size} | give the draft trained "
                              "with this target, or train one for it (padrec train-draft)")
    model = Draft(cfg, target)
    state = _read_safetensors(path, "draft")
    state.update({k: v for k, v in model.state_dict().items() if k.startswith(("embed_tokens.", "lm_head."))})
    _load_state(model, state, f"draft {path}")
    return model.eval()


def check_draft_pairing(draft_dir, target_dir) -> None:
    """A draft written by `padrec train-draft` names its target's digest: refuse it with any other target."""
    meta_path = Path(draft_dir) / "draft.json"
    want = read_json_object(meta_path, "draft").get("target_digest") if meta_path.exists() else None
    if want is not None and want != target_digest(target_dir):
        raise CheckpointError(f"draft {draft_dir}: trained against a target with embedding/head digest {want[:12]} | "
                              f"got {target_digest(target_dir)[:12]} from {target_dir} | train the draft against "
                              "this target (padrec train-draft)")
