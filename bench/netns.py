"""A cross-node testbed on one machine: two network namespaces joined by a shaped veth link.

    python -m bench.netns up --rate 1gbit [--delay 0.2ms]   # root only
    python -m bench.netns status
    python -m bench.netns down

`up` creates namespaces `pdserve-a` (10.77.0.1: the proxy, the load generator and the prefill
workers) and `pdserve-b` (10.77.0.2: the decode workers), a veth pair between them, and shapes
both directions of the link to `--rate` (and `--delay` where the kernel has `sch_netem`; without
it the rate is shaped with `tbf` and the delay is not applied, which `up` says). Everything
between prefill and decode (KV, and the control and event messages of the decode workers) then
crosses the link, as between two nodes:

    ip netns exec pdserve-a pdserve serve --host 10.77.0.1 --prefill 1 --decode 1 \\
        --decode-netns pdserve-b --decode-host 10.77.0.2

`down` deletes both namespaces (and with them the veth pair and its shaping); it is safe to run
twice. Nothing here touches the host's own interfaces or routes: traffic stays inside the two
namespaces it created.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass

ADDR_A, ADDR_B = "10.77.0.1", "10.77.0.2"  # private to the two namespaces: no clash
_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)bit$", re.IGNORECASE)
_DELAY = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$")


class NetnsError(RuntimeError):
    pass


@dataclass(frozen=True)
class Testbed:
    """The names of one testbed (`--name` picks another, so a test never touches yours)."""

    name: str = "pdserve"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,9}", self.name):
            raise NetnsError(f"--name must be 1-10 lowercase letters/digits, got {self.name!r}")

    @property
    def ns_a(self) -> str:
        return f"{self.name}-a"

    @property
    def ns_b(self) -> str:
        return f"{self.name}-b"

    @property
    def veths(self) -> tuple[str, str]:
        return f"{self.name}va", f"{self.name}vb"


@dataclass(frozen=True)
class Link:
    rate_bits: float  # per second, each direction
    delay_s: float  # one way (0: none)

    @property
    def rate(self) -> str:
        return f"{int(self.rate_bits)}bit"


def parse_rate(text: str) -> float:
    m = _RATE.match(text.strip())
    if not m:
        raise NetnsError(f"--rate must look like 100mbit, 1gbit or 10gbit, got {text!r}")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    return float(m.group(1)) * scale


def parse_delay(text: str) -> float:
    m = _DELAY.match(text.strip())
    if not m:
        raise NetnsError(f"--delay must look like 200us or 0.2ms, got {text!r}")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True,
                          text=True, check=check)


def exists(tb: Testbed) -> bool:
    names = _ip("netns", "list").stdout.split()
    return tb.ns_a in names or tb.ns_b in names


def _shape(ns: str, dev: str, link: Link) -> str:
    """Shape `dev`'s egress; returns the qdisc used ("netem" or "tbf")."""
    if link.delay_s > 0:
        netem = _tc(ns, "qdisc", "add", "dev", dev, "root", "netem", "delay",
                    f"{link.delay_s * 1e6:.0f}us", "rate", link.rate, "limit", "100000",
                    check=False)
        if netem.returncode == 0:
            return "netem"
    # tbf: the bucket holds ~4 ms of traffic (at least 64 KiB) so GSO segments pass whole.
    burst = max(int(link.rate_bits / 8 * 0.004), 65536)
    _tc(ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", link.rate, "burst", str(burst),
        "latency", "100ms")
    return "tbf"


def up(link: Link | None, tb: Testbed = Testbed()) -> list[str]:
    """Build the testbed; `link=None` leaves the veth link unshaped (a baseline)."""
    if os.geteuid() != 0:
        raise NetnsError("bench.netns needs root (it creates network namespaces)")
    if exists(tb):
        raise NetnsError(f"{tb.ns_a}/{tb.ns_b} already exist: run `python -m bench.netns down` "
                         f"first")
    notes = []
    (veth_a, veth_b) = tb.veths
    try:
        _ip("netns", "add", tb.ns_a)
        _ip("netns", "add", tb.ns_b)
        _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        _ip("link", "set", veth_a, "netns", tb.ns_a)
        _ip("link", "set", veth_b, "netns", tb.ns_b)
        for ns, dev, addr in ((tb.ns_a, veth_a, ADDR_A), (tb.ns_b, veth_b, ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            kind = _shape(ns, dev, link) if link else "unshaped"
            notes.append(f"{ns}: {dev} {addr}, egress {kind} {link.rate if link else ''}")
        if link and link.delay_s > 0 and "tbf" in notes[-1]:
            notes.append(f"this kernel has no sch_netem: the {link.delay_s * 1e3:g} ms delay is "
                         f"NOT applied (rate only)")
    except (subprocess.CalledProcessError, NetnsError) as e:
        down(tb)
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        raise NetnsError(f"could not build the testbed: {detail}") from e
    return notes


def down(tb: Testbed = Testbed()) -> None:
    for ns in (tb.ns_a, tb.ns_b):  # deleting a namespace deletes its veth end, and so the pair
        _ip("netns", "del", ns, check=False)


def status(tb: Testbed = Testbed()) -> str:
    if not exists(tb):
        return "no testbed (run `python -m bench.netns up`)"
    lines = []
    for ns, dev in zip((tb.ns_a, tb.ns_b), tb.veths, strict=True):
        q = _tc(ns, "qdisc", "show", "dev", dev, check=False).stdout.strip()
        lines.append(f"{ns} {dev}: {q}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.netns", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="Create the two namespaces and the shaped link.")
    u.add_argument("--rate", default="1gbit", help="Link rate each way, e.g. 1gbit, 10gbit.")
    u.add_argument("--delay", default="0ms", help="One-way delay, e.g. 0.2ms (needs netem).")
    u.add_argument("--unshaped", action="store_true", help="No shaping (a baseline).")
    sub.add_parser("down", help="Delete the namespaces (and the link).")
    sub.add_parser("status", help="Show the link's shaping.")
    p.add_argument("--name", default="pdserve",
                   help="Testbed name: namespaces NAME-a and NAME-b (default pdserve).")
    args = p.parse_args(argv)
    try:
        tb = Testbed(args.name)
        if args.cmd == "up":
            link = None if args.unshaped else Link(parse_rate(args.rate), parse_delay(args.delay))
            for line in up(link, tb):
                print(line)
        elif args.cmd == "down":
            down(tb)
        else:
            print(status(tb))
    except NetnsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
