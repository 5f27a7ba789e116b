"""`python -m prefill --worker-id ... --events-address ...`: one prefill worker process
(started by deploy/local_launcher.py; flags: worker/main.py)."""

from __future__ import annotations

import sys

from prefill.worker import PrefillWorker
from worker.main import main

if __name__ == "__main__":
    sys.exit(main(PrefillWorker, "prefill"))
