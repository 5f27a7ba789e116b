"""worker/parent_watch.py: a process whose parent dies notices within its polling interval."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import os, sys, threading, time
from worker.parent_watch import watch_parent
done = threading.Event()
watch_parent(lambda: (open(sys.argv[1], "w").write(str(os.getppid())), done.set()), 0.05)
print(os.getpid(), flush=True)
done.wait(30)
"""
# the parent starts the child, says its pid, then waits to be killed
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE,
                         text=True)
print(child.stdout.readline().strip(), flush=True)
time.sleep(60)
"""


def test_a_child_notices_its_parent_is_gone(tmp_path: Path) -> None:
    marker = tmp_path / "orphaned"
    root = str(Path(__file__).resolve().parents[2])
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(marker)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": root})
    try:
        assert parent.stdout is not None
        assert int(parent.stdout.readline()) > 0  # the child is up, its watch started
        time.sleep(0.3)
        assert not marker.exists()  # the parent lives: nothing to notice
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the orphan did not notice"
        assert int(marker.read_text()) != parent.pid  # re-parented
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
