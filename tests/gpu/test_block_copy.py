"""One-launch block gather/scatter on CUDA (transfer/convert/block_copy.py) against torch's own
copies.

Skips without CUDA or Triton. Covers word widths 8/4/2/1 (block sizes of 12, 20 and 5 bytes),
the sender's gather of whole payload buffers for several cache layouts (byte-equal to pack.py's
torch gather), and the receiver's scatter, through KvWriter and straight through the kernel:
destination blocks equal, every other block untouched."""

from __future__ import annotations

import pytest
import torch

from bench.kv_fill import fill_random
from engine.kv_spec import KvDtype, KvKind, KvLayout, KvSpec
from transfer.convert import block_copy
from transfer.convert.cache import PagedKvCache
from transfer.convert.pack import PackOptions, pack_kv
from transfer.convert.writer import KvWriter, PagedSink

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or not block_copy.is_available(torch.device("cuda")),
    reason="needs CUDA and Triton")]

DEV = torch.device("cuda")


SPECS = [
    KvSpec(6, 8, 128, 16, dtype=KvDtype.BFLOAT16),  # engine default: stacked NHD
    KvSpec(5, 2, 64, 32, dtype=KvDtype.FLOAT16, layout=KvLayout.HND, is_kv_stacked=False),
    KvSpec(4, 4, 80, 8, dtype=KvDtype.FP8_E4M3, layout=KvLayout.PAGED_V1, is_kv_stacked=False),
    KvSpec(3, 1, 576, 16, dtype=KvDtype.BFLOAT16, layout=KvLayout.MLA, kind=KvKind.LATENT),
    KvSpec(3, 1, 6, 1, dtype=KvDtype.FLOAT16),  # 12-byte blocks: 4-byte words
    KvSpec(3, 1, 5, 2, dtype=KvDtype.FLOAT16),  # 20-byte blocks, odd-word bases: 4 or 2
    KvSpec(3, 1, 5, 1, dtype=KvDtype.FP8_E5M2),  # 5-byte blocks: 1-byte words
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe()[:40])
def test_gather_matches_torch_gather_and_scatter_round_trips(spec: KvSpec) -> None:
    src = PagedKvCache.allocate(spec, 64, device=DEV)
    fill_random(src, torch.Generator(device="cpu").manual_seed(1))
    table = torch.randperm(64, generator=torch.Generator().manual_seed(2))[:20].tolist()
    tokens = 20 * spec.block_size
    packed = pack_kv(src, table, 0, tokens, request_id="r", options=PackOptions(chunk_bytes=1 << 16,
                                                                               allow_views=False))
    ids = packed.block_ids.to(DEV)
    by_buffer = packed.header.entries_by_buffer()
    buffers = []
    for i in range(len(packed.buffers)):
        want = packed.buffer(i).clone()
        got = torch.full_like(want, 0xAB)
        entries = by_buffer[i]
        back_to_back = all(e.offset == entries[0].offset + j * e.nbytes
                           for j, e in enumerate(entries))
        # True where the entries lie back to back, else False (torch's path)
        assert block_copy.gather_entries(src, ids, entries, got) == back_to_back
        torch.cuda.synchronize()
        buffers.append(got if back_to_back else want)
        assert torch.equal(buffers[-1], want), f"buffer {i}"
    # receiver: same spec, other blocks; the scatter kernel runs inside KvWriter.accept
    dst = PagedKvCache.allocate(spec, 64, device=DEV)
    dst_table = torch.randperm(64, generator=torch.Generator().manual_seed(3))[:20].tolist()
    writer = KvWriter(packed.header, PagedSink(dst, dst_table))
    for i, buf in enumerate(buffers):
        writer.accept(i, buf)
    assert writer.finish().path == "block_copy"
    # the same scatter straight through the kernel (asserting it applies) into a second cache
    direct = PagedKvCache.allocate(spec, 64, device=DEV)
    dst_ids = torch.tensor(dst_table, device=DEV)
    for i, buf in enumerate(buffers):
        for e in by_buffer[i]:
            blocks = buf[e.offset:e.offset + e.nbytes]
            assert block_copy.scatter_entry(
                direct, dst_ids[e.block_start:e.block_start + e.num_blocks], e, blocks)
    # and a whole buffer per launch (all its entries at their offsets), where the entries allow
    whole = PagedKvCache.allocate(spec, 64, device=DEV)
    for i, buf in enumerate(buffers):
        entries = by_buffer[i]
        ids_i = dst_ids[entries[0].block_start:entries[0].block_start + entries[0].num_blocks]
        if not block_copy.scatter_entries(whole, ids_i, entries, buf):
            for e in entries:
                assert block_copy.scatter_entry(
                    whole, dst_ids[e.block_start:e.block_start + e.num_blocks], e,
                    buf[e.offset:e.offset + e.nbytes])
    torch.cuda.synchronize()
    untouched = sorted(set(range(64)) - set(dst_table))
    for cache in (dst, direct, whole):
        for layer in range(spec.num_layers):
            for part, t in cache.parts(layer).items():
                got, want = (t[dst_table].view(torch.uint8),
                             src.parts(layer)[part][table].view(torch.uint8))
                assert torch.equal(got, want), (layer, part)
                assert not t[untouched].view(torch.uint8).any()
