"""The front end stays light: importing the proxy (app, cluster client, router) and the control
plane pulls in neither torch nor numpy, as the import-linter contract in pyproject says."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("modules", [
    "proxy.app, proxy.cluster, proxy.router, proxy.responses, proxy.metrics",
    "protocol.codec, protocol.channel, protocol.decode_ctrl, protocol.prefill_ctrl, "
    "protocol.worker_events, protocol.errors, protocol.kv_meta",
])
def test_importing_the_proxy_imports_no_torch(modules: str) -> None:
    code = (f"import sys; import {modules}; "
            "heavy = sorted(m for m in ('torch', 'numpy') if m in sys.modules); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"importing {modules} pulled in {out.stdout.strip()}{out.stderr}"


def test_the_check_can_fail() -> None:
    """The same probe on a module that does import torch reports it."""
    code = "import sys; import engine.sequence; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 1
