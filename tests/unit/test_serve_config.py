"""`pdserve serve` flags reach the workers: the worker command the local launcher builds parses
back (with the worker's own parser) into the WorkerConfig the flags say; bad values are
ConfigErrors naming the flag."""

from __future__ import annotations

import argparse

import pytest

from deploy.args import add_dataclass_args, dataclass_from_args
from deploy.local_launcher import ServeConfig, worker_command
from deploy.worker_base import WorkerConfig
from engine.config import ConfigError, EngineConfig


def _worker_config(cmd: list[str]) -> WorkerConfig:
    parser = argparse.ArgumentParser()
    for flag in ("--role", "--num-threads", "--profile"):
        parser.add_argument(flag)
    add_dataclass_args(parser, EngineConfig)
    add_dataclass_args(parser, WorkerConfig)
    return dataclass_from_args(WorkerConfig, parser.parse_args(cmd[cmd.index("deploy.worker_main") + 1:]))


@pytest.mark.parametrize("serve", [
    ServeConfig(),
    ServeConfig(kv_payload="frames", kv_receiver_thread=False, transfer_timeout_s=7.5),
])
def test_kv_flags_reach_the_worker(serve: ServeConfig) -> None:
    cmd = worker_command("decode", "decode-3", "tcp://127.0.0.1:5555", serve, ["--max-model-len", "512"], "cpu", 1)
    got = _worker_config(cmd)
    assert (got.worker_id, got.events_address) == ("decode-3", "tcp://127.0.0.1:5555")
    assert (got.transport, got.kv_payload, got.kv_receiver_thread, got.transfer_timeout_s) == \
        (serve.transport, serve.kv_payload, serve.kv_receiver_thread, serve.transfer_timeout_s)


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"kv_payload": "pigeon"}, "--kv-payload"),
    ({"transport": "udp"}, "--transport"),
    ({"transfer_timeout_s": 0.0}, "--transfer-timeout-s"),
    ({"decode": 0}, "--decode"),
])
def test_bad_values_name_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        ServeConfig(**kwargs)
