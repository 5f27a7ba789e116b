"""Stop strings over streamed text (proxy/stop.py): streaming equals the one-shot answer."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.stop import StopMatcher, truncate_at_stop


def brute_force(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Every occurrence of every stop; the winner ends first, then starts first."""
    occurrences = [(i + len(s), i, s) for s in stops if s
                   for i in range(len(text)) if text.startswith(s, i)]
    if not occurrences:
        return text, None
    _, start, stop = min(occurrences)
    return text[:start], stop


def stream(text: str, stops: list[str], cuts: list[int]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    pieces: list[str] = []
    bounds = [0, *sorted(set(cuts)), len(text)]
    is_stopped = False
    for start, end in itertools.pairwise(bounds):
        emit, is_stopped = matcher.push(text[start:end])
        pieces.append(emit)
        if is_stopped:
            break
    pieces.append(matcher.flush())
    return "".join(pieces), is_stopped, pieces


ALPHABET = "ab\n😀"
texts = st.text(alphabet=ALPHABET, max_size=40)
stop_lists = st.lists(st.text(alphabet=ALPHABET, min_size=0, max_size=4), max_size=4)


@settings(max_examples=400, deadline=None)
@given(text=texts, stops=stop_lists, data=st.data())
def test_streamed_equals_non_streamed(text: str, stops: list[str], data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text) + 1))
    expected, matched = brute_force(text, stops)
    assert truncate_at_stop(text, stops) == (expected, matched)
    output, is_stopped, _ = stream(text, stops, cuts)
    assert output == expected
    assert is_stopped == (matched is not None)
    assert not any(s and s in output for s in stops)  # a stop string is never emitted


def test_holds_back_a_possible_stop_and_releases_it() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.push("Hello </e") == ("Hello ", False)
    assert matcher.push("x") == ("</ex", False)
    assert matcher.push(" </en") == (" ", False)
    assert matcher.flush() == "</en"


def test_stop_across_pieces_and_after_stop() -> None:
    matcher = StopMatcher(["STOP", "\n\n"])
    assert matcher.push("one ST") == ("one ", False)
    assert matcher.push("OP two") == ("", True)
    assert matcher.matched == "STOP" and matcher.is_stopped
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_first_completed_stop_wins() -> None:
    # "c" completes before "abcd" could: generation would already have stopped there.
    assert truncate_at_stop("xabcd", ["abcd", "c"]) == ("xab", "c")
    assert truncate_at_stop("xabcd", ["bcd", "abcd"]) == ("x", "abcd")  # same end: longer wins


def test_no_stops_passes_through() -> None:
    matcher = StopMatcher([])
    assert matcher.push("anything") == ("anything", False)
    assert StopMatcher(["", ""]).push("x") == ("x", False)
    assert matcher.flush() == ""
