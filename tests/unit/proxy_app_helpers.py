"""The real proxy app (proxy/app.py: `build_app`) over a real `ClusterClient` with no workers
registered and SmolLM2's real tokenizer, for the routes that need no worker (validation,
/v1/models, /tokenize, /health, CORS)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from fastapi.testclient import TestClient

from deploy.local_launcher import load_tokenizer
from proxy.app import ProxyConfig, build_app
from proxy.cluster import ClusterClient
from proxy.cluster_state import ClusterConfig
from proxy.metrics import ProxyMetrics

MODEL_NAME = "smollm2"


@contextlib.contextmanager
def app_client(**config: Any) -> Iterator[TestClient]:
    """A TestClient of the app for model `MODEL_NAME`; `config`: extra ProxyConfig fields."""
    metrics = ProxyMetrics()
    cluster = ClusterClient(ClusterConfig(), metrics)
    app = build_app(ProxyConfig(MODEL_NAME, 2048, **config), cluster, load_tokenizer("smollm2"),
                    metrics)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client
    finally:
        asyncio.run(cluster.close())
