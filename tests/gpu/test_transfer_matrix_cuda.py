"""The profile compatibility matrix (tests/unit/test_transfer_matrix.py) with CUDA tensors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import test_transfer_matrix as matrix  # noqa: E402


@pytest.mark.parametrize("kind", list(matrix.KINDS))
@pytest.mark.parametrize("dst_name", matrix.NAMES)
@pytest.mark.parametrize("src_name", matrix.NAMES)
def test_matrix_cuda(src_name: str, dst_name: str, kind: str) -> None:
    matrix.test_matrix(src_name, dst_name, kind, device="cuda")


def test_reblocking_cuda() -> None:
    for sb, db in [(8, 32), (32, 8), (16, 16)]:
        matrix.run_pair("ampere", "volta", matrix.make_shape("gqa", 128), sb, db, seed=1,
                        device="cuda")
        matrix.run_pair("hopper_fp8", "ada", matrix.make_shape("mla", 64), sb, db, seed=2,
                        device="cuda")
