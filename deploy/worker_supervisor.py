"""Restarting the workers of a local deployment, as Ray does with `--max-restarts`.

Once the deployment serves, `WorkerSupervisor.run()` checks every `poll_s` whether a worker
process has exited; it reaps it (`Popen.poll` collects its exit status: no zombie is left) and
starts it again with the same command and worker id, at most `max_restarts` times per worker
(-1: without limit). The restarted worker says Hello under its old id; the proxy lets it replace
its dead predecessor once that one has missed its heartbeats (proxy/admission.py), and has by
then failed the requests the dead one held.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Callable

log = logging.getLogger("pdserve.launcher")


class WorkerSupervisor:
    def __init__(self, procs: dict[str, subprocess.Popen],
                 start: Callable[[str], subprocess.Popen], max_restarts: int,
                 poll_s: float = 0.5) -> None:
        """`procs`: worker id -> its process, updated in place as workers restart; `start(id)`
        starts worker `id` again."""
        self.procs, self.start, self.max_restarts, self.poll_s = procs, start, max_restarts, poll_s
        self.num_restarts: dict[str, int] = {}
        self.given_up: set[str] = set()

    def check(self) -> list[str]:
        """One pass: reap and restart the workers that exited; the ids restarted."""
        restarted = []
        for wid, proc in list(self.procs.items()):
            code = proc.poll()  # reaps an exited child
            if code is None or wid in self.given_up:
                continue
            done = self.num_restarts.get(wid, 0)
            if self.max_restarts != -1 and done >= self.max_restarts:
                log.error("worker %s exited (code %s) and was restarted %d time(s) already "
                          "(--max-restarts %d): leaving it down", wid, code, done,
                          self.max_restarts)
                self.given_up.add(wid)
                continue
            self.num_restarts[wid] = done + 1
            self.procs[wid] = self.start(wid)
            log.warning("worker %s exited (code %s): restarted it as pid %d (restart %d%s)",
                        wid, code, self.procs[wid].pid, done + 1,
                        "" if self.max_restarts == -1 else f" of {self.max_restarts}")
            restarted.append(wid)
        return restarted

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            self.check()
