"""ctypes binding to libnccl.so.2: only the calls the KV transfer needs, nothing global.

Library search (first hit wins): an explicit path; the `nvidia-nccl-cu12` / `-cu13` wheel
(`nvidia/nccl/lib`, `nvidia/cu13/lib`, found through `importlib` and site-packages); next to
torch (`torch/lib`); the system loader (`ctypes.util.find_library("nccl")`). Nothing found, or
no CUDA device, raises `TransportUnavailable` saying what was tried and what to install
(`pip install 'pdserve[gpu]'`, i.e. nvidia-nccl-cu12).

Communicators are created non-blocking (`ncclCommInitRankConfig` with `blocking = 0`, NCCL >=
2.14) so that every wait can be polled with a deadline and aborted (`ncclCommAbort`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import site
import sys
from pathlib import Path

from transfer.wire.errors import TransferError, TransportUnavailable

NCCL_SUCCESS = 0
NCCL_IN_PROGRESS = 7
NCCL_UINT8 = 1  # ncclDataType_t: we move bytes
UNIQUE_ID_BYTES = 128
_CONFIG_MAGIC = 0xCAFEBEEF
_CONFIG_UNDEF_INT = -(2**31)


class NcclUniqueId(ctypes.Structure):
    # c_ubyte, not c_char: a c_char array reads as a NUL-terminated string and ids contain zeros
    _fields_ = [("internal", ctypes.c_ubyte * UNIQUE_ID_BYTES)]


class NcclConfig(ctypes.Structure):
    """The stable prefix of ncclConfig_t (2.17+). NCCL copies `size` bytes and fills the rest of
    its own struct with defaults, so a shorter struct stays valid on newer versions."""

    _fields_ = [("size", ctypes.c_size_t), ("magic", ctypes.c_uint), ("version", ctypes.c_uint),
                ("blocking", ctypes.c_int), ("cgaClusterSize", ctypes.c_int),
                ("minCTAs", ctypes.c_int), ("maxCTAs", ctypes.c_int),
                ("netName", ctypes.c_char_p), ("splitShare", ctypes.c_int)]


def candidate_paths() -> list[str]:
    """Where libnccl.so.2 may live, most specific first."""
    roots: list[str] = []
    for name in ("nvidia.nccl", "nvidia"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            roots.extend(spec.submodule_search_locations)
    sites = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    roots.extend(os.path.join(s, "nvidia") for s in sites if s)
    found: list[str] = []
    for root in roots:
        for pattern in ("lib/libnccl.so*", "nccl/lib/libnccl.so*", "cu1*/lib/libnccl.so*",
                        "*/lib/libnccl.so*"):
            found.extend(sorted(glob.glob(os.path.join(root, pattern))))
    torch_spec = importlib.util.find_spec("torch")
    if torch_spec is not None and torch_spec.origin:
        found.extend(sorted(glob.glob(str(Path(torch_spec.origin).parent / "lib" / "libnccl.so*"))))
    system = ctypes.util.find_library("nccl")
    if system:
        found.append(system)
    return list(dict.fromkeys(found))


def find_library(explicit: str | None = None) -> str:
    if explicit:
        if not os.path.exists(explicit):
            raise TransportUnavailable(f"NCCL library {explicit} does not exist")
        return explicit
    paths = candidate_paths()
    if not paths:
        raise TransportUnavailable(
            "libnccl.so.2 not found (looked in the nvidia-nccl-cu12/-cu13 wheels, torch/lib and "
            "the system loader path); install it with `pip install 'pdserve[gpu]'` "
            "(nvidia-nccl-cu12) or use the ZMQ transport")
    return paths[0]


class NcclLibrary:
    """A loaded libnccl with typed signatures. Raises TransportUnavailable if it can't load."""

    def __init__(self, path: str | None = None):
        self.path = find_library(path)
        try:
            lib = ctypes.CDLL(self.path)
        except OSError as e:
            raise TransportUnavailable(f"cannot load {self.path}: {e}") from None
        c_int, vp, size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
        sigs = {
            "ncclGetVersion": [ctypes.POINTER(c_int)],
            "ncclGetUniqueId": [ctypes.POINTER(NcclUniqueId)],
            "ncclCommInitRank": [ctypes.POINTER(vp), c_int, NcclUniqueId, c_int],
            "ncclCommAbort": [vp],
            "ncclCommGetAsyncError": [vp, ctypes.POINTER(c_int)],
            "ncclSend": [vp, size_t, c_int, c_int, vp, vp],
            "ncclRecv": [vp, size_t, c_int, c_int, vp, vp],
            "ncclGroupStart": [],
            "ncclGroupEnd": [],
        }
        for name, argtypes in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, c_int
        lib.ncclGetErrorString.argtypes, lib.ncclGetErrorString.restype = [c_int], ctypes.c_char_p
        self.has_config = hasattr(lib, "ncclCommInitRankConfig")
        if self.has_config:
            lib.ncclCommInitRankConfig.argtypes = [ctypes.POINTER(vp), c_int, NcclUniqueId, c_int,
                                                   ctypes.POINTER(NcclConfig)]
            lib.ncclCommInitRankConfig.restype = c_int
        self._lib = lib
        self.version = self._version()

    def _version(self) -> int:
        v = ctypes.c_int()
        self.check(self._lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
        return v.value

    def error_string(self, code: int) -> str:
        return (self._lib.ncclGetErrorString(code) or b"?").decode(errors="replace")

    def check(self, code: int, what: str) -> int:
        if code not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
            raise TransferError(f"{what} failed: NCCL error {code} ({self.error_string(code)})")
        return code

    # ---- communicators -------------------------------------------------------------------------
    def unique_id(self) -> bytes:
        uid = NcclUniqueId()
        self.check(self._lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return ctypes.string_at(ctypes.addressof(uid), UNIQUE_ID_BYTES)

    def comm_init_rank(self, nranks: int, uid: bytes, rank: int, *,
                       nonblocking: bool) -> tuple[int, int]:
        """(comm handle, result). With `nonblocking` (and NCCL >= 2.14) the result may be
        NCCL_IN_PROGRESS: poll `async_error` until it is not. The CUDA device must be current."""
        if len(uid) != UNIQUE_ID_BYTES:
            raise TransferError(f"NCCL unique id must be {UNIQUE_ID_BYTES} bytes, got {len(uid)}")
        handle = ctypes.c_void_p()
        nid = NcclUniqueId()
        ctypes.memmove(ctypes.addressof(nid), uid, UNIQUE_ID_BYTES)
        if nonblocking and self.has_config:
            undef = _CONFIG_UNDEF_INT
            cfg = NcclConfig(ctypes.sizeof(NcclConfig), _CONFIG_MAGIC, self.version, 0,
                             undef, undef, undef, None, undef)
            res = self._lib.ncclCommInitRankConfig(ctypes.byref(handle), nranks, nid, rank,
                                                   ctypes.byref(cfg))
        else:
            res = self._lib.ncclCommInitRank(ctypes.byref(handle), nranks, nid, rank)
        self.check(res, "ncclCommInitRank")
        return int(handle.value or 0), res

    def async_error(self, comm: int) -> int:
        state = ctypes.c_int()
        self.check(self._lib.ncclCommGetAsyncError(ctypes.c_void_p(comm), ctypes.byref(state)),
                   "ncclCommGetAsyncError")
        return state.value

    def abort(self, comm: int) -> None:
        self._lib.ncclCommAbort(ctypes.c_void_p(comm))

    # ---- point to point ---------------------------------------------------------------------
    def group_start(self) -> None:
        self.check(self._lib.ncclGroupStart(), "ncclGroupStart")

    def group_end(self) -> int:
        return self.check(self._lib.ncclGroupEnd(), "ncclGroupEnd")

    def send(self, ptr: int, nbytes: int, peer: int, comm: int, stream: int) -> int:
        """NCCL_SUCCESS once enqueued, NCCL_IN_PROGRESS when a non-blocking communicator is
        still enqueueing (poll `async_error`)."""
        return self.check(self._lib.ncclSend(ctypes.c_void_p(ptr), nbytes, NCCL_UINT8, peer,
                                      ctypes.c_void_p(comm), ctypes.c_void_p(stream)), "ncclSend")

    def recv(self, ptr: int, nbytes: int, peer: int, comm: int, stream: int) -> int:
        return self.check(self._lib.ncclRecv(ctypes.c_void_p(ptr), nbytes, NCCL_UINT8, peer,
                                      ctypes.c_void_p(comm), ctypes.c_void_p(stream)), "ncclRecv")
