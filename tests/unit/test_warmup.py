"""The start-up warm-up's rounds: every listed prompt length that fits, on a GPU also the
longest prefill step the engine schedules, then a decode batch. (Every serving test runs a real
warm-up before checking that no block is left used.)"""

from __future__ import annotations

from worker.warmup import DECODE_BATCH, PROMPT_LENGTHS, warmup_rounds


def test_rounds_fit_the_room_and_a_gpu_warms_its_longest_step() -> None:
    decode = [[32] * DECODE_BATCH]
    assert warmup_rounds(4000, 8192, on_device=False) == [[n] for n in PROMPT_LENGTHS] + decode
    assert warmup_rounds(4000, 8192, on_device=True)[-2:] == [[4000], *decode]
    assert warmup_rounds(100_000, 8192, on_device=True)[-2] == [8192]
    assert warmup_rounds(300, 8192, on_device=True) == [[16], [64], [256], *decode]
    assert warmup_rounds(100_000, 512, on_device=True) == [[n] for n in PROMPT_LENGTHS] + decode

