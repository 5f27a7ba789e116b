"""NCCL on a CPU machine: choosing it fails with a clear message, and the ctypes binding is
checked against a stub libnccl compiled here (argument passing, the by-value unique id, the
ncclConfig_t prefix NCCL reads). The real thing runs in tests/gpu/test_transfer_nccl.py."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from transfer.nccl.lib import NCCL_IN_PROGRESS, NcclConfig, NcclLibrary, find_library
from transfer.wire.errors import TransferError, TransportUnavailable

STUB = r"""
#include <stddef.h>
#include <string.h>
typedef struct { char internal[128]; } ncclUniqueId;
typedef struct { size_t size; unsigned magic, version; int blocking, cga, minCTAs, maxCTAs;
                 const char* netName; int splitShare; } cfg_t;
static int last_blocking = -99, last_rank = -1, aborted = 0, groups = 0, last_dtype = -1,
           last_peer = -1;
static unsigned last_magic = 0, last_version = 0; static size_t last_size = 0, moved = 0;
static char last_uid[128]; static void* last_stream = 0;
int ncclGetVersion(int* v) { *v = 22703; return 0; }
int ncclGetUniqueId(ncclUniqueId* id) {
    for (int i = 0; i < 128; i++) id->internal[i] = (char)(i * 3);
    return 0; }
int ncclCommInitRank(void** c, int n, ncclUniqueId id, int r) { *c = (void*)0x1234; last_rank = r;
    memcpy(last_uid, id.internal, 128); return n == 2 ? 0 : 4; }
int ncclCommInitRankConfig(void** c, int n, ncclUniqueId id, int r, cfg_t* cfg) {
    *c = (void*)0x5678; last_rank = r; memcpy(last_uid, id.internal, 128);
    last_blocking = cfg->blocking; last_magic = cfg->magic; last_size = cfg->size;
    last_version = cfg->version; return 7; }
int ncclCommGetAsyncError(void* c, int* s) { *s = c == (void*)0x5678 ? 0 : 3; return 0; }
int ncclCommAbort(void* c) { aborted++; return 0; }
int ncclSend(const void* b, size_t n, int dt, int peer, void* c, void* st) {
    moved += n; last_dtype = dt; last_peer = peer; last_stream = st; return 0; }
int ncclRecv(void* b, size_t n, int dt, int peer, void* c, void* st) { moved += n; return 0; }
int ncclGroupStart(void) { groups++; return 0; }
int ncclGroupEnd(void) { groups--; return 0; }
const char* ncclGetErrorString(int r) { return r == 3 ? "internal error" : "unknown"; }
int stub_int(int which) {
    int v[] = {last_blocking, last_rank, aborted, groups, last_dtype, last_peer};
    return v[which]; }
unsigned stub_magic(void) { return last_magic; }
unsigned stub_version(void) { return last_version; }
size_t stub_size(void) { return last_size; } size_t stub_moved(void) { return moved; }
int stub_uid(int i) { return (unsigned char)last_uid[i]; }
void* stub_stream(void) { return last_stream; }
"""


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stub libnccl")
    d = tmp_path_factory.mktemp("nccl")
    (d / "stub.c").write_text(STUB)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "libnccl.so.2"), str(d / "stub.c")],
                   check=True)
    return d / "libnccl.so.2"


def test_binding_against_stub(stub: Path) -> None:
    lib = NcclLibrary(str(stub))
    probe = ctypes.CDLL(str(stub))
    probe.stub_size.restype = probe.stub_moved.restype = ctypes.c_size_t
    probe.stub_magic.restype = probe.stub_version.restype = ctypes.c_uint
    probe.stub_stream.restype = ctypes.c_void_p
    assert lib.version == 22703 and lib.has_config
    uid = lib.unique_id()
    assert uid == bytes((i * 3) % 256 for i in range(128))
    comm, res = lib.comm_init_rank(2, uid, 1, nonblocking=True)
    assert (comm, res) == (0x5678, NCCL_IN_PROGRESS)
    assert probe.stub_int(0) == 0 and probe.stub_int(1) == 1  # blocking = 0, rank 1
    assert probe.stub_magic() == 0xCAFEBEEF and probe.stub_version() == 22703
    assert probe.stub_size() == ctypes.sizeof(NcclConfig)
    assert bytes(probe.stub_uid(i) for i in range(128)) == uid  # the 128-byte id went by value
    assert lib.async_error(comm) == 0 and lib.async_error(0x1) == 3
    comm2, res2 = lib.comm_init_rank(2, uid, 0, nonblocking=False)
    assert (comm2, res2) == (0x1234, 0)
    lib.group_start()
    lib.send(0xDEAD0, 1000, 1, comm, 0xBEEF)
    lib.recv(0xDEAD0, 24, 0, comm, 0xBEEF)
    lib.group_end()
    assert probe.stub_moved() == 1024 and probe.stub_int(3) == 0
    # uint8, peer 1, the stream given
    assert probe.stub_int(4) == 1 and probe.stub_int(5) == 1 and probe.stub_stream() == 0xBEEF
    lib.abort(comm)
    assert probe.stub_int(2) == 1
    with pytest.raises(TransferError, match="internal error"):
        lib.check(3, "ncclSomething")
    with pytest.raises(TransferError, match="must be 128 bytes, got 16"):
        lib.comm_init_rank(2, b"x" * 16, 0, nonblocking=True)


def test_missing_library_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TransportUnavailable, match="does not exist"):
        find_library(str(tmp_path / "libnccl.so.2"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_choosing_nccl_without_cuda_fails_clearly() -> None:
    from transfer.nccl.transport import NcclReceiverPlugin, NcclSenderPlugin

    for plugin in (NcclSenderPlugin, NcclReceiverPlugin):
        with pytest.raises(TransportUnavailable, match=r"needs CUDA.*ZMQ transport"):
            plugin("cuda:0")


# ---- the eager NCCL path's SIZES message and the tapered payload plan (no GPU needed) ----------

def test_sizes_message_roundtrip_and_limits() -> None:
    from transfer.wire import framing as proto
    from transfer.wire.errors import LimitExceeded, MalformedFrame
    from transfer.wire.header import ReceiverLimits

    limits = ReceiverLimits(max_buffers=4, max_buffer_bytes=1 << 20, max_message_bytes=3 << 20)
    sizes = (1 << 20, 5, 1 << 20)
    assert proto.parse_sizes(proto.pack([7, list(sizes)]), limits) == (7, sizes)
    for bad in ([7], [7, []], ["7", [1]], [7, [0]], [7, [-1]], [7, [1.5]], [-1, [1]], [7, [True]],
                {"t": 1}):
        with pytest.raises(MalformedFrame):
            proto.parse_sizes(proto.pack(bad), limits)
    with pytest.raises(MalformedFrame):
        proto.parse_sizes(b"\xc1garbage", limits)
    for bad, what in (([7, [1] * 5], "buffers"), ([7, [(1 << 20) + 1]], "buffer bytes"),
                      ([7, [1 << 20] * 4], "message bytes")):
        with pytest.raises(LimitExceeded) as info:
            proto.parse_sizes(proto.pack(bad), limits)
        assert info.value.what == what


@pytest.mark.parametrize(("total", "full", "want"), [
    (32, 8, [8, 8, 8, 6, 2]), (32, 16, [16, 12, 4]), (8, 8, [6, 2]), (1, 8, [1]), (3, 8, [1, 2]),
    (10, 4, [2, 4, 3, 1]), (32, 1, [1] * 32)])
def test_tapered_layer_groups(total: int, full: int, want: list[int]) -> None:
    from transfer.convert.pack import layer_groups

    got = layer_groups(total, full, taper=True)
    assert got == want and sum(got) == total and max(got) <= full
    plain = [min(full, total - g) for g in range(0, total, full)]
    assert layer_groups(total, full, taper=False) == plain


def test_tapered_plan_reconstructs_bit_exactly() -> None:
    from bench.kv_fill import fill_random
    from engine.kv_spec import KvDtype, KvSpec
    from transfer.convert.cache import PagedKvCache
    from transfer.convert.local import read_tokens_float
    from transfer.convert.pack import PackOptions, pack_kv
    from transfer.convert.writer import KvWriter, PagedSink
    from transfer.wire.header import ReceiverLimits, decode_header

    spec = KvSpec(8, 2, 64, 16, dtype=KvDtype.BFLOAT16)
    src = PagedKvCache.allocate(spec, 32)
    dst = PagedKvCache.allocate(spec, 32)
    fill_random(src, torch.Generator().manual_seed(3))
    table, dst_table = [5, 9, 1, 30, 12], [2, 7, 19, 4, 25]
    layer_bytes = 5 * spec.bytes_per_block // spec.num_layers
    packed = pack_kv(src, table, 0, 70, request_id="r", transport="nccl",
                     options=PackOptions(allow_views=False, chunk_bytes=4 * layer_bytes,
                                         taper=True))
    first_part = packed.header.entries[0].part
    assert [e.num_layers for e in packed.header.entries if e.part == first_part] == [4, 3, 1]
    header = decode_header(packed.header.encode(), ReceiverLimits())
    writer = KvWriter(header, PagedSink(dst, dst_table))
    for i, buf in enumerate(packed.all_buffers()):
        writer.accept(i, buf)
    writer.finish()
    got = read_tokens_float(dst, dst_table, 0, 70)
    for a, b in zip(read_tokens_float(src, table, 0, 70), got, strict=True):
        assert torch.equal(a, b)


def test_link_dropped_travels_with_the_error() -> None:
    from transfer.wire import framing as proto
    from transfer.wire.errors import MalformedHeader, TransferError, UnexpectedTransfer

    kept = UnexpectedTransfer("no reservation", request_id="r1")
    dropped = MalformedHeader("sizes differ", request_id="r2")
    dropped.link_dropped = True
    for err, want in ((kept, False), (dropped, True)):
        kind, tid, body = proto.parse_reply(proto.error_frames(err, 7))
        back = TransferError.from_wire(body)
        assert kind == proto.ERROR and tid == 7
        assert type(back) is type(err) and back.is_remote and back.request_id == err.request_id
        assert back.link_dropped is want
    assert "link_dropped" not in kept.to_wire()  # the old wire form when nothing was dropped
