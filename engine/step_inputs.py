"""StepInputs: one model step's inputs as host int64 arrays, and their compact wire form.

The model runner builds them from a scheduled batch (on rank 0, the only rank that schedules)
and turns them into device tensors and attention metadata on every rank. Under tensor
parallelism rank 0 sends them to the follower ranks as two int64 tensors (engine/tp_group.py):
a fixed-size header (command + sizes) then one flat payload, so a follower allocates exactly
what the header says and nothing is pickled.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

HEADER_LEN = 8


class Command(enum.IntEnum):
    STOP = 0  # followers leave their loop
    STEP = 1  # a forward pass (payload: StepInputs)
    COPY_BLOCKS = 2  # copy cache blocks (payload: [src, dst] pairs)
    SERVICE = 3  # a message for the rank's service (engine/tp_service.py; payload: its bytes)


@dataclass
class StepInputs:
    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    block_tables: np.ndarray  # [S, max_blocks] int64, padded with 0
    logits_rows: np.ndarray  # [D] int64: the last row of each sequence the step completes
    query_start_loc: np.ndarray  # [S + 1] int64
    seq_lens: np.ndarray  # [S] int64

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.size)

    def header(self) -> np.ndarray:
        h = np.zeros(HEADER_LEN, dtype=np.int64)
        h[:5] = (Command.STEP, self.num_tokens, self.num_seqs, self.block_tables.shape[1],
                 self.logits_rows.size)
        return h

    def payload(self) -> np.ndarray:
        return np.concatenate([self.input_ids, self.positions, self.slot_mapping,
                               self.block_tables.reshape(-1), self.logits_rows,
                               self.query_start_loc, self.seq_lens]).astype(np.int64, copy=False)


def payload_len(header: np.ndarray) -> int:
    """Length of the payload a header announces."""
    command = Command(int(header[0]))
    if command is Command.STEP:
        num_tokens, num_seqs, max_blocks, num_done = (int(v) for v in header[1:5])
        return 3 * num_tokens + num_seqs * max_blocks + num_done + 2 * num_seqs + 1
    if command is Command.COPY_BLOCKS:
        return 2 * int(header[1])
    if command is Command.SERVICE:
        return (int(header[1]) + 7) // 8
    return 0


def unpack_step(header: np.ndarray, payload: np.ndarray) -> StepInputs:
    num_tokens, num_seqs, max_blocks, num_done = (int(v) for v in header[1:5])
    sizes = [num_tokens, num_tokens, num_tokens, num_seqs * max_blocks, num_done, num_seqs + 1,
             num_seqs]
    parts = np.split(payload, np.cumsum(sizes)[:-1])
    return StepInputs(parts[0], parts[1], parts[2], parts[3].reshape(num_seqs, max_blocks),
                      parts[4], parts[5], parts[6])


def copy_blocks_message(pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    header = np.zeros(HEADER_LEN, dtype=np.int64)
    header[:2] = (Command.COPY_BLOCKS, len(pairs))
    return header, np.asarray(pairs, dtype=np.int64).reshape(-1)


def service_message(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Opaque bytes for the follower ranks' services, as a header and an int64 payload (the
    bytes zero-padded to whole words)."""
    header = np.zeros(HEADER_LEN, dtype=np.int64)
    header[:2] = (Command.SERVICE, len(data))
    padded = data + bytes(-len(data) % 8)
    return header, np.frombuffer(padded, dtype=np.int64).copy()


def service_bytes(header: np.ndarray, payload: np.ndarray) -> bytes:
    return payload.tobytes()[:int(header[1])]


def stop_header() -> np.ndarray:
    return np.zeros(HEADER_LEN, dtype=np.int64)
