"""Rate-limited logging: a peer that sends a thousand bad frames a second gets a few log lines,
not a thousand (each component owns its `LogLimiter`; nothing is shared at module level).

`LogLimiter.warning(key, fmt, *args)` logs the first line of each `key` in every `interval_s`
window and counts the rest; the next line logged for that key says how many were left out.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any


class LogLimiter:
    def __init__(self, logger: logging.Logger, interval_s: float = 5.0,
                 max_keys: int = 1024) -> None:
        self.logger, self.interval_s, self.max_keys = logger, interval_s, max_keys
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # key -> when its last line was logged
        self._held: dict[str, int] = {}  # key -> lines left out since then

    def allow(self, key: str) -> tuple[bool, int]:
        """Whether a line for `key` is logged now, and how many were left out before it."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return False, 0
            if len(self._last) >= self.max_keys and key not in self._last:
                self._last.clear()  # many keys: forget them all rather than grow
                self._held.clear()
            self._last[key] = now
            return True, self._held.pop(key, 0)

    def log(self, level: int, key: str, fmt: str, *args: Any) -> None:
        ok, held = self.allow(key)
        if ok:
            suffix = f" ({held} more like it left out in the last {self.interval_s:.0f} s)" \
                if held else ""
            self.logger.log(level, fmt + suffix, *args)

    def warning(self, key: str, fmt: str, *args: Any) -> None:
        self.log(logging.WARNING, key, fmt, *args)

    def error(self, key: str, fmt: str, *args: Any) -> None:
        self.log(logging.ERROR, key, fmt, *args)
