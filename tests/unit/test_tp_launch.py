"""How follower ranks come to run (engine/tp_launch.py): the executor starts them through its
launcher and stops the ones already started when a later start fails; `rank_devices` own (a
Ray actor per rank, each with its own GPU) skips the local GPU count and keeps each rank's
device as given."""

from __future__ import annotations

import psutil
import pytest

from engine.config import ConfigError, EngineConfig
from engine.tp_executor import SpawnLauncher, TpExecutor
from engine.tp_launch import RankProcess
from engine.tp_service import RankService


class FailsAtRank2:
    """Starts rank 1 as a real process, then cannot start rank 2."""

    num_threads = 1

    def __init__(self) -> None:
        self.pids: list[int | None] = []

    def start(self, config: EngineConfig, rank: int, size: int, port: int,
              service: RankService | None) -> RankProcess:
        if rank == 2:
            raise RuntimeError("no room for rank 2")
        proc = SpawnLauncher().start(config, rank, size, port, service)
        self.pids.append(proc.pid)
        return proc


@pytest.mark.timeout(120)
def test_a_rank_that_cannot_start_stops_the_ranks_already_started() -> None:
    launcher = FailsAtRank2()
    config = EngineConfig(tensor_parallel_size=3, kv_cache_memory="16MiB", max_model_len=256,
                          distributed_timeout=30)
    with pytest.raises(RuntimeError, match="no room for rank 2"):
        TpExecutor.start(config, launcher=launcher)
    (rank1,) = launcher.pids
    assert rank1 is not None and not psutil.pid_exists(rank1)  # stopped and reaped


def test_rank_devices_own_skips_the_local_gpu_count() -> None:
    with pytest.raises(ConfigError, match="needs 3 GPUs"):
        EngineConfig(device="cuda", tensor_parallel_size=3)  # this machine has fewer
    config = EngineConfig(device="cuda", tensor_parallel_size=3, rank_devices="own")
    assert config.for_rank(2).device == "cuda"  # its own GPU is its current device
    with pytest.raises(ConfigError, match="rank_devices"):
        EngineConfig(rank_devices="remote")
