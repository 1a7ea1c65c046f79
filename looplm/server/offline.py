"""Offline batch inference: a JSONL file of OpenAI requests, run through the server in-process.

The input is OpenAI's Batch API format, one request per line:
`{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`
(`url` may also be `/v1/completions`). A line may also be a bare request body with `messages`
(chat) or `prompt` (completions), optionally with its own `custom_id`; without one its id is
`line-N-` and a digest of the body (`_line_id`), so an edited request is a new one. A request's
`model` is ignored: the batch runs the model it was started with. Every request goes through the
same FastAPI app as `looplm serve`, over an in-process transport (no socket), so validation, chat
templates, stop strings, `<think>` splitting and usage are the server's own, and the engine
batches the requests continuously.

The output is OpenAI's batch output format, one line per request, in the order requests finish:
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}`. A
request the server refuses keeps its 4xx status and error body. Each line is written as soon as
its request finishes, so a stopped run loses only the requests in flight; run it again with the
same output file and it keeps the finished lines and runs only the rest (requests that failed
are dropped from the file and tried again). An existing output file that is not batch output is
refused, untouched (see `resume`).

Structural faults in the input (a line that is not a JSON object or not strict JSON, an unknown
url, `stream`, a repeated custom_id) stop the run before any request is sent, naming the line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from looplm.errors import LooplmError
from looplm.server import DEFAULT_PREFIX_CACHE_MB
from looplm.server.schemas import MAX_N

ROUTES = ("/v1/chat/completions", "/v1/completions")
# The most sequences one request queues: up to MAX_N prompts (completions) times n <= MAX_N. The
# engine's queue is sized for every request in flight, so a batch never meets the server's 429.
SEQUENCES_PER_REQUEST = MAX_N * MAX_N


@dataclass
class BatchRequest:
    custom_id: str
    url: str
    body: dict
    line: int


@dataclass
class BatchSummary:
    total: int  # requests in the input
    skipped: int  # finished by an earlier run (their lines were kept)
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    failed_ids: list[str] = field(default_factory=list)


def read_requests(path: Path | str) -> list[BatchRequest]:
    """The requests of an input file, or a LooplmError naming the first faulty line."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (some editors write one) is not JSON
    except FileNotFoundError:
        raise LooplmError(f"input file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LooplmError(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from None
    requests: list[BatchRequest] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(_jsonl_lines(text), 1):
        if not line.strip():
            continue
        request = _parse_line(line, number, f"{path}:{number}")
        if request.custom_id in seen:
            raise LooplmError(f"{path}:{number}: custom_id {request.custom_id!r} is already used on line "
                              f"{seen[request.custom_id]}; every request needs its own")
        seen[request.custom_id] = number
        requests.append(request)
    if not requests:
        raise LooplmError(f"{path} holds no requests (one JSON object per line)")
    return requests


def _jsonl_lines(text: str) -> list[str]:
    """The lines of JSONL text. Only "\n" ends a line: `str.splitlines` also splits at U+2028, U+0085
    and others, which JSON (and our output, written with ensure_ascii=False) leaves raw in strings."""
    return text.split("\n")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _load_json(line: str, where: str) -> object:
    """A line as strict JSON. Python's json reads NaN and Infinity, 1e999 (as inf) and lone surrogate
    escapes, but the request is sent as strict UTF-8 JSON, where they would stop the whole batch."""
    try:
        item = json.loads(line, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise LooplmError(f"{where}: not JSON ({exc.msg})") from None
    except RecursionError:
        raise LooplmError(f"{where}: not JSON (nested too deeply)") from None
    except ValueError as exc:  # NaN or Infinity, or an integer past Python's 4300 digits
        reason = str(exc) if "JSON number" in str(exc) else "an integer of over 4300 digits"
        raise LooplmError(f"{where}: not JSON ({reason})") from None
    try:
        json.dumps(item, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LooplmError(f"{where}: a string holds a lone surrogate ({exc.object[exc.start:exc.end]!r}), "
                          "which is not Unicode text") from None
    except ValueError:
        raise LooplmError(f"{where}: a number is beyond a 64-bit float's range") from None
    return item


def _parse_line(line: str, number: int, where: str) -> BatchRequest:
    item = _load_json(line, where)
    if not isinstance(item, dict):
        raise LooplmError(f"{where}: a request is a JSON object, got {type(item).__name__}")
    if "body" in item or "url" in item:  # OpenAI's batch line
        url, body, method = item.get("url"), item.get("body"), item.get("method", "POST")
        if url not in ROUTES:
            raise LooplmError(f"{where}: url must be {' or '.join(ROUTES)}, got {url!r}")
        if method != "POST":
            raise LooplmError(f"{where}: method must be POST, got {method!r}")
        if not isinstance(body, dict):
            raise LooplmError(f"{where}: body must be a JSON object (the request)")
        custom_id = item.get("custom_id")
        if custom_id is None:
            raise LooplmError(f"{where}: custom_id is missing (each line of an OpenAI batch names its request)")
    else:  # a bare request body
        body = dict(item)
        custom_id = body.pop("custom_id") if "custom_id" in body else _line_id(number, body)
        if "messages" in body:
            url = ROUTES[0]
        elif "prompt" in body:
            url = ROUTES[1]
        else:
            raise LooplmError(f"{where}: give an OpenAI batch line (custom_id, url, body) or a request body "
                              "with messages (chat) or prompt (completions)")
    if not isinstance(custom_id, str) or not custom_id:
        raise LooplmError(f"{where}: custom_id must be a non-empty string, got {custom_id!r}")
    if body.get("stream"):
        raise LooplmError(f"{where}: stream is not supported in a batch (each reply is written whole)")
    body = {key: value for key, value in body.items() if key != "model"}  # the batch's model answers
    return BatchRequest(custom_id, url, body, number)


def _line_id(number: int, body: dict) -> str:
    """A bare body's custom_id without one of its own: `line-N-` and 8 hex digits of the SHA-256 of
    the body's canonical JSON (keys sorted, no spaces, `model` left out as the batch ignores it). An
    edited request gets a new id, so a rerun into the same output is refused (it holds a result for an
    id the input lacks) instead of keeping the old request's result."""
    canonical = json.dumps({key: value for key, value in body.items() if key != "model"}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return f"line-{number}-{hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:8]}"


# What an output line holds, and how `output_line`'s lines start once json.dumps writes them.
OUTPUT_KEYS = ("id", "custom_id", "response", "error")
OUTPUT_LINE_START = '{"id": "batch_req_'


def resume(path: Path, requests: list[BatchRequest]) -> set[str]:
    """The custom_ids an earlier run finished in the output file `path`. The file is rewritten with
    only those lines: failed requests are tried again, and a line cut short by a kill is dropped.

    A file that is not batch output is refused and left alone, so `-o` never erases notes or an
    input file: every line must be an output line (`_result`). The one exception is a last line
    that a killed run was writing: no newline after it, and it starts as our lines do."""
    if not path.exists() or not path.stat().st_size:
        return set()
    wanted = {request.custom_id for request in requests}
    kept: list[str] = []
    done: set[str] = set()
    try:
        lines = _jsonl_lines(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise LooplmError(f"cannot read the output file {path} ({getattr(exc, 'strerror', None) or exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        result = _result(line)
        if result is None:
            if number == len(lines) and line.startswith(OUTPUT_LINE_START):  # cut short: a newline ends ours
                continue
            raise LooplmError(f"{path}:{number} is not a batch output line, so {path.name} is left as it is; pass "
                              "another output file (or delete it, if it is an old batch's output)")
        custom_id, status = result
        if status != 200 or custom_id in done:  # failed: tried again (if still asked for)
            continue
        if custom_id not in wanted:
            raise LooplmError(f"{path} holds a result for custom_id {custom_id!r}, which the input does not "
                              "have (another batch's output, or a request changed since); pass another output "
                              "file or delete it")
        done.add(custom_id)
        kept.append(line)
    # Rewritten too when the file does not end with a newline (edited by hand, say): the next line
    # appended would be glued to its last one, and both would be lost to the next resume.
    if len(kept) < sum(1 for line in lines if line.strip()) or lines[-1]:
        _rewrite(path, kept)
    return done


def _rewrite(path: Path, lines: list[str]) -> None:
    """Replace `path` by `lines` (`replace_text`: a crash midway cannot lose the kept lines). On
    failure `path` is as it was and no temporary file is left."""
    from looplm.output_files import replace_text

    try:
        replace_text(path, "".join(line + "\n" for line in lines))
    except OSError as exc:  # e.g. the disk is full
        raise LooplmError(f"could not rewrite {path} without its failed and cut-short lines "
                          f"({exc.strerror or exc}); it is as it was") from None


def _result(line: str) -> tuple[str, object] | None:
    """(custom_id, status_code) of a batch output line, or None for any other line: an object with
    `id`, `custom_id` and `error`, and a `response` object with a `status_code`."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(row, dict) or any(key not in row for key in OUTPUT_KEYS):
        return None
    custom_id, response = row["custom_id"], row["response"]
    if not isinstance(row["id"], str) or not isinstance(custom_id, str) or not isinstance(response, dict) \
            or "status_code" not in response:
        return None
    return custom_id, response["status_code"]


async def _send(client, request: BatchRequest) -> tuple[int, dict]:  # noqa: ANN001
    response = await client.post(request.url, json=request.body)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"error": {"message": response.text, "type": "server_error"}}


def output_line(request: BatchRequest, status: int, body: dict) -> dict:
    """OpenAI's batch output object for one request."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request.custom_id,
            "response": {"status_code": status, "request_id": body.get("id"), "body": body}, "error": None}


async def _run(app, requests: list[BatchRequest], output: Path, in_flight: int,  # noqa: ANN001
               summary: BatchSummary, advance: Callable[[int], None] | None) -> None:
    import httpx

    # A request the app fails on unexpectedly is answered 500 and recorded like any failed request:
    # by default the transport re-raises it, which stopped the whole batch and lost those in flight.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    pending = iter(requests)
    started = time.perf_counter()
    try:
        out = output.open("a", encoding="utf-8")
    except OSError as exc:  # checked before the model loaded, but the file may have changed since
        raise LooplmError(f"cannot write {output} ({exc.strerror or exc})") from None

    async def worker(client) -> None:  # noqa: ANN001
        for request in pending:  # the workers share one iterator: each request runs once
            status, body = await _send(client, request)
            try:
                out.write(json.dumps(output_line(request, status, body), ensure_ascii=False) + "\n")
                out.flush()  # one line per finished request: a stop loses only those in flight
            except OSError as exc:  # e.g. the disk is full
                raise LooplmError(f"could not write {output} ({exc.strerror or exc}); the requests finished "
                                  "before are in it, and a rerun goes on from them") from None
            if status == 200:
                summary.succeeded += 1
                usage = body.get("usage") or {}
                summary.prompt_tokens += usage.get("prompt_tokens", 0)
                summary.completion_tokens += usage.get("completion_tokens", 0)
            else:
                summary.failed += 1
                summary.failed_ids.append(request.custom_id)
            summary.seconds = time.perf_counter() - started
            if advance is not None:
                advance(1)

    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://looplm", timeout=None) as client:
            await asyncio.gather(*(worker(client) for _ in range(in_flight)))
    finally:
        try:
            out.close()
        except OSError:  # the failed write above is the error to report
            pass


@dataclass
class BatchPlan:
    """An input file's requests, and which of them an earlier run already finished in the output."""

    requests: list[BatchRequest]
    output: Path
    done: set[str]

    @property
    def todo(self) -> list[BatchRequest]:
        return [request for request in self.requests if request.custom_id not in self.done]


def plan_batch(input_path: Path | str, output_path: Path | str, max_tokens: int | None = None,
               output_option: str = "output") -> BatchPlan:
    """Read and check the input, and take stock of the output (see `resume`), before any model loads.
    `max_tokens` is given to requests that set neither `max_tokens` nor `max_completion_tokens`
    (None: the server's rule, up to the context). `output_option` names the output in errors."""
    from looplm.output_files import check_writable

    input_path, output_path = Path(input_path).expanduser(), Path(output_path).expanduser()
    if max_tokens is not None and max_tokens < 1:
        raise LooplmError(f"max_tokens must be a positive integer, got {max_tokens}")
    requests = read_requests(input_path)
    check_writable(output_path, output_option)
    if output_path.resolve() == input_path.resolve():
        raise LooplmError("the output file must not be the input file")
    if max_tokens is not None:
        for request in requests:
            if request.body.get("max_tokens") is None and request.body.get("max_completion_tokens") is None:
                request.body["max_tokens"] = max_tokens
    output_path.parent.mkdir(parents=True, exist_ok=True)
    return BatchPlan(requests, output_path, resume(output_path, requests))


def run_batch(model, plan: BatchPlan, name: str, max_context: int = 2048, max_batch: int = 16,  # noqa: ANN001
              prefill_chunk: int = 256, prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB,
              progress: Callable[[int, int], Callable[[int], None]] | None = None) -> BatchSummary:
    """Run the plan's unfinished requests on `model` and append their results to its output file.

    The engine options are `looplm serve`'s; `name` is the model id the replies carry.
    `progress(total, already_done)` may return a function called with 1 as each request finishes.
    """
    from looplm.server.app import create_app
    from looplm.server.engine import Engine

    todo = plan.todo
    summary = BatchSummary(total=len(plan.requests), skipped=len(plan.done))
    if not todo:
        return summary
    in_flight = 2 * max_batch  # a queue as long as the batch: a finished row is replaced at once
    context = min(max_context, model.config.max_position_embeddings)
    engine = Engine(model, max_context=context, max_batch=max_batch, max_queue=in_flight * SEQUENCES_PER_REQUEST,
                    prefill_chunk=prefill_chunk, prefix_cache_bytes=prefix_cache_mb << 20)
    app = create_app(engine, name, manage_engine=False)
    advance = progress(summary.total, summary.skipped) if progress is not None else None
    engine.start()
    try:
        asyncio.run(_run(app, todo, plan.output, min(in_flight, len(todo)), summary, advance))
    finally:
        engine.stop()
    return summary


__all__ = ["BatchPlan", "BatchRequest", "BatchSummary", "output_line", "plan_batch", "read_requests", "resume",
           "run_batch"]
