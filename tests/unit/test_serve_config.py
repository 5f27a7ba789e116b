"""`pdserve serve` flags reach the workers: the worker command the local launcher builds parses
back (with the worker's own parser) into the WorkerConfig the flags say; bad values are
ConfigErrors naming the flag."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

import pytest

from deploy.local_launcher import ServeConfig, cluster_config, worker_command
from engine.config import ConfigError, EngineConfig
from worker.args import add_dataclass_args, dataclass_from_args
from worker.config import KvTransportConfig, WorkerConfig


def _worker_config(cmd: list[str]) -> WorkerConfig:
    parser = argparse.ArgumentParser()
    for flag in ("--num-threads", "--profile", "--log-level"):  # worker/main.py's own
        parser.add_argument(flag)
    add_dataclass_args(parser, EngineConfig)
    add_dataclass_args(parser, WorkerConfig)
    args = parser.parse_args(cmd[cmd.index("decode") + 1:])
    # the secret comes from the environment (worker/main.py), never from the command line
    secret = None if args.insecure_internal else b"s" * 32
    return dataclass_from_args(WorkerConfig, args, cluster_secret=secret)


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
    assert got.host == serve.internal_host and not got.insecure_internal


def test_the_log_level_reaches_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # as `pdserve --log-level debug serve` sets it
    cmd = worker_command("decode", "decode-0", "tcp://127.0.0.1:5555", ServeConfig(), [],
                         "cpu", 1)
    assert cmd[cmd.index("--log-level") + 1] == "DEBUG"


def test_insecure_internal_reaches_the_worker_and_a_worker_without_a_secret_refuses() -> None:
    serve = ServeConfig(insecure_internal=True, internal_host="10.1.2.3", host="192.0.2.1")
    got = _worker_config(worker_command("decode", "decode-0", "tcp://127.0.0.1:5555", serve,
                                        [], "cpu", 1))
    assert got.insecure_internal and got.cluster_secret is None and got.host == "10.1.2.3"
    with pytest.raises(ConfigError, match="no cluster secret"):
        WorkerConfig(worker_id="decode-0", events_address="tcp://127.0.0.1:5555")
    with pytest.raises(ConfigError, match="--max-kv-peers"):
        KvTransportConfig(max_kv_peers=0)


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
    wide = ServeConfig(host="192.0.2.1")  # an HTTP address that is not 127.0.0.1 (never bound)
    assert cluster_config(wide).host == "127.0.0.1"  # --internal-host


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


def test_http_limit_flags_parse_into_the_nested_limits() -> None:
    from proxy.limits import HttpLimits

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ServeConfig)
    serve = dataclass_from_args(ServeConfig, parser.parse_args(
        ["--max-request-bytes", "1MiB", "--header-timeout-s", "2.5", "--limit-concurrency", "64",
         "--allow-special-tokens-in-content", "--no-allow-special-tokens-in-prompt"]))
    assert serve.http == HttpLimits(max_request_bytes=2**20, header_timeout_s=2.5,
                                    limit_concurrency=64, allow_special_tokens_in_content=True,
                                    allow_special_tokens_in_prompt=False)
    assert ServeConfig().http == HttpLimits()


def test_role_tp_flags_reach_each_role_and_stride_the_gpus() -> None:
    from deploy.local_launcher import worker_devices

    serve = ServeConfig(colocated=True, decode_tp=3, prefill_tp=1)
    parser = argparse.ArgumentParser()
    for flag in ("--num-threads", "--profile", "--log-level"):  # worker/main.py's own
        parser.add_argument(flag)
    add_dataclass_args(parser, EngineConfig)
    add_dataclass_args(parser, WorkerConfig)
    for role, want in (("decode", 3), ("prefill", 1)):
        cmd = worker_command(role, f"{role}-0", "tcp://127.0.0.1:5555", serve,
                             ["-tp", "2"], "cpu", 1)
        args = parser.parse_args(cmd[cmd.index(role) + 1:])
        assert dataclass_from_args(EngineConfig, args).tensor_parallel_size == want
        assert serve.tp_of(role, 2) == want
    assert worker_devices([1, 1, 1], 2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices([2, 2], 4) == ["cuda:0", "cuda:2"]
    assert worker_devices([1, 2], 2) == ["cuda:0", "cuda:0"]  # a worker's ranks never wrap
    assert worker_devices([3], 0) == ["cpu"]


def _with_kv(serve: ServeConfig, **kv: str) -> ServeConfig:
    """`serve` with these KV settings, past the launcher's own checks (--transport nccl needs
    CUDA there; check_tp is what is tested)."""
    object.__setattr__(serve, "kv", KvTransportConfig(**kv))
    return serve


def test_tp_for_workers_that_exchange_kv_is_accepted_over_zmq_whole() -> None:
    ServeConfig(prefill=1).check_tp(2)
    ServeConfig(decode_tp=3).check_tp(1)
    ServeConfig(prefill_tp=2, decode_tp=4).check_tp(1)


@pytest.mark.parametrize(("serve", "engine_tp", "flags"), [
    (_with_kv(ServeConfig(prefill=1), transport="nccl"), 2,
     ("--prefill-tp / --tensor-parallel-size 2", "--transport nccl")),
    (_with_kv(ServeConfig(decode_tp=3), transport="nccl"), 1,
     ("--decode-tp / --tensor-parallel-size 3", "--transport nccl")),
])
def test_tp_kv_exchange_not_routed_per_rank_is_refused(serve: ServeConfig, engine_tp: int,
                                                       flags: tuple[str, str]) -> None:
    with pytest.raises(ConfigError) as err:
        serve.check_tp(engine_tp)
    assert all(flag in str(err.value) for flag in flags), err.value


def test_tp_for_colocated_decode_workers_is_accepted() -> None:
    ServeConfig(colocated=True, prefill_tp=4).check_tp(3)
    ServeConfig(colocated=True, kv=KvTransportConfig(kv_streaming="layerwise")).check_tp(3)
    ServeConfig(prefill_tp=3, kv=KvTransportConfig(kv_streaming="layerwise")).check_tp(1)
    ServeConfig(decode_tp=3, kv=KvTransportConfig(kv_streaming="layerwise")).check_tp(1)
    ServeConfig(prefill=0, decode_tp=1).check_tp(1)
    with pytest.raises(ConfigError, match="--decode-tp must be at least 1"):
        ServeConfig(decode_tp=0)


def test_a_ray_worker_gets_the_serve_flags_a_process_worker_gets() -> None:
    """`--warmup-s` reached process workers but not Ray actors (they always warmed up)."""
    from deploy.ray_config import RayConfig
    from deploy.ray_launcher import RayDeployment

    serve = ServeConfig(warmup_s=0.0, kv=KvTransportConfig(kv_payload="frames"))
    got = RayDeployment(serve, EngineConfig(), RayConfig()).worker_config("decode-1", "tcp://x:1")
    process = _worker_config(worker_command("decode", "decode-1", "tcp://x:1", serve, [], "cpu",
                                            1))
    assert got.warmup_s == process.warmup_s == 0.0
    assert (got.worker_id, got.events_address, got.kv) == ("decode-1", "tcp://x:1", serve.kv)
    assert got.cluster_secret is not None and not got.insecure_internal
