"""The security suite replays attacks against real deployments; it shares the integration
tests' helpers for starting `pdserve serve` (tests/integration/serving.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
