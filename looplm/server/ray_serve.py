"""Scale-out: N replicas of the looplm server behind one endpoint, with Ray Serve.

Needs the optional extra: `pip install 'looplm[ray]'`. Each replica is a Ray actor that loads
the model and runs its own engine (worker thread, continuous batching) under the same FastAPI
app as `looplm serve`; Ray's HTTP proxy spreads requests over the replicas. So the API,
errors, streaming and /metrics are the same (metrics are per replica: the proxy answers a
scrape from one of them).

    from ray import serve
    from looplm.server.ray_serve import app
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(app("path/to/Ouro-1.4B", num_replicas=2), route_prefix="/")

or from the shell, with Ray's own CLI and this module's application builder:

    serve run looplm.server.ray_serve:app_builder model=path/to/Ouro-1.4B num_replicas=2
"""

from __future__ import annotations

from typing import Any

from looplm.errors import LooplmError


def deployment(
    model: str | None = None,
    *,
    num_replicas: int = 1,
    dtype: str = "bfloat16",
    device: str = "cpu",
    steps: int | None = None,
    max_context: int = 2048,
    max_batch: int = 16,
    max_queue: int = 64,
    api_key: str | None = None,
    served_model_name: str | None = None,
    threads: int | None = None,
    ray_actor_options: dict[str, Any] | None = None,
):  # noqa: ANN201 - ray.serve.Deployment
    """A Ray Serve deployment whose replicas each serve `model` with the looplm API."""
    try:
        from ray import serve
    except ImportError as exc:
        raise LooplmError("Ray Serve is not installed: pip install 'looplm[ray]'") from exc

    from looplm.server import served_model_name as name_for

    name = served_model_name or name_for(model)

    def build_replica_app():  # noqa: ANN202 - runs inside each replica
        import torch

        import looplm
        from looplm.server import build_app

        if threads is not None:
            torch.set_num_threads(threads)
        lm = looplm.load(model, dtype=dtype, device=device, steps=steps)
        return build_app(lm, name, api_key, max_context, max_batch, max_queue)

    ingress = serve.ingress(build_replica_app)()
    options = ray_actor_options or {"num_cpus": 1}
    return serve.deployment(ingress, name="looplm", num_replicas=num_replicas, ray_actor_options=options)


def app(model: str | None = None, **options: Any):  # noqa: ANN201 - ray.serve.Application
    """The bound application, ready for `serve.run`; options as in `deployment`."""
    return deployment(model, **options).bind()


def app_builder(args: dict[str, str]):  # noqa: ANN201
    """For `serve run looplm.server.ray_serve:app_builder key=value ...` (values arrive as strings)."""
    ints = ("num_replicas", "steps", "max_context", "max_batch", "max_queue", "threads")
    options = {key: int(value) if key in ints else value for key, value in args.items()}
    return app(options.pop("model", None), **options)
