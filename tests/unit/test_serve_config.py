"""`pdserve serve` flags reach the workers: the worker command the local launcher builds parses
back (with the worker's own parser) into the WorkerConfig the flags say; bad values are
ConfigErrors naming the flag."""

from __future__ import annotations

import argparse

import pytest

from deploy.local_launcher import ServeConfig, worker_command
from engine.config import ConfigError, EngineConfig
from worker.args import add_dataclass_args, dataclass_from_args
from worker.config import KvTransportConfig, WorkerConfig


def _worker_config(cmd: list[str]) -> WorkerConfig:
    parser = argparse.ArgumentParser()
    for flag in ("--num-threads", "--profile"):
        parser.add_argument(flag)
    add_dataclass_args(parser, EngineConfig)
    add_dataclass_args(parser, WorkerConfig)
    return dataclass_from_args(WorkerConfig, parser.parse_args(cmd[cmd.index("decode") + 1:]))


@pytest.mark.parametrize("serve", [
    ServeConfig(),
    ServeConfig(kv=KvTransportConfig(kv_payload="frames", kv_receiver_thread=False,
                                     transfer_timeout_s=7.5, checksum=True,
                                     max_transfer_bytes=1 << 20)),
])
def test_kv_flags_reach_the_worker(serve: ServeConfig) -> None:
    cmd = worker_command("decode", "decode-3", "tcp://127.0.0.1:5555", serve,
                         ["--max-model-len", "512"], "cpu", 1)
    got = _worker_config(cmd)
    assert (got.worker_id, got.events_address) == ("decode-3", "tcp://127.0.0.1:5555")
    assert got.kv == serve.kv


def test_serve_flags_parse_into_the_nested_transport_config() -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ServeConfig)
    serve = dataclass_from_args(ServeConfig, parser.parse_args(
        ["--prefill", "2", "--kv-payload", "frames", "--no-kv-receiver-thread", "--checksum"]))
    assert serve.prefill == 2
    assert serve.kv == KvTransportConfig(kv_payload="frames", kv_receiver_thread=False,
                                         checksum=True)


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"kv_payload": "pigeon"}, "--kv-payload"),
    ({"transport": "udp"}, "--transport"),
    ({"transfer_timeout_s": 0.0}, "--transfer-timeout-s"),
    ({"max_transfer_bytes": 0}, "--max-transfer-bytes"),
    ({"decode": 0}, "--decode"),
])
def test_bad_values_name_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        if "decode" in kwargs:
            ServeConfig(**kwargs)
        else:
            KvTransportConfig(**kwargs)
