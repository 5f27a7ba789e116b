"""`kill PID` (SIGTERM: systemd, docker stop, Kubernetes) stops a local deployment and its worker
processes, as Ctrl-C does. uvicorn shuts down gracefully on SIGTERM and then raises it again;
with the default action that ended the launcher before it stopped its workers, which lived on
holding their weights and KV cache. Nothing is logged as an error on the way out, at DEBUG
either (uvicorn's lifespan task, cancelled by Ctrl-C, printed a traceback there). A launcher
killed outright (SIGKILL) leaves no worker behind either: they watch their parent."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import serving
from serving import DISAGG, assert_exits, serve


@pytest.mark.parametrize("sigs", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]],
                         ids=["SIGTERM", "ctrl-c-twice"])
def test_sigterm_stops_the_launcher_and_every_worker(sigs: list[signal.Signals],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving, "LOG_ARGS", ["--log-level", "debug"])
    with serve(*DISAGG) as s:
        pids = s.worker_pids()
        assert len(pids) == 2
        for sig in sigs:  # an impatient Ctrl-C lands while the first one shuts down
            s.proc.send_signal(sig)
            time.sleep(0.01)
        assert s.proc.wait(60) == 0
        for worker, pid in pids.items():
            assert_exits(pid, 20, f"worker {worker} (pid {pid}) after {sig.name} to the launcher")
        time.sleep(0.5)  # the log pump reads the last lines
        assert not [line for line in s.log if "Traceback" in line or "ERROR" in line], s.log


def test_workers_stop_when_the_launcher_is_killed() -> None:
    """SIGKILL (the OOM killer, a crash) gives the launcher no chance to stop its workers: they
    notice their parent is gone (--exit-with-parent, which the launcher passes) and stop."""
    with serve(*DISAGG) as s:
        pids = s.worker_pids()
        assert len(pids) == 2
        s.proc.kill()
        s.proc.wait(10)
        try:
            for worker, pid in pids.items():
                assert_exits(pid, 20, f"worker {worker} (pid {pid}) after SIGKILL to the launcher")
        finally:  # the workers share the launcher's process group: none outlives a failure
            with contextlib.suppress(ProcessLookupError):
                os.killpg(s.proc.pid, signal.SIGKILL)
