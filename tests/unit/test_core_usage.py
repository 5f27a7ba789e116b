"""bench.core_usage charges a busy child's CPU seconds to it and exits with its status."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.core_usage import main

BUSY = "import time\nt = time.time()\nwhile time.time() - t < 1.5:\n    pass\nraise SystemExit(3)"


def test_a_busy_child_is_charged_its_seconds(tmp_path: Path) -> None:
    out = tmp_path / "usage.txt"
    assert main(["--out", str(out), "--", sys.executable, "-c", BUSY]) == 3
    text = out.read_text()
    busy = [line for line in text.splitlines() if "-c import time" in line and " s  core " in line]
    assert busy, text
    assert 0.5 <= float(busy[0].split()[0]) <= 2.0  # sampled every 0.5 s: the first is missed
    assert "per core:" in text


def test_a_command_is_required() -> None:
    with pytest.raises(SystemExit) as e:
        main(["--after-s", "1"])
    assert e.value.code == 2
