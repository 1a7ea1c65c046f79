"""Ray Serve scale-out: one local replica serves a chat request through Ray's HTTP proxy.

Slow (starting a local Ray cluster takes tens of seconds) and skipped without `looplm[ray]`.
"""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_replica_serves_a_request(tmp_path) -> None:  # noqa: ANN001
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    openai = pytest.importorskip("openai")
    from looplm.server import DEFAULT_MODEL_NAME
    from looplm.server.ray_serve import app

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"LOOPLM_HOME": str(tmp_path)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app(None, num_replicas=1, dtype="float32", max_context=256, threads=1), route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_NAME]
        reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=5, temperature=0)
        assert reply.usage.completion_tokens >= 1
        assert reply.choices[0].finish_reason in ("stop", "length")
        chunks = list(client.completions.create(model=DEFAULT_MODEL_NAME, prompt="ab", max_tokens=4, temperature=0,
                                                stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    finally:
        serve.shutdown()
        ray.shutdown()
