"""`looplm serve`: the OpenAI-compatible HTTP server (loopback by default)."""

import ipaddress
import socket
from typing import Annotated, Optional

import typer

from looplm.cli import common
from looplm.errors import LooplmError
from looplm.server import DEFAULT_PREFIX_CACHE_MB


@common.app.command()
def serve(
    model: common.Model = None,
    dtype: common.Dtype = "bfloat16",
    device: common.Device = "auto",
    steps: common.Steps = None,
    quant: common.Quant = None,
    group_size: common.GroupSize = None,
    host: Annotated[str, common.option("Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, common.option("TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="LOOPLM_API_KEY", show_default=False,
        help="Require 'Authorization: Bearer KEY' on /v1/* (also read from $LOOPLM_API_KEY).")] = None,
    max_context: common.MaxContext = 2048,
    max_batch: common.MaxBatch = 16,
    max_queue: Annotated[int, common.option("Most requests waiting; more get HTTP 429.")] = 64,
    prefill_chunk: common.PrefillChunk = 256,
    prefix_cache_mb: common.PrefixCacheMb = DEFAULT_PREFIX_CACHE_MB,
    threads: common.Threads = None,
    served_model_name: common.ServedModelName = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, streaming, /metrics)."""
    import uvicorn

    from looplm.server import build_app
    from looplm.server import served_model_name as name_for
    from looplm.server.uvicorn_server import GRACE_S, EngineStoppingServer

    if api_key is not None:
        api_key = api_key.strip()  # the header's value is compared stripped too
        if not api_key:  # --api-key "$KEY" with KEY unset would serve openly
            raise LooplmError("--api-key (or $LOOPLM_API_KEY) is empty; give a key, or leave the option out")
    common.set_threads(threads)
    common.check_engine_options(max_context, max_batch, prefill_chunk, prefix_cache_mb)
    if max_queue < 1:
        raise LooplmError(f"--max-queue must be a positive integer, got {max_queue}")
    listener = _listen(host, port)  # a bad or busy address fails now, not after loading the model
    if not _is_loopback(host) and not api_key:
        common.stderr().print(f"warning: serving on {host} without --api-key: anyone who can reach it can use it")
    lm = common.load_model(model, dtype, device, steps, quant, group_size)
    name = served_model_name or name_for(model)
    app = build_app(lm, name, api_key, max_context, max_batch, max_queue, prefill_chunk, prefix_cache_mb)
    shown_host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    common.stderr().print(f"serving '{name}' at http://{shown_host}:{port}/v1 (Ctrl-C stops)")
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=GRACE_S)
    EngineStoppingServer(config, app.state.engine).run(sockets=[listener])


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound to (host, port); uvicorn listens on it once the model is loaded."""
    if not 1 <= port <= 65535:
        raise LooplmError(f"--port must be from 1 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise LooplmError(f"--host {host!r} is not an address of this machine ({exc.strerror})") from None
    except UnicodeError:  # a label the IDNA codec refuses ("a..b", 64 characters or more)
        raise LooplmError(f"--host {host!r} is not a valid host name") from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart right after a stop
    try:
        listener.bind(address)
        # Listening now, not when uvicorn starts: two sockets with SO_REUSEADDR can both bind a
        # port, so a second server started at the same moment loaded its model, said it was
        # serving, then died in uvicorn's listen().
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        raise LooplmError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host, "
                          "or stop what is using it") from None
    return listener


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
