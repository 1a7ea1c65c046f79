"""uvicorn's server, stopping the engine as soon as a stop signal comes (`looplm serve`)."""

from __future__ import annotations

from types import FrameType

import uvicorn

from looplm.server.engine import Engine

GRACE_S = 10  # after a stop signal, the longest uvicorn waits for connections (idle keep-alives, say)


class EngineStoppingServer(uvicorn.Server):
    """uvicorn shuts the app, and with it the engine, down only after open connections close, so
    one long stream kept the process serving for minutes after Ctrl-C or SIGTERM (and a second
    Ctrl-C aborted it mid-step). A stop signal now stops the engine at once: every running or
    queued sequence ends with an error event ("the server is shutting down") and its stream
    with it, then uvicorn exits."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.engine.request_stop()
        super().handle_exit(sig, frame)
