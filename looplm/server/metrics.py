"""Counters for `/metrics`, written in the Prometheus text exposition format (no client library).

HTTP-side counts (requests by route and status, usage tokens) live here; the engine keeps its
own counters (tokens generated, loops, decode steps) and gauges (queue depth, running
sequences), read when the page is rendered.
"""

from __future__ import annotations

import threading
from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def record_request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def record_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def render(self, engine) -> str:  # noqa: ANN001 - looplm.server.engine.Engine
        with self._lock:
            requests = sorted(self.requests.items())
            prompt_tokens, completion_tokens = self.prompt_tokens, self.completion_tokens
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP looplm_{name} {help_text}")
            lines.append(f"# TYPE looplm_{name} {kind}")
            lines.extend(f"looplm_{name}{labels} {value:g}" for labels, value in samples)

        metric("requests_total", "counter", "HTTP requests by route and status code.",
               [(f'{{route="{route}",status="{status}"}}', n) for (route, status), n in requests] or [("", 0)])
        metric("prompt_tokens_total", "counter", "Prompt tokens of completed requests (usage).", [("", prompt_tokens)])
        metric("completion_tokens_total", "counter", "Completion tokens of completed requests (usage).",
               [("", completion_tokens)])
        metric("generated_tokens_total", "counter", "Tokens the engine generated (cancelled sequences included).",
               [("", engine.tokens_total)])
        metric("loops_total", "counter", "UT loops over all generated tokens (the exit step each token read).",
               [("", engine.loops_total)])
        mean = engine.loops_total / engine.tokens_total if engine.tokens_total else 0.0
        metric("mean_loops_per_token", "gauge", "loops_total / generated_tokens_total.", [("", mean)])
        metric("decode_steps_total", "counter", "Batched decode steps run.", [("", engine.decode_steps_total)])
        metric("prefills_total", "counter", "Prompt passes run (the n choices of a prompt share one).",
               [("", engine.prefills_total)])
        metric("cached_prompt_tokens_total", "counter",
               "Prompt tokens whose K/V came from the prefix store (once per prompt pass, as prefills_total).",
               [("", engine.cached_prompt_tokens_total)])
        store = engine.prefix_store
        metric("prefix_store_bytes", "gauge", "K/V bytes the prefix store holds.", [("", store.nbytes if store else 0)])
        metric("queue_depth", "gauge", "Requests waiting to be admitted.", [("", engine.queue_depth)])
        metric("running_sequences", "gauge", "Sequences in running batches.", [("", engine.running)])
        metric("prefilling_sequences", "gauge", "Admitted sequences whose prompt is still being prefilled.",
               [("", engine.prefilling)])
        return "\n".join(lines) + "\n"
