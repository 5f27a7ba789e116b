"""Scatter/gather socket I/O: an ordered list of memory segments written or read in place.

`IoVec` holds segments (address, length) as a `[k, 2]` uint64 array — the memory layout of
`struct iovec` on 64-bit Linux/macOS — and a position. `send(fd)` / `recv(fd)` make ONE
non-blocking `sendmsg`/`recvmsg` call (libc through ctypes, which releases the GIL) over at
most `IOV_MAX` segments from the position and advance it by what the kernel took; they return
the byte count, `AGAIN` when the socket is not ready, or raise `OSError` (EOF on receive is 0).
The only copies are the kernel's. Segments are built with numpy (`segments`, `coalesce`), never
as Python lists of memoryviews.

Ownership: an IoVec holds raw addresses, not references. Whoever builds one keeps the memory
behind every segment alive (and, for `recv`, writable and reserved) until the IoVec is done
or dropped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import socket

import numpy as np
import xxhash

IOV_MAX = 1024  # Linux and macOS
AGAIN = -1
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_RETRY = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


@functools.lru_cache(maxsize=1)
def _libc() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
    lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fns = []
    for name in ("sendmsg", "recvmsg"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(_MsgHdr), ctypes.c_int]
        fn.restype = ctypes.c_ssize_t
        fns.append(fn)
    return fns[0], fns[1]


def segments(addrs: np.ndarray, lens: np.ndarray | int) -> np.ndarray:
    """`[k, 2]` uint64 segments from addresses and lengths (a scalar length for all)."""
    out = np.empty((len(addrs), 2), dtype=np.uint64)
    out[:, 0] = addrs
    out[:, 1] = lens
    return out


def coalesce(segs: np.ndarray) -> np.ndarray:
    """Merge segments that continue each other in memory (same bytes, fewer segments)."""
    if len(segs) < 2:
        return segs
    addr, n = segs[:, 0], segs[:, 1]
    starts = np.flatnonzero(np.concatenate(([True], addr[1:] != addr[:-1] + n[:-1])))
    if len(starts) == len(segs):
        return segs
    return segments(addr[starts], np.add.reduceat(n, starts))


def hash_segments(segs: np.ndarray) -> int:
    """xxh3_64 of the segments' bytes in order (the bytes they hold now)."""
    h = xxhash.xxh3_64()
    update = h.update
    for addr, n in segs.tolist():
        if n:
            update((ctypes.c_char * n).from_address(addr))
    return h.intdigest()


class IoVec:
    """Segments plus a position (bytes done); see the module docstring."""

    def __init__(self, segs: np.ndarray):
        # the live iovec: the segment at `index` may be trimmed
        self.segs = np.array(segs, dtype=np.uint64).reshape(-1, 2)
        self._addr = self.segs[:, 0].copy()
        self._len = self.segs[:, 1].copy()
        self.ends = np.cumsum(self._len)
        self.total = int(self.ends[-1]) if len(self.ends) else 0
        self.done = 0
        self.index = 0  # first segment not completely done
        self._hdr = _MsgHdr()
        self._seek(0)

    @property
    def is_done(self) -> bool:
        return self.done >= self.total

    def set_address(self, i: int, addr: int) -> None:
        """Point segment `i` (not started yet) at other memory of the same length."""
        if i < self.index or self.done > int(self.ends[i] - self._len[i]):
            raise ValueError(f"segment {i} already started")
        self._addr[i] = addr
        self.segs[i, 0] = addr

    def span(self, start: int, end: int) -> np.ndarray:
        """Segments `[start, end)` as built (untrimmed), e.g. to hash what was read into them."""
        return segments(self._addr[start:end], self._len[start:end])

    def send(self, fd: int, stop: int | None = None) -> int:
        """One write from segments `[index, stop)`."""
        return self._call(_libc()[0], fd, _MSG_DONTWAIT | _MSG_NOSIGNAL, stop)

    def recv(self, fd: int, stop: int | None = None) -> int:
        """One read into segments `[index, stop)`; 0 means the peer closed the connection."""
        return self._call(_libc()[1], fd, _MSG_DONTWAIT, stop)

    def _call(self, fn: ctypes._CFuncPtr, fd: int, flags: int, stop: int | None) -> int:
        end = len(self.segs) if stop is None else min(stop, len(self.segs))
        count = min(IOV_MAX, end - self.index)
        if count <= 0:
            raise RuntimeError(f"no segment to transfer before segment {end} (at {self.index})")
        hdr = self._hdr
        hdr.msg_iov = self.segs.ctypes.data + self.index * 16
        hdr.msg_iovlen = count
        n = fn(fd, ctypes.byref(hdr), flags)
        if n < 0:
            err = ctypes.get_errno()
            if err in _RETRY:
                return AGAIN
            raise OSError(err, errno.errorcode.get(err, "socket error"))
        if n:
            self._seek(self.done + n)
        return n

    def _seek(self, done: int) -> None:
        i = self.index
        if i < len(self.segs):
            self.segs[i, 0], self.segs[i, 1] = self._addr[i], self._len[i]
        self.done = done
        i = self.index = int(np.searchsorted(self.ends, done, side="right"))
        if i < len(self.segs):
            off = done - int(self.ends[i] - self._len[i])
            if off:
                self.segs[i, 0] = self._addr[i] + np.uint64(off)
                self.segs[i, 1] = self._len[i] - np.uint64(off)
