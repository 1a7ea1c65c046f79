"""OpenAI-compatible serving: `looplm serve`, or `build_app` to mount the API elsewhere (Ray Serve).

Layers: `app.py` (routes) -> `schemas.py` (request bodies) -> `session.py` (one request's
choices, text deltas) -> `engine.py` (worker thread, continuous batching) -> `batch.py`
(one batch's KV buffer). `reasoning.py` splits `<think>` text; `metrics.py` renders /metrics;
`offline.py` runs a JSONL file of requests through the app in-process (`looplm batch`);
`jobs.py` runs a list of token-id generations through an engine (`looplm eval`, lm-eval).
"""

from __future__ import annotations

import os

DEFAULT_MODEL_NAME = "looplm-default"
# The prefix store's default budget wherever an engine runs: serve, batch, eval, lm-eval.
DEFAULT_PREFIX_CACHE_MB = 1024


def served_model_name(model: str | None) -> str:
    """The id clients pass as `model`: the directory or file name, the hub id, or looplm-default."""
    if model is None:
        return DEFAULT_MODEL_NAME
    path = os.path.normpath(model)
    return os.path.basename(path) if os.path.exists(path) else model


def build_app(model, name: str, api_key: str | None = None, max_context: int = 2048, max_batch: int = 16,  # noqa: ANN001
              max_queue: int = 64, prefill_chunk: int = 256, prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB):  # noqa: ANN201
    """A FastAPI app over a new engine for a loaded model; the engine starts and stops with the app.

    `max_context` is capped at the model's `max_position_embeddings`; `prefill_chunk` bounds the
    prompt positions one prefill pass runs while other requests are decoding; `prefix_cache_mb`
    holds finished sequences' K/V for prompts that start the same way (0: off).
    """
    from looplm.server.app import create_app
    from looplm.server.engine import Engine

    context = min(max_context, model.config.max_position_embeddings)
    engine = Engine(model, max_context=context, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                    prefix_cache_bytes=prefix_cache_mb << 20)
    return create_app(engine, name, api_key=api_key)
