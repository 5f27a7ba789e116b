"""`pdserve status` and `pdserve stop`: the topology view and the clean shutdown of a deployment.

`status` joins two views: the proxy's (role, liveness by heartbeat, addresses, KV plan, load —
the body of GET /status) and Ray's (node, IP, pid, actor state, restarts). With `--url` it reads
GET /status of any running proxy, local launch included, without Ray. A tensor-parallel worker's
follower rank actors are listed under it (`rank_actors`). `stop` removes a Ray deployment's
actors and placement groups (deploy/ray_launcher.py: remove_deployment).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Any

from deploy.ray_config import PROXY_ACTOR, RayConfig, rank_of_actor


def add_status_parsers(sub: argparse._SubParsersAction) -> None:
    what = "Show where each worker runs, its role, health, load and KV plan."
    s = sub.add_parser("status", help=what, description=what)
    _add_target_args(s)
    s.add_argument("--url", default=None,
                   help="Read GET /status from this proxy URL instead of Ray.")
    s.add_argument("--api-key", default=None,
                   help="The proxy's --api-key, needed for /status when it has one "
                        "(default: $OPENAI_API_KEY).")
    s.add_argument("--json", action="store_true", help="Print the joined view as JSON.")
    s.set_defaults(func=cmd_status)
    t = sub.add_parser("stop", help="Remove a Ray deployment: its actors and placement groups.",
                       description="Remove a Ray deployment: its actors and placement groups.")
    _add_target_args(t)
    t.set_defaults(func=cmd_stop)


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster (default: $RAY_ADDRESS, else auto).")
    p.add_argument("--deployment-name", default="pdserve", help="The deployment's Ray namespace.")


def cmd_stop(args: argparse.Namespace) -> int:
    from deploy.ray_launcher import connect, remove_deployment

    config = RayConfig(address=args.address, deployment_name=args.deployment_name)
    ray = connect(config.address, config.deployment_name, log_to_driver=False)
    try:
        removed = remove_deployment(ray, config)
    finally:
        ray.shutdown()
    if not removed:
        print(f"pdserve: no deployment named {config.deployment_name!r} is running")
        return 1
    print(f"pdserve: stopped {config.deployment_name!r}: removed {', '.join(removed)} "
          f"and its placement groups")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("OPENAI_API_KEY")
    view = _from_url(args.url, key) if args.url else _from_ray(args.address,
                                                               args.deployment_name)
    if view is None:
        print(f"pdserve: no deployment named {args.deployment_name!r} is running")
        return 1
    print(json.dumps(view, indent=2) if args.json else render(view))
    return 0


def _from_url(url: str, api_key: str | None = None) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(url.rstrip("/") + "/status", headers=headers, timeout=10)
    if response.status_code == 401:
        raise SystemExit("pdserve: the proxy wants its API key for /status: pass --api-key "
                         "or set OPENAI_API_KEY")
    body = response.json()
    return {"deployment": None, "proxy": {"url": url}, **body}


def _from_ray(address: str | None, name: str) -> dict[str, Any] | None:
    from deploy.ray_launcher import connect

    ray = connect(address, name, log_to_driver=False)
    try:
        try:
            proxy = ray.get_actor(PROXY_ACTOR, namespace=name)
        except ValueError:
            return None
        view = {"deployment": name, "proxy": ray.get(proxy.info.remote(), timeout=10),
                **ray.get(proxy.status.remote(), timeout=10)}
        names = sorted(n for n in ray.util.list_named_actors() if n != PROXY_ACTOR)
        placement = {n: _placement(ray, ray.get_actor(n, namespace=name)) for n in names}
        ranks: dict[str, list[dict[str, Any]]] = {}  # a TP worker's follower rank actors
        for n in names:
            of = rank_of_actor(n)
            if of is not None:
                ranks.setdefault(of[0], []).append({"rank": of[1], **placement.pop(n)})
        seen = {w["worker_id"] for w in view["workers"]}
        view["workers"] = ([{**w, **placement.get(w["worker_id"], {})} for w in view["workers"]]
                           + [{"worker_id": n, "alive": False, **p}
                              for n, p in placement.items() if n not in seen])
        for w in view["workers"]:
            if w["worker_id"] in ranks:
                w["rank_actors"] = sorted(ranks[w["worker_id"]], key=lambda r: r["rank"])
        return view
    finally:
        ray.shutdown()


def _placement(ray: Any, handle: Any) -> dict[str, Any]:
    """Ray's side of one worker: node, IP, pid (from the actor), actor state and restarts (GCS)."""
    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        info = ray.get(handle.info.remote(), timeout=5)
        keys = ("role", "node_id", "node_ip", "hostname", "pid", "error", "nccl_env")
        out = {k: info[k] for k in keys if k in info}
    with contextlib.suppress(Exception):  # the actor table is a developer API: best effort
        from ray._private import state

        entry = state.actors(actor_id=handle._actor_id.hex())
        out.setdefault("node_id", entry["Address"]["NodeID"])
        out.update(actor_state=entry["State"], num_restarts=entry["NumRestarts"])
    return out


def render(view: dict[str, Any]) -> str:
    proxy = view.get("proxy", {})
    where = f" on node {proxy['node_id'][:12]} ({proxy['node_ip']})" if proxy.get("node_id") else ""
    name = f"deployment {view['deployment']!r}: " if view.get("deployment") else ""
    lines = [f"{name}model {view.get('model')} (max_model_len {view.get('max_model_len')}), "
             f"proxy {proxy.get('url')}{where}"]
    cols = ("WORKER", "ROLE", "NODE", "IP", "PID", "ACTOR", "RESTARTS", "ALIVE", "RUNNING",
            "WAITING", "KV USED")
    rows = [cols]
    for w in view.get("workers", []):
        rows.append((w["worker_id"], w.get("role", "?"),
                     (w.get("node_id") or w.get("host") or "?")[:12], w.get("node_ip", "?"),
                     str(w.get("pid", "?")), w.get("actor_state", "-"),
                     str(w.get("num_restarts", "-")), "yes" if w.get("alive") else "NO",
                     str(w.get("num_running", "-")), str(w.get("num_waiting", "-")),
                     f"{100 * w['kv_usage']:.1f}%" if "kv_usage" in w else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines += ["  ".join(c.ljust(n) for c, n in zip(r, widths, strict=True)).rstrip() for r in rows]
    for w in view.get("workers", []):
        if w.get("kv_plan"):
            lines.append(f"  {w['worker_id']}: ctrl {w.get('ctrl_address')}, "
                         f"kv {w.get('kv_address')}; {w['kv_plan']}")
        if w.get("error"):
            lines.append(f"  {w['worker_id']}: cannot start: {w['error']}")
        for r in w.get("rank_actors", []):
            lines.append(f"  {w['worker_id']} rank {r['rank']}: node "
                         f"{(r.get('node_id') or '?')[:12]}, pid {r.get('pid', '?')}, actor "
                         f"{r.get('actor_state', '-')}")
    return "\n".join(lines)
