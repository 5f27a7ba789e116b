"""GGUF checkpoints: header parsing, `ModelConfig` from metadata, and dequantized tensors.

Owns everything GGUF-specific about weights: the file header (metadata + tensor directory,
parsed without touching tensor data, so reading the config is cheap), the metadata ->
`ModelConfig` mapping, the GGUF -> Hugging Face tensor names, dequantization (through
`gguf.quants.dequantize`) and undoing llama.cpp's q/k row permutation. Under tensor
parallelism only a rank's shard is dequantized: its rows, or its columns when they fall on
whole quantization blocks (else the rows are dequantized whole and cut). Tokenization lives in
engine/tokenizer.py, which reads the `tokenizer.*` keys of the `GgufFile` parsed here.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf.quants
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from engine.config import ConfigError, ModelConfig
from engine.tp_plan import Shard, TpPlan

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")
_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types -> struct formats (fixed-size scalars); 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GgufError(ConfigError):
    """A GGUF file that cannot be read or describes a model this engine does not run."""


@dataclass(frozen=True)
class GgufTensorInfo:
    """One entry of the tensor directory. `shape` is in torch (row-major) order."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section

    @property
    def num_bytes(self) -> int:
        block_elems, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        num_elems = int(np.prod(self.shape, dtype=np.int64))
        return num_elems // block_elems * block_bytes


@dataclass(frozen=True)
class GgufFile:
    """A parsed GGUF header: metadata and tensor directory; tensor bytes stay on disk."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GgufTensorInfo]
    data_offset: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_key(self, key: str, default: Any = None) -> Any:
        """`{architecture}.{key}`, e.g. arch_key("block_count") -> metadata["llama.block_count"]."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


class _Cursor:
    """Little-endian reads from a byte buffer (an mmap of the file)."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def scalar(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise GgufError(f"{self.path}: truncated GGUF header at byte {self.pos}; "
                            "the file is incomplete, download it again") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a tokenizer's vocabulary and merges: 10^5 of them, read in
        one tight loop)."""
        buf, pos, out = self.buf, self.pos, []
        unpack = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                (length,) = unpack(buf, pos)
                out.append(buf[pos + 8:pos + 8 + length].decode("utf-8", errors="replace"))
                pos += 8 + length
        except struct.error:
            raise GgufError(f"{self.path}: truncated GGUF header at byte {pos}; "
                            "the file is incomplete, download it again") from None
        self.pos = pos
        return out

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _SCALAR_FORMATS and item_type != 7:
                dtype = np.dtype(_SCALAR_FORMATS[item_type])
                try:
                    arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                except ValueError:  # fewer bytes left than the array says it holds
                    raise GgufError(f"{self.path}: truncated GGUF header at byte {self.pos}; "
                                    "the file is incomplete, download it again") from None
                self.pos += count * dtype.itemsize
                return arr.tolist()
            if item_type == _STRING:
                return self.strings(count)
            return [self.value(item_type) for _ in range(count)]
        if value_type not in _SCALAR_FORMATS:
            raise GgufError(f"{self.path}: unknown GGUF metadata type {value_type} at byte "
                            f"{self.pos}; the file is corrupt or from a newer GGUF version")
        return self.scalar(_SCALAR_FORMATS[value_type])


def read_gguf(path: str | Path) -> GgufFile:
    """Parse the header of a GGUF file (v2/v3). Reads metadata only, never tensor data."""
    path = Path(path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _MAGIC:
            raise GgufError(f"{path} is not a GGUF file "
                            f"(magic {bytes(buf[:4])!r}, expected b'GGUF')")
        cur = _Cursor(buf, path)
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise GgufError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        num_tensors, num_kv = cur.scalar("<Q"), cur.scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("<I"))
        tensors: dict[str, GgufTensorInfo] = {}
        for _ in range(num_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            ggml_type, offset = cur.scalar("<I"), cur.scalar("<Q")
            tensors[name] = GgufTensorInfo(name, tuple(reversed(dims)), ggml_type, offset)
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_offset = -(-cur.pos // alignment) * alignment
    return GgufFile(path, metadata, tensors, data_offset)


def _eos_ids(gf: GgufFile) -> tuple[int, ...]:
    eos = gf.get("tokenizer.ggml.eos_token_id")
    eot = gf.get("tokenizer.ggml.eot_token_id")
    return tuple(dict.fromkeys(i for i in (eos, eot) if i is not None))


def _rope_scaling(gf: GgufFile) -> dict[str, Any] | None:
    kind = gf.arch_key("rope.scaling.type")
    if "rope_freqs.weight" in gf.tensors:
        raise GgufError(f"{gf.path.name} stores llama3-style rope frequencies as a tensor "
                        "(rope_freqs.weight), which this engine does not read yet; "
                        "use the model's Hugging Face directory instead")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind,
                               "factor": float(gf.arch_key("rope.scaling.factor", 1.0))}
    original = gf.arch_key("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def gguf_model_config(gf: GgufFile) -> ModelConfig:
    """`ModelConfig` from GGUF metadata and the tensor directory (no tensor data read)."""
    arch = gf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GgufError(f"{gf.path.name}: architecture {arch!r} is not supported; "
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    required = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")
    missing = [f"{arch}.{k}" for k in required if gf.arch_key(k) is None]
    if missing or "token_embd.weight" not in gf.tensors:
        raise GgufError(f"{gf.path.name}: missing {missing or ['token_embd.weight']}; "
                        "the file is not a complete model checkpoint")
    hidden = int(gf.arch_key("embedding_length"))
    num_heads = int(gf.arch_key("attention.head_count"))
    vocab = gf.tensors["token_embd.weight"].shape[0]  # rows of the embedding, >= tokenizer size
    bos = gf.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(gf.arch_key("feed_forward_length")),
        num_layers=int(gf.arch_key("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(gf.arch_key("attention.head_count_kv", num_heads)),
        head_dim=int(gf.arch_key("attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(gf.arch_key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(gf.arch_key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(gf),
        max_position_embeddings=int(gf.arch_key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in gf.tensors,
        attention_bias="blk.0.attn_q.bias" in gf.tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=_eos_ids(gf),
        name=str(gf.get("general.name", gf.path.stem)),
    )


def hf_tensor_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name; None for tensors the model does not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _raw_rows(buf: mmap.mmap, data_offset: int,
              info: GgufTensorInfo) -> tuple[np.ndarray, GGMLQuantizationType]:
    """The tensor's bytes as [num_rows, row_bytes] uint8 (a view of the file) and its type."""
    try:
        qtype = GGMLQuantizationType(info.ggml_type)
    except ValueError:
        raise GgufError(f"tensor {info.name}: unknown ggml type {info.ggml_type}") from None
    start = data_offset + info.offset
    if start + info.num_bytes > len(buf):
        raise GgufError(f"tensor {info.name} runs past the end of the file; download it again")
    raw = np.frombuffer(buf, dtype=np.uint8, count=info.num_bytes, offset=start)
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    row_elems = info.shape[-1]
    if row_elems % block_elems:
        raise GgufError(f"tensor {info.name}: row of {row_elems} values is not a whole number "
                        f"of {qtype.name} blocks ({block_elems})")
    return raw.reshape(-1, row_elems // block_elems * block_bytes), qtype


VALUES_PER_CALL = 1 << 22
"""Quantized rows are dequantized about this many values (16 MiB of float32) at a time."""


def _dequantize_rows(rows: np.ndarray, qtype: GGMLQuantizationType, name: str) -> np.ndarray:
    """[num_rows, row_bytes] raw -> [num_rows, row_elems] float32.

    A quantized type goes through the gguf package's own block math (its class's
    `dequantize_rows`, the same values as `gguf.quants.dequantize`) a few million values per
    call: `dequantize` calls it 16 rows at a time, which was half of SmolLM2's load time."""
    quant = getattr(gguf.quants, qtype.name, None)
    if quant is not None and hasattr(quant, "dequantize_rows"):
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        row_elems = rows.shape[1] // block_bytes * block_elems
        out = np.empty((rows.shape[0], row_elems), dtype=np.float32)
        step = max(1, VALUES_PER_CALL // row_elems)
        try:
            quant.init_grid()
            for start in range(0, rows.shape[0], step):
                out[start:start + step] = quant.dequantize_rows(rows[start:start + step])
        except NotImplementedError:
            pass  # the generic path below says what to do
        else:
            return out
    try:
        values = dequantize(rows, qtype)
    except NotImplementedError:
        raise GgufError(f"tensor {name}: {qtype.name} dequantization is not available in "
                        "the installed gguf package; upgrade it (pip install -U gguf)") from None
    return values.astype(np.float32, copy=False)


def dequantize_tensor(buf: mmap.mmap, data_offset: int, info: GgufTensorInfo,
                      shard: Shard | None = None) -> np.ndarray:
    """Raw GGUF bytes -> float32 array of `info.shape` (or of the `shard` of it, padded)."""
    rows, qtype = _raw_rows(buf, data_offset, info)
    if shard is None or len(info.shape) == 1:
        values = _dequantize_rows(rows, qtype, info.name).reshape(info.shape)
        return values if shard is None else _cut(values, shard)
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    if shard.dim == 0:  # a rank's rows: dequantize only those
        values = _dequantize_rows(rows[shard.start:shard.stop], qtype, info.name)
        return _cut(values, Shard(0, 0, shard.stop - shard.start, shard.size))
    if shard.start % block_elems == 0 and shard.stop % block_elems == 0:  # whole blocks
        blocks = rows.reshape(rows.shape[0], -1, block_bytes)
        part = blocks[:, shard.start // block_elems:shard.stop // block_elems]
        return _dequantize_rows(np.ascontiguousarray(part).reshape(rows.shape[0], -1), qtype,
                                info.name)
    return _cut(_dequantize_rows(rows, qtype, info.name).reshape(info.shape), shard)


def _cut(values: np.ndarray, shard: Shard) -> np.ndarray:
    index = (slice(None),) * shard.dim + (slice(shard.start, shard.stop),)
    part = values[index]
    missing = shard.size - (shard.stop - shard.start)
    if not missing:
        return part
    pad = [(0, 0)] * part.ndim
    pad[shard.dim] = (0, missing)
    return np.pad(part, pad)


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `permute`).

    llama.cpp reorders each head's rows from HF's half-split rotary layout to interleaved pairs:
    gguf rows [head, half, pair] <- hf rows [head, pair, half]. Works for weights and biases.
    """
    rows = weight.shape[0]
    head_half = rows // num_heads // 2
    w = weight.reshape(num_heads, head_half, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape).contiguous()


def iter_gguf_tensors(gf: GgufFile, plan: TpPlan | None = None
                      ) -> Iterator[tuple[GgufTensorInfo, np.ndarray]]:
    """(info, float32 array of info.shape, or of this TP rank's shard of it) for every tensor
    in file order; each array is a fresh, writable copy (nothing keeps the file mapped after
    the loop)."""
    with open(gf.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for info in gf.tensors.values():
            name = hf_tensor_name(info.name)
            shard = plan.shard(name) if plan is not None and name is not None else None
            values = dequantize_tensor(buf, gf.data_offset, info, shard)
            if not values.flags.writeable:  # a view of the mmap (F32): copy out before closing
                values = values.copy()
            yield info, values
            del values


def load_gguf_weights(gf: GgufFile, config: ModelConfig, dtype: torch.dtype,
                      plan: TpPlan | None = None) -> dict[str, torch.Tensor]:
    """All model tensors (with `plan`, this TP rank's shard of each), dequantized, renamed to
    HF names, q/k un-permuted, cast to `dtype`."""
    plan = plan or TpPlan(config)
    weights: dict[str, torch.Tensor] = {}
    is_permuted = config.architecture in ("llama", "mistral")  # llama.cpp leaves qwen2 alone
    for info, values in iter_gguf_tensors(gf, plan):
        name = hf_tensor_name(info.name)
        if name is None:
            continue
        tensor = torch.from_numpy(values)
        if is_permuted and ".q_proj." in name:
            tensor = unpermute_qk(tensor, plan.num_heads)  # per head: a shard of whole heads
        elif is_permuted and ".k_proj." in name:
            tensor = unpermute_qk(tensor, plan.num_kv_heads)
        weights[name] = tensor.to(dtype)
    return weights
