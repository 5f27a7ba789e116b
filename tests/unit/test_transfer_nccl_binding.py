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

from transfer.errors import TransferError, TransportUnavailable
from transfer.nccl_lib import NCCL_IN_PROGRESS, NcclConfig, NcclLibrary, find_library

STUB = r"""
#include <stddef.h>
#include <string.h>
typedef struct { char internal[128]; } ncclUniqueId;
typedef struct { size_t size; unsigned magic, version; int blocking, cga, minCTAs, maxCTAs;
                 const char* netName; int splitShare; } cfg_t;
static int last_blocking = -99, last_rank = -1, aborted = 0, groups = 0, last_dtype = -1, last_peer = -1;
static unsigned last_magic = 0, last_version = 0; static size_t last_size = 0, moved = 0;
static char last_uid[128]; static void* last_stream = 0;
int ncclGetVersion(int* v) { *v = 22703; return 0; }
int ncclGetUniqueId(ncclUniqueId* id) { for (int i = 0; i < 128; i++) id->internal[i] = (char)(i * 3); return 0; }
int ncclCommInitRank(void** c, int n, ncclUniqueId id, int r) { *c = (void*)0x1234; last_rank = r;
    memcpy(last_uid, id.internal, 128); return n == 2 ? 0 : 4; }
int ncclCommInitRankConfig(void** c, int n, ncclUniqueId id, int r, cfg_t* cfg) { *c = (void*)0x5678;
    last_rank = r; memcpy(last_uid, id.internal, 128); last_blocking = cfg->blocking; last_magic = cfg->magic;
    last_size = cfg->size; last_version = cfg->version; return 7; }
int ncclCommGetAsyncError(void* c, int* s) { *s = c == (void*)0x5678 ? 0 : 3; return 0; }
int ncclCommAbort(void* c) { aborted++; return 0; }
int ncclSend(const void* b, size_t n, int dt, int peer, void* c, void* st) { moved += n; last_dtype = dt;
    last_peer = peer; last_stream = st; return 0; }
int ncclRecv(void* b, size_t n, int dt, int peer, void* c, void* st) { moved += n; return 0; }
int ncclGroupStart(void) { groups++; return 0; }
int ncclGroupEnd(void) { groups--; return 0; }
const char* ncclGetErrorString(int r) { return r == 3 ? "internal error" : "unknown"; }
int stub_int(int which) { int v[] = {last_blocking, last_rank, aborted, groups, last_dtype, last_peer}; return v[which]; }
unsigned stub_magic(void) { return last_magic; } unsigned stub_version(void) { return last_version; }
size_t stub_size(void) { return last_size; } size_t stub_moved(void) { return moved; }
int stub_uid(int i) { return (unsigned char)last_uid[i]; } void* stub_stream(void) { return last_stream; }
"""


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stub libnccl")
    d = tmp_path_factory.mktemp("nccl")
    (d / "stub.c").write_text(STUB)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "libnccl.so.2"), str(d / "stub.c")], check=True)
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
    assert probe.stub_int(4) == 1 and probe.stub_int(5) == 1 and probe.stub_stream() == 0xBEEF  # uint8, peer
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
    from transfer.nccl_transport import NcclReceiverPlugin, NcclSenderPlugin

    for plugin in (NcclSenderPlugin, NcclReceiverPlugin):
        with pytest.raises(TransportUnavailable, match=r"needs CUDA.*ZMQ transport"):
            plugin("cuda:0")
