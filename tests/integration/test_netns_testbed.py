"""The cross-node testbed (bench/netns.py): prefill and decode in two network namespaces joined by
a shaped veth link, so KV crosses a 100 Mbit/s "network" on one machine. Root only; it builds
and removes its own namespaces (named after this process, never the user's testbed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from serving import serve

from bench import netns

RATE_BITS = 100e6
PROBE = """
import json, sys, httpx
url = sys.argv[1]
with httpx.Client(base_url=url, timeout=120) as c:
    r = c.post("/v1/completions", json={"prompt": "word " * 400, "max_tokens": 4})
    r.raise_for_status()
    text = c.get("/metrics").text
    value = lambda name: sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                             if l.startswith(name + " "))
    print(json.dumps({"prompt_tokens": r.json()["usage"]["prompt_tokens"],
                      "kv_bytes": value("pdserve:kv_transfer_bytes_total"),
                      "kv_seconds": value("pdserve:kv_transfer_seconds_total"),
                      "status": c.get("/status").json()["workers"]}))
"""


def _can_build() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


@pytest.fixture
def testbed():
    if not _can_build():
        pytest.skip("the netns testbed needs root, ip and tc")
    tb = netns.Testbed(f"pdt{os.getpid() % 100000}")
    try:
        netns.up(netns.Link(RATE_BITS, 0.0), tb)
    except netns.NetnsError as e:
        pytest.skip(f"network namespaces unavailable here: {e}")
    try:
        yield tb
    finally:
        netns.down(tb)
        assert not netns.exists(tb)


def test_kv_crosses_the_shaped_link(testbed: netns.Testbed) -> None:
    args = ("--prefill", "1", "--decode", "1", "--placement", "remote", "--warmup-s", "0",
            "--decode-netns", testbed.ns_b, "--decode-host", netns.ADDR_B,
            "--internal-host", netns.ADDR_A)
    with serve(*args, host=netns.ADDR_A, prefix=("ip", "netns", "exec", testbed.ns_a)) as server:
        out = subprocess.run(["ip", "netns", "exec", testbed.ns_a, sys.executable, "-c", PROBE,
                              server.url], capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        probe = json.loads(out.stdout)
    decode = next(w for w in probe["status"] if w["role"] == "decode")
    assert decode["kv_address"].startswith(f"tcp://{netns.ADDR_B}:")
    assert probe["prompt_tokens"] > 400
    # The KV (about 46 KiB per token in fp32) took at least its time on a 100 Mbit/s link:
    # the transfer went through the shaped veth, not a shortcut.
    wire_s = probe["kv_bytes"] * 8 / RATE_BITS
    assert probe["kv_bytes"] > 400 * 40_000
    assert probe["kv_seconds"] >= 0.8 * wire_s, probe


def test_names_and_values_are_checked() -> None:
    with pytest.raises(netns.NetnsError, match="--name"):
        netns.Testbed("Bad/Name")
    with pytest.raises(netns.NetnsError, match="--rate"):
        netns.parse_rate("fast")
    assert netns.parse_rate("10gbit") == 10e9
    assert netns.parse_delay("0.2ms") == pytest.approx(2e-4)
