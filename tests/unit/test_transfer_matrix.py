"""The compatibility matrix: every (source profile, destination profile) pair × model shapes
(MHA, GQA, MQA, MLA latent; head dims 64/80/128/256) × block sizes (8/16/32 on each side).

Lossless pairs must reconstruct bit-exactly, lossy pairs within `quant.TOLERANCE` of the
destination dtype, impossible pairs raise IncompatibleKv. Runs through the real codec
(pack → header bytes → decode_header → KvWriter). tests/gpu/test_transfer_matrix_cuda.py runs
the same matrix with CUDA tensors (or set PDSERVE_TEST_DEVICE=cuda here).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from bench.kv_fill import calibrate_scales, fill_random
from engine.kv_spec import KvSpec, ScaleGranularity
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import convert_kv, read_tokens_float
from transfer.convert.profiles import PROFILES, KvModelShape, profile
from transfer.convert.quant import is_lossless_cast, tolerance
from transfer.wire.errors import IncompatibleKv

NAMES = [p.name for p in PROFILES]
KINDS = {"mha": 4, "gqa": 2, "mqa": 1, "mla": 1}
HEAD_DIMS = (64, 80, 128, 256)
# Per cell: one same-size pair (block-copy path) and re-blocking up and down; all nine pairs
# run in test_reblocking_all_pairs.
BLOCK_PAIRS = [(8, 8), (16, 32), (32, 16)]
TOKENS = (8, 45)  # crosses block boundaries, unaligned end (and unaligned start for block 16/32)
DEVICE = os.environ.get("PDSERVE_TEST_DEVICE", "cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_shape(kind: str, head_dim: int) -> KvModelShape:
    return KvModelShape(f"{kind}-{head_dim}", 2, KINDS[kind], head_dim, is_latent=kind == "mla")


def block_table(num_tokens: int, block_size: int, num_blocks: int,
                gen: torch.Generator) -> list[int]:
    need = -(-num_tokens // block_size)
    return torch.randperm(num_blocks, generator=gen)[:need].tolist()


def assert_close(src_vals: torch.Tensor, dst_vals: torch.Tensor, dst: KvSpec,
                 dst_cache: PagedKvCache, lossless: bool, what: str) -> None:
    if lossless:
        assert torch.equal(src_vals, dst_vals), f"{what}: lossless pair not bit-exact"
        return
    rel, abs_units = tolerance(dst.dtype)
    scale = 1.0
    if dst_cache.scales is not None:
        scale = max(float(s.max()) for s in dst_cache.scales)
    bound = rel * src_vals.abs() + abs_units * scale + 1e-6 * src_vals.abs()
    worst = float(((dst_vals - src_vals).abs() - bound).max())
    assert worst <= 0, f"{what}: error exceeds the {dst.dtype.value} tolerance by {worst}"


def run_pair(src_name: str, dst_name: str, shape: KvModelShape, sb: int, db: int, seed: int,
             device: str = DEVICE) -> None:
    gen = torch.Generator().manual_seed(seed)
    src_spec = profile(src_name).spec_for(shape, sb)
    dst_spec = profile(dst_name).spec_for(shape, db)
    src = PagedKvCache.allocate(src_spec, 12, device=device)
    dst = PagedKvCache.allocate(dst_spec, 12, device=device)
    fill_random(src, gen)
    t0, t1 = TOKENS
    src_table = block_table(t1, sb, 12, gen)
    dst_table = block_table(t1, db, 12, gen)
    src_vals = read_tokens_float(src, src_table, t0, t1)
    if dst_spec.scale_granularity is src_spec.scale_granularity and src.scales is not None:
        for s, d in zip(src.scales, dst.scales or [], strict=True):  # same calibration
            d.copy_(s)
    else:
        calibrate_scales(dst, [v.abs().amax(dim=(1, 3)) for v in src_vals])
    report = convert_kv(src, src_table, dst, dst_table, t0, t1)
    dst_vals = read_tokens_float(dst, dst_table, t0, t1)
    lossless = is_lossless_cast(src_spec, dst_spec)
    assert report.is_lossless == lossless
    for layer, (a, b) in enumerate(zip(src_vals, dst_vals, strict=True)):
        assert_close(a, b, dst_spec, dst, lossless,
                     f"{src_name}->{dst_name} {shape.name} blocks {sb}->{db} layer {layer}")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dst_name", NAMES)
@pytest.mark.parametrize("src_name", NAMES)
def test_matrix(src_name: str, dst_name: str, kind: str, device: str = DEVICE) -> None:
    src_p, dst_p = profile(src_name), profile(dst_name)
    for i, head_dim in enumerate(HEAD_DIMS):
        shape = make_shape(kind, head_dim)
        if shape.is_latent and not (src_p.supports_mla and dst_p.supports_mla):
            with pytest.raises(IncompatibleKv, match="MLA"):
                profile(src_name).spec_for(shape, 16)
                profile(dst_name).spec_for(shape, 16)
            continue
        for j, (sb, db) in enumerate(BLOCK_PAIRS):
            run_pair(src_name, dst_name, shape, sb, db, seed=i * 100 + j, device=device)


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_reblocking_all_pairs(kind: str) -> None:
    for j, (sb, db) in enumerate(itertools.product((8, 16, 32), repeat=2)):
        run_pair("ampere", "hopper", make_shape(kind, 64), sb, db, seed=j)
        old = "volta" if kind != "mla" else "ampere"
        run_pair("ada", old, make_shape(kind, 128), sb, db, seed=j)


def test_matrix_lossless_pairs_exist() -> None:
    """Sanity: the matrix has lossless, lossy and impossible cells."""
    shape = make_shape("gqa", 64)
    lossless = {(a.name, b.name) for a in PROFILES for b in PROFILES
                if is_lossless_cast(a.spec_for(shape, 16), b.spec_for(shape, 16))}
    assert ("ampere", "hopper") in lossless and ("volta", "turing") in lossless
    assert ("ampere", "volta") not in lossless  # bf16 -> fp16
    assert ("ada", "hopper_fp8") not in lossless  # per-tensor -> per-head requantize
    assert profile("ada").spec_for(shape, 16).scale_granularity is ScaleGranularity.PER_TENSOR
