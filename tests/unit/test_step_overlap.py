"""bench/step_overlap.py: serving steps classed by what the other workers ran meanwhile."""

from __future__ import annotations

import pytest

from bench.serving_trace import Step
from bench.step_overlap import (
    ALONE,
    BESIDE_DECODE,
    BESIDE_PREFILL,
    classify,
    overlap_ratios,
    overlap_table,
)
from planner.profile import StepTimes
from tests.unit.planner_fixtures import small_profile


def _step(who: str, start: float, seconds: float, prefill: int = 0, seqs: int = 1) -> Step:
    return Step(start + seconds, who, seconds, prefill, 0, seqs if not prefill else 0,
                100 * seqs if not prefill else 0)


def test_steps_are_classed_by_the_other_workers_steps() -> None:
    steps = [
        _step("prefill 0", 0.0, 1.0, prefill=512),  # a long prefill on one core
        _step("decode 0", 0.1, 0.2),  # wholly beside it
        _step("decode 0", 0.95, 0.2),  # a quarter beside it: neither class
        _step("decode 0", 2.0, 0.2),  # nothing else runs: alone
        _step("prefill 0", 3.0, 0.1, prefill=16),  # beside the next decode step's first half
        _step("decode 0", 2.9, 0.2),
        _step("decode 1", 5.0, 0.2),  # another decode worker beside: decode-only
        _step("decode 0", 5.0, 0.2),
    ]
    got = classify(steps)
    assert got[1] == BESIDE_PREFILL and got[2] is None and got[3] == ALONE
    assert got[0] is None  # a 1 s prefill with 0.25 s of decode steps beside it: partly
    assert got[4] == BESIDE_DECODE and got[5] is None
    assert got[6] == BESIDE_DECODE and got[7] == BESIDE_DECODE


def test_ratios_and_table_use_the_step_model() -> None:
    times = StepTimes(small_profile())
    alone = _step("decode 0", 0.0, 2 * times.step_s(0, 0, 1, 100))  # twice the model
    ratios = overlap_ratios([alone], times)
    assert ratios == {("decode", ALONE): [pytest.approx(2.0)]}
    table = overlap_table([alone], times)
    assert table[2].startswith("| decode | 2.00 (2.00), n=1 | - | - |")
