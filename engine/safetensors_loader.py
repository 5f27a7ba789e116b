"""Hugging Face checkpoint directories: config.json -> `ModelConfig`, *.safetensors -> weights.

Owns the HF-specific side of loading: which files make up a checkpoint (single file or shards
listed in model.safetensors.index.json), reading config.json for the Llama / Mistral / Qwen2
families (old `rope_theta`/`rope_scaling` keys and transformers 5 `rope_parameters` alike), and
reading tensors one at a time, cast to the requested dtype (under tensor parallelism only the
rows or columns of this rank's shard are read from the file). Tokenizer files are read by
engine/tokenizer.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.config import ConfigError, ModelConfig
from engine.tp_plan import Shard, TpPlan

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
INDEX_FILE = "model.safetensors.index.json"


class HfCheckpointError(ConfigError):
    """An HF checkpoint directory that is incomplete or describes an unsupported model."""


def read_config_json(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise HfCheckpointError(f"{path} has no config.json; an HF checkpoint directory needs "
                                "config.json, *.safetensors and tokenizer.json")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HfCheckpointError(f"{config_path} is not valid JSON: {e}") from e


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the old keys or transformers 5 `rope_parameters`."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(cfg.get("rope_theta") or params.pop("rope_theta", None) or 10000.0)
    params.pop("rope_theta", None)
    scaling = dict(cfg.get("rope_scaling") or params)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def _eos_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def hf_model_config(path: str | Path) -> ModelConfig:
    """`ModelConfig` from `path`/config.json (no tensors read)."""
    path = Path(path)
    cfg = read_config_json(path)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HfCheckpointError(f"{path}/config.json: model_type {model_type!r} is not supported; "
                                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        hidden, num_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        theta, scaling = _rope(cfg)
        max_positions = int(cfg.get("max_position_embeddings", 2048))
        window = cfg.get("sliding_window")
        if window and (model_type == "mistral" or cfg.get("use_sliding_window")):
            # Full attention equals sliding-window attention up to the window: stay exact.
            max_positions = min(max_positions, int(window))
        return ModelConfig(
            architecture=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
            name=path.resolve().name,
        )
    except KeyError as e:
        raise HfCheckpointError(f"{path}/config.json lacks {e.args[0]!r}") from None


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint: the shards named by the index, else *.safetensors."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise HfCheckpointError(f"{path}: shards listed in {INDEX_FILE} are missing: "
                                    f"{', '.join(missing)}; the download is incomplete")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HfCheckpointError(f"{path} has no *.safetensors weights (pytorch_model.bin is not "
                                "read; convert it with "
                                "save_pretrained(dir, safe_serialization=True))")
    return files


def read_shard(source: Any, shard: Shard | None) -> torch.Tensor:
    """The part of a tensor (or a lazily read safetensors slice) that `shard` names, padded
    with zeros to the shard's size."""
    if shard is None:
        return source[:] if not isinstance(source, torch.Tensor) else source
    index = (slice(None),) * shard.dim + (slice(shard.start, shard.stop),)
    part = source[index]
    missing = shard.size - (shard.stop - shard.start)
    if missing:
        pad = [0, 0] * (part.dim() - 1 - shard.dim) + [0, missing]
        part = torch.nn.functional.pad(part, pad)
    return part


def load_safetensors_weights(path: str | Path, config: ModelConfig, dtype: torch.dtype,
                             plan: TpPlan | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint by HF name, cast to `dtype`, one tensor in memory at a time
    (with `plan`, only this TP rank's shard of each). A tied model's `lm_head.weight` is dropped
    (the embedding is used)."""
    plan = plan or TpPlan(config)
    weights: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if config.tie_word_embeddings and name == "lm_head.weight":
                    continue
                weights[name] = read_shard(fh.get_slice(name), plan.shard(name)).to(dtype)
    return weights
