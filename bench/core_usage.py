"""Which process and thread used which core while a command ran: CPU seconds per (process,
thread, core), sampled from /proc every 0.5 s over the command's whole process tree (Linux).

    python -m bench.core_usage --after-s 30 --out bench/results/core_usage_<name>.txt -- \
        pdserve bench sweep --config "1p1d=--prefill 1 --decode 1 --placement remote" ...

`--after-s` skips the first seconds (model loading, warm-up). A thread's seconds are charged to
the core it was last seen on at each sample (a thread that moves between samples is charged to
the later one). Measured 2026-12-07 on this 2-core VM (1p1d and colocated-x2 at 0.3 req/s of the
prefill-heavy placement workload, 20 requests, workers pinned one per core): the proxy took
1.8 s of CPU in ~70 s (2.5 % of a core), the load generator 0.5 s.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (through /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue  # gone meanwhile
    return out


def sample(pids: list[int]) -> dict[tuple[int, int], tuple[str, str, int, int]]:
    """(pid, tid) -> (command, thread name, CPU ticks so far, core last run on)."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read().replace("\0", " ").strip()[:100]
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
                name = stat[stat.index("(") + 1:stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2:].split()
                # utime, stime: fields 14 and 15 of stat(5); processor: 39 (here from field 3)
                # a process's threads share one name unless they set their own: tell the main
                # thread from the others (a worker's KV receiver, ZMQ's I/O threads...)
                name += "" if int(tid) != pid else " (main)"
                out[(pid, int(tid))] = (cmd, name, int(fields[11]) + int(fields[12]),
                                        int(fields[36]))
        except (OSError, ValueError, IndexError):
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.core_usage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--after-s", type=float, default=0.0, help="Seconds not counted at the start.")
    p.add_argument("--out", default=None, help="Write the table here too.")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("a command to run is required (after --)")
    proc = subprocess.Popen(command)
    start, last = time.monotonic(), {}
    seconds: collections.Counter[tuple[str, str, int]] = collections.Counter()
    while proc.poll() is None:
        counting = time.monotonic() - start >= args.after_s
        for key, (cmd, name, ticks, core) in sample(tree(proc.pid)).items():
            if counting and key in last:  # by tid too: one busy thread among namesakes shows
                seconds[(cmd, f"{name} [{key[1]}]", core)] += (ticks - last[key]) / HZ
            last[key] = ticks
        time.sleep(0.5)
    per_core: collections.Counter[int] = collections.Counter()
    lines = [f"# CPU seconds by process, thread and core: {' '.join(command)[:300]}",
             f"(after the first {args.after_s:g} s; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""]
    for (cmd, name, core), s in seconds.most_common():
        per_core[core] += s
        if s >= 0.1:
            lines.append(f"{s:8.1f} s  core {core}  {name:30s} {cmd}")
    lines += ["", "per core: " + ", ".join(f"{c}: {s:.1f} s" for c, s in sorted(per_core.items()))]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
