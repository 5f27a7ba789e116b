"""`python -m decode --worker-id ... --events-address ...`: one decode worker process
(started by deploy/local_launcher.py; flags: worker/main.py)."""

from __future__ import annotations

import sys

from decode.worker import DecodeWorker
from worker.main import main

if __name__ == "__main__":
    sys.exit(main(DecodeWorker, "decode"))
