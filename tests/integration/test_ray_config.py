"""The Ray launcher's placement rules and flags, without a cluster: bundles, role pinning,
proxy-node resolution, and the CLI refusing Ray flags without --ray."""

from __future__ import annotations

import pytest

from deploy.cli import build_parser
from deploy.ray_config import (
    ROLE_RESOURCE_AMOUNT,
    RayConfig,
    rank_actor_name,
    rank_of_actor,
    resolve_node,
)
from deploy.serve_cli import cmd_serve
from engine.config import ConfigError

HEAD = {"NodeID": "aa11" * 14, "NodeManagerAddress": "10.0.0.1", "Alive": True,
        "Resources": {"CPU": 8.0, "node:__internal_head__": 1.0}}
NODE_A = {"NodeID": "bb22" * 14, "NodeManagerAddress": "10.0.0.2", "Alive": True,
          "Resources": {"prefill": 1.0}}
NODE_B = {"NodeID": "cc33" * 14, "NodeManagerAddress": "10.0.0.2", "Alive": True,
          "Resources": {"decode": 1.0}}
GONE = {"NodeID": "dd44" * 14, "NodeManagerAddress": "10.0.0.9", "Alive": False, "Resources": {}}


def test_bundles_pin_roles_by_resource_and_label() -> None:
    config = RayConfig(prefill_resource="prefill", decode_label="role = decode", cpus_per_worker=2)
    assert config.worker_bundle("prefill", 0) == {"CPU": 2, "prefill": ROLE_RESOURCE_AMOUNT}
    assert config.worker_bundle("decode", 1) == {"CPU": 2, "GPU": 1}
    assert config.role_label("decode") == {"role": "decode"} and config.role_label("prefill") == {}
    assert RayConfig(cpus_per_worker=0).worker_bundle("decode", 1) == {"GPU": 1}
    with pytest.raises(ConfigError, match="reserve nothing"):
        RayConfig(cpus_per_worker=0).worker_bundle("decode", 0)


def test_tensor_parallel_names_belong_to_their_deployment_and_worker() -> None:
    config = RayConfig(deployment_name="pd")
    assert config.worker_placement_group_name("decode-0") == "pd-workers/decode-0"
    assert config.is_own_placement_group("pd-workers")
    assert config.is_own_placement_group("pd-workers/decode-0")
    # another deployment's groups, even one whose name starts with this one's
    assert not config.is_own_placement_group("pd-workers-workers")
    assert not RayConfig(deployment_name="pd-workers").is_own_placement_group("pd-workers")
    assert rank_actor_name("decode-0", 2) == "decode-0-rank2"
    assert rank_of_actor("decode-0-rank2") == ("decode-0", 2)
    assert rank_of_actor("decode-0") is None and rank_of_actor("proxy") is None
    assert rank_of_actor("decode-0-rank0") is None  # rank 0 is the worker's own actor


@pytest.mark.parametrize("kwargs, message", [
    ({"placement_strategy": "CLUSTERED"}, "--placement-strategy"),
    ({"max_restarts": -2}, "--max-restarts"),
    ({"decode_label": "decode"}, "KEY=VALUE"),
    ({"deployment_name": ""}, "--deployment-name"),
    ({"cpus_per_worker": -1}, "negative"),
])
def test_bad_flags_say_which(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RayConfig(**kwargs)


def test_strategy_is_case_insensitive() -> None:
    assert RayConfig(placement_strategy="spread").placement_strategy == "SPREAD"


def test_resolve_proxy_node() -> None:
    nodes = [HEAD, NODE_A, NODE_B, GONE]
    assert resolve_node(nodes, "head") == HEAD["NodeID"]
    assert resolve_node(nodes, "10.0.0.1") == HEAD["NodeID"]
    assert resolve_node(nodes, NODE_B["NodeID"]) == NODE_B["NodeID"]
    assert resolve_node(nodes, "bb22bb22") == NODE_A["NodeID"]
    with pytest.raises(ConfigError, match="2 nodes"):
        resolve_node(nodes, "10.0.0.2")  # two nodes share the IP: ask for a node id
    with pytest.raises(ConfigError, match="no alive node"):
        resolve_node(nodes, "10.0.0.9")


def test_serve_flags() -> None:
    args = build_parser().parse_args(["serve", "--ray", "--address", "10.0.0.1:6379",
                                      "--max-restarts", "5", "--proxy-node", "10.0.0.1",
                                      "--placement-strategy", "SPREAD",
                                      "--prefill-resource", "prefill", "--detach"])
    assert args.ray and args.address == "10.0.0.1:6379" and args.max_restarts == 5 and args.detach
    args = build_parser().parse_args(["serve", "--proxy-node", "10.0.0.1"])
    with pytest.raises(ConfigError, match="need --ray"):
        cmd_serve(args)
    for command in ("status", "stop"):
        args = build_parser().parse_args([command, "--deployment-name", "x"])
        assert args.deployment_name == "x" and args.address is None


def test_status_table_without_ray_columns() -> None:
    """`pdserve status --url` on a local launch: no node ids, the proxy's view only."""
    from deploy.status_cli import render

    view = {"deployment": None, "proxy": {"url": "http://127.0.0.1:8000"}, "model": "smollm2",
            "max_model_len": 2048,
            "workers": [{"worker_id": "decode-0", "role": "decode", "host": "vm", "pid": 42,
                         "alive": False, "ctrl_address": "tcp://127.0.0.1:1", "kv_address": "tcp://127.0.0.1:2",
                         "kv_plan": "KV cache: 182 blocks", "num_running": 0, "num_waiting": 0,
                         "kv_usage": 0.25}]}
    lines = render(view).splitlines()
    assert lines[0] == "model smollm2 (max_model_len 2048), proxy http://127.0.0.1:8000"
    assert lines[2].split() == ["decode-0", "decode", "vm", "?", "42", "-", "-", "NO", "0", "0",
                                "25.0%"]
    assert "KV cache: 182 blocks" in lines[3]
