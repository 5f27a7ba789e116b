"""Stop strings over streamed text.

Owns `StopMatcher`: it sees the detokenized text of one request piece by piece and decides
what may be sent to the client now. It holds back any tail that could still grow into a stop
string, never emits a stop string itself (OpenAI semantics: the stop sequence is not part of
the output), and says when generation must end.

Which stop wins: the occurrence that *ends* first in the text; among those ending at the same
place, the one that starts first. That is what a server that stops generating as soon as a stop
string appears produces, and it does not depend on how the text was split into pieces. (It
differs from "earliest start" only when one stop string contains another.)
"""

from __future__ import annotations

from collections.abc import Sequence


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """The non-streamed answer: `text` cut before the winning stop, and that stop (or None)."""
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for stop in stops:
        if not stop:
            continue
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
            best = (start + len(stop), start, stop)
    if best is None:
        return text, None
    return text[:best[1]], best[2]


class StopMatcher:
    """Streams text through, cutting it at the first stop string (see module docstring).

    Usage per request: `emit, is_stopped = matcher.push(delta)` for each detokenized delta; send
    `emit`; when `is_stopped`, abort generation (finish_reason "stop"). At the natural end of
    generation, send `matcher.flush()`. After a stop, push and flush return "".
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1
        self._held = ""
        self.matched: str | None = None

    @property
    def is_stopped(self) -> bool:
        return self.matched is not None

    def push(self, text: str) -> tuple[str, bool]:
        """Feed `text`; return (text safe to emit now, whether a stop string was reached)."""
        if self.is_stopped:
            return "", True
        if not self.stops:
            return text, False
        buffer = self._held + text
        kept, matched = truncate_at_stop(buffer, self.stops)
        if matched is not None:
            self._held = ""
            self.matched = matched
            return kept, True
        hold = self._partial_suffix_len(buffer)
        self._held = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold], False

    def flush(self) -> str:
        """End of generation without a stop: release what was held back."""
        held, self._held = self._held, ""
        return "" if self.is_stopped else held

    def _partial_suffix_len(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of some stop."""
        for size in range(min(len(buffer), self._max_hold), 0, -1):
            tail = buffer[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0
