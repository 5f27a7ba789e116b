"""What the proxy makes of worker events before anything changes: the rule for a Hello that
names a worker it knows, which events count, and the client's error for a `RequestFailed`.

The Hello rule (a worker id belongs to one live process at a time):
- an unknown worker id registers;
- the same process again (same role, host, pid, ctrl and KV addresses: `Hello.identity`) is a
  re-announcement: it refreshes the worker's liveness and changes nothing else;
- another process under the id of a worker that is alive (heartbeats within
  `heartbeat_timeout_s`) is refused and counted (reason "hello_conflict"): a forged or
  mistaken Hello can never deregister a live worker;
- another process under the id of a dead worker (silent past the timeout) replaces it: a
  restarted worker comes back with its next Hello (workers repeat it every few seconds).
A heartbeat carrying a pid other than the registered process's is not proof of life (a
restarted worker's new process must not keep its dead predecessor registered).
"""

from __future__ import annotations

import enum

from protocol import worker_events as ev
from protocol.errors import ErrorCode
from proxy.cluster_state import RequestState, Worker
from proxy.errors import ApiError, internal


class HelloVerdict(enum.Enum):
    REGISTER = "register"  # new id, or replaces a dead worker
    REFRESH = "refresh"  # the registered process again
    REFUSE = "refuse"  # another process under a live worker's id


def judge_hello(old: Worker | None, hello: ev.Hello) -> HelloVerdict:
    if old is None:
        return HelloVerdict.REGISTER
    if old.hello.identity == hello.identity:
        return HelloVerdict.REFRESH
    return HelloVerdict.REFUSE if old.is_alive else HelloVerdict.REGISTER


def is_from_registered(worker: Worker, hb: ev.Heartbeat) -> bool:
    """Whether a heartbeat comes from the registered process (pid 0: a sender that does not
    say, taken as it is)."""
    return hb.pid in (0, worker.hello.pid)


def serves(req: RequestState, worker_id: str) -> bool:
    """Whether `worker_id` is (or was, for a retried prefill) one of the request's workers: an
    event about it from any other worker is refused."""
    return worker_id in (req.decode_id, req.prefill_id) or worker_id in req.tried_prefill


def failure_error(msg: ev.RequestFailed, request_id: str) -> ApiError:
    """The client's error for a request a worker failed: 503 when the worker dropped it
    (aborted), 400 when the request itself is invalid, else 500 with the code."""
    if msg.code is ErrorCode.ABORTED:
        return ApiError(503, f"worker {msg.worker_id} dropped request {request_id} "
                        f"({msg.error})", "service_unavailable", code="aborted")
    if msg.code is ErrorCode.INVALID_REQUEST:
        return ApiError(400, msg.error, "invalid_request_error")
    return internal(f"{msg.code.value}: {msg.error}", request_id)
