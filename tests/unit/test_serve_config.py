"""`pdserve serve` flags reach the workers: the worker command the local launcher builds parses
back (with the worker's own parser) into the WorkerConfig the flags say; bad values are
ConfigErrors naming the flag."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from deploy.local_launcher import ServeConfig, cluster_config, worker_command
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
    ({"kv_wire_dtype": "int4"}, "--kv-wire-dtype"),
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


def test_cluster_config_takes_the_serve_settings_and_the_launchers_overrides() -> None:
    serve = ServeConfig(placement="local", slo_ttft=2.0, slo_tpot=0.1, router="round-robin")
    config = cluster_config(serve, host="10.0.0.7", events_port=5555)
    assert (config.host, config.events_port) == ("10.0.0.7", 5555)
    assert (config.placement, config.slo_ttft_s, config.slo_tpot_s, config.router) == \
        ("local", 2.0, 0.1, "round-robin")


@pytest.mark.parametrize(("flags", "flag"), [
    (["--placement", "sideways"], "--placement"),
    (["--slo-ttft", "soon"], "--slo-ttft"),
    (["--slo-tpot", "-5ms"], "--slo-tpot"),
    (["--cpu-affinity", "x,y"], "--cpu-affinity"),
])
def test_bad_placement_flags_are_refused_at_start_up(flags: list[str], flag: str) -> None:
    """`pdserve serve` refuses them before anything starts, naming the flag."""
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "serve", *flags],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert flag in out.stderr + out.stdout
