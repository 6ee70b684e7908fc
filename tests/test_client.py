"""The worker client's contract without a worker: config, import weight, error mapping."""

from __future__ import annotations

import subprocess
import sys

from model.client import (ModelBadRequest, ModelClient, ModelError, ModelOverloaded, ModelUnavailable,
                          error_for_status)
from model.config import config_from_dict
from tests.conftest import ROOT


def test_importing_the_client_does_not_import_torch():
    code = "import sys, model.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


async def test_from_config_uses_url_or_worker_address_and_the_key_env(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sesame")
    cfg = config_from_dict({"worker": {"host": "127.0.0.1", "port": 9123}, "model": {"api_key_env": "MY_KEY"}})
    client = ModelClient.from_config(cfg)
    assert client.base_url == "http://127.0.0.1:9123" and client.api_key == "sesame"
    await client.aclose()
    cfg = config_from_dict({"model": {"url": "http://gpu-box:8000/v1/", "request_timeout_s": 7}})
    client = ModelClient.from_config(cfg)
    assert client.base_url == "http://gpu-box:8000" and client.timeout == 7
    await client.aclose()


def test_statuses_map_to_typed_errors_with_the_servers_message():
    busy = error_for_status(429, "queue full", {"Retry-After": "2"})
    assert isinstance(busy, ModelOverloaded) and busy.retry_after == 2.0 and "queue full" in busy.message
    assert isinstance(error_for_status(503, "asleep"), ModelUnavailable)
    for status in (400, 401, 404, 409):
        err = error_for_status(status, "why")
        assert isinstance(err, ModelBadRequest) and err.status == status and err.message == "why"
    assert type(error_for_status(500, "boom")) is ModelError
