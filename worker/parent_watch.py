"""A worker whose launcher is gone stops by itself (`--exit-with-parent`, which the local
launcher passes).

`pdserve serve` stops its workers on Ctrl-C and SIGTERM; a launcher killed outright (SIGKILL,
the OOM killer, a crash) cannot, and its workers lived on holding their weights and KV cache
(16 orphans of ~1 GiB each filled a 24 GiB machine, 2026-12-06). The watch notices the parent
process change (the orphan is re-parented to init or a subreaper) within `interval_s` and calls
`on_orphan` once, from its own daemon thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable


def watch_parent(on_orphan: Callable[[], None], interval_s: float = 0.5) -> threading.Thread:
    """Poll the parent pid (taken now) every `interval_s`; call `on_orphan` when it changes."""
    parent = os.getppid()

    def run() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        on_orphan()

    thread = threading.Thread(target=run, name="parent-watch", daemon=True)
    thread.start()
    return thread
