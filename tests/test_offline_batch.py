"""`looplm batch`: OpenAI batch files run through the server's app in-process, resumable."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import looplm
from looplm.cli import app
from looplm.errors import LooplmError
from looplm.server.offline import OUTPUT_LINE_START, output_line, plan_batch, read_requests, resume, run_batch


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOPLM_HOME", str(tmp_path_factory.mktemp("home")))
        return looplm.load(dtype="float32")  # fp32: a row in a batch gives the tokens it gives alone


def write_lines(path: Path, *items: object) -> Path:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))
    return path


def openai_line(custom_id: str, body: dict, url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def results(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({row["custom_id"] for row in rows}) == len(rows), "one line per request"
    return {row["custom_id"]: row for row in rows}


def greedy_chat(model, content: str, max_tokens: int) -> str:  # noqa: ANN001
    tok = model.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": content}]))
    return tok.decode(model.generate(ids, max_tokens)[0])


# -- reading the input ---------------------------------------------------------------------------


# The documented id of a bare body without custom_id: line-N- and 8 hex digits of the SHA-256 of its
# canonical JSON (keys sorted at every level, no spaces)
YO_ID = "line-3-" + hashlib.sha256(b'{"max_tokens":3,"messages":[{"content":"yo","role":"user"}]}').hexdigest()[:8]


def test_openai_lines_and_bare_bodies_are_read(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "in.jsonl",
        openai_line("a", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
        "",
        {"messages": [{"role": "user", "content": "yo"}], "max_tokens": 3},
        {"custom_id": "c", "prompt": "Once", "n": 2},
    )
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a byte-order mark is skipped
    requests = read_requests(path)
    assert [(r.custom_id, r.url, r.line) for r in requests] == [
        ("a", "/v1/chat/completions", 1), (YO_ID, "/v1/chat/completions", 3), ("c", "/v1/completions", 4)]
    assert "model" not in requests[0].body  # the batch's model answers every request
    assert requests[2].body == {"prompt": "Once", "n": 2}


def test_a_bare_bodys_id_changes_with_the_request_and_only_with_it(tmp_path: Path) -> None:
    def line_id(*items: object) -> str:
        return read_requests(write_lines(tmp_path / "in.jsonl", *items))[-1].custom_id

    first = line_id({"prompt": "hello", "max_tokens": 2})
    assert re.fullmatch(r"line-1-[0-9a-f]{8}", first)
    assert line_id('{ "max_tokens" : 2 , "prompt": "hello", "model": "gpt-4o" }') == first  # same request
    assert line_id({"prompt": "goodbye", "max_tokens": 2}) != first
    assert line_id({"prompt": "hello", "max_tokens": 3}) != first
    assert line_id({"prompt": "x"}, {"prompt": "hello", "max_tokens": 2}) == "line-2-" + first[7:]


@pytest.mark.parametrize(("line", "message"), [
    ("not json", "in.jsonl:1: not JSON"),
    ("[1, 2]", "a request is a JSON object, got list"),
    (json.dumps(openai_line("a", {}, url="/v1/embeddings")), "url must be /v1/chat/completions or /v1/completions"),
    (json.dumps({**openai_line("a", {}), "method": "GET"}), "method must be POST"),
    (json.dumps({"custom_id": "a", "url": "/v1/completions", "body": "x"}), "body must be a JSON object"),
    (json.dumps({"url": "/v1/completions", "body": {"prompt": "x"}}), "custom_id is missing"),
    (json.dumps({"custom_id": 7, "prompt": "x"}), "custom_id must be a non-empty string"),
    (json.dumps({"temperature": 0}), "messages (chat) or prompt (completions)"),
    (json.dumps({"prompt": "x", "stream": True}), "stream is not supported"),
    # Python's json reads these, but the request goes out as strict JSON: they crashed the whole batch there
    ('{"custom_id":"nan","url":"/v1/completions","method":"POST","body":{"prompt":"hi","temperature":NaN}}',
     "in.jsonl:1: not JSON (NaN is not a JSON number)"),
    ('{"prompt": "hi", "temperature": -Infinity}', "not JSON (-Infinity is not a JSON number)"),
    ('{"prompt": "hi", "temperature": 1e999}', "a number is beyond a 64-bit float's range"),
    ('{"prompt": "hi", "seed": ' + "1" * 5000 + "}", "not JSON (an integer of over 4300 digits)"),
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "not JSON (nested too deeply)"),
    ('{"prompt": "a\\ud800b"}', r"a string holds a lone surrogate ('\ud800'), which is not Unicode text"),
])
def test_a_faulty_line_is_named(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(LooplmError, match=re.escape(message)):
        read_requests(write_lines(tmp_path / "in.jsonl", line))


def test_repeated_ids_empty_and_missing_files_are_refused(tmp_path: Path) -> None:
    twice = write_lines(tmp_path / "twice.jsonl", {"custom_id": "q", "prompt": "a"}, {"custom_id": "q", "prompt": "b"})
    with pytest.raises(LooplmError, match="twice.jsonl:2: custom_id 'q' is already used on line 1"):
        read_requests(twice)
    with pytest.raises(LooplmError, match="holds no requests"):
        read_requests(write_lines(tmp_path / "empty.jsonl", ""))
    with pytest.raises(LooplmError, match="does not exist"):
        read_requests(tmp_path / "missing.jsonl")
    one = write_lines(tmp_path / "one.jsonl", {"prompt": "a"})
    with pytest.raises(LooplmError, match="must not be the input"):
        plan_batch(one, tmp_path / "." / "one.jsonl")


# -- resuming ---------------------------------------------------------------------------------------


def output_row(custom_id: str, status: int) -> dict:
    return {"id": "batch_req_x", "custom_id": custom_id, "response": {"status_code": status, "body": {}}, "error": None}


def test_resume_keeps_finished_lines_and_drops_failed_and_cut_ones(tmp_path: Path) -> None:
    requests = read_requests(write_lines(tmp_path / "in.jsonl", *({"custom_id": i, "prompt": i} for i in "abcd")))
    out = write_lines(tmp_path / "out.jsonl", output_row("a", 200), output_row("b", 400), output_row("c", 200),
                      output_row("gone", 500))
    with out.open("a") as f:
        f.write('{"id": "batch_req_1f2e", "custom_id": "d", "resp')  # a killed run's last line
    assert resume(out, requests) == {"a", "c"}
    assert list(results(out)) == ["a", "c"]  # the failed lines go: they are tried again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temporary file left


def test_our_output_lines_start_as_resume_expects_of_a_cut_short_one(tmp_path: Path) -> None:
    request = read_requests(write_lines(tmp_path / "in.jsonl", {"prompt": "x"}))[0]
    line = json.dumps(output_line(request, 200, {"id": "cmpl-1"}), ensure_ascii=False)  # as _run writes it
    assert line.startswith(OUTPUT_LINE_START)


def test_resume_ends_a_last_line_without_its_newline(tmp_path: Path) -> None:
    requests = read_requests(write_lines(tmp_path / "in.jsonl", *({"custom_id": i, "prompt": i} for i in "ab")))
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(output_row("a", 200)))  # e.g. saved by an editor that drops the last newline
    assert resume(out, requests) == {"a"}
    with out.open("a") as f:  # as the run appends the next result
        f.write(json.dumps(output_row("b", 200)) + "\n")
    assert list(results(out)) == ["a", "b"]  # was one glued line, refused by the next resume


def test_a_failed_rewrite_is_one_error_and_leaves_the_file_as_it_was(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    requests = read_requests(write_lines(tmp_path / "in.jsonl", {"custom_id": "a", "prompt": "x"}))
    out = write_lines(tmp_path / "out.jsonl", output_row("a", 200), output_row("a", 500))
    before = out.read_text()

    def disk_full(fd: int) -> None:  # the temporary file is written, then the disk is found full on sync
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(LooplmError, match=r"could not rewrite .*out.jsonl without its failed and cut-short lines "
                                          r"\(No space left on device\); it is as it was$"):
        resume(out, requests)
    monkeypatch.undo()
    assert out.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no *.resume-tmp left


def test_resume_refuses_and_leaves_alone_a_file_that_is_not_batch_output(tmp_path: Path) -> None:
    requests = read_requests(write_lines(tmp_path / "in.jsonl", {"custom_id": "a", "prompt": "x"},
                                         {"custom_id": "b", "prompt": "y"}))
    cases = {  # each was erased, or emptied of its lines, by a run with it as the output
        "notes.txt": "my important notes\n",
        "no-newline.txt": "my important notes",  # a last line, but not one of ours cut short
        "input.jsonl": (tmp_path / "in.jsonl").read_text(),  # its lines read as failed results
        "cut-early.jsonl": '{"id": "batch_req_1f2e", "custom_id": "a", "resp\n' + json.dumps(output_row("b", 200)),
        "null-response.jsonl": json.dumps({**output_row("a", 200), "response": None}) + "\n",
        "no-error-key.jsonl": json.dumps({"id": "x", "custom_id": "a", "response": {"status_code": 200}}) + "\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(LooplmError, match=rf"{name}:1 is not a batch output line, so {name} is left as it is"):
            resume(path, requests)
        assert path.read_text() == text, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*cases, "in.jsonl"])


def test_only_newlines_end_lines_so_a_raw_line_separator_in_a_string_is_read(tmp_path: Path) -> None:
    # JSON leaves U+2028 and U+0085 raw in strings (as our output does, with ensure_ascii=False), while
    # str.splitlines ends lines there: a finished batch whose reply held one could never be resumed
    text = "a\u2028b\x85c"
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "q", "prompt": text}, ensure_ascii=False) + "\r\n", encoding="utf-8")
    requests = read_requests(source)
    assert requests[0].body["prompt"] == text
    out = tmp_path / "out.jsonl"
    row = output_row("q", 200)
    row["response"]["body"] = {"choices": [{"text": text}]}
    out.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert resume(out, requests) == {"q"}
    assert json.loads(out.read_text(encoding="utf-8")) == row  # kept as it was


def test_resume_refuses_an_output_of_another_batch(tmp_path: Path) -> None:
    requests = read_requests(write_lines(tmp_path / "in.jsonl", {"custom_id": "a", "prompt": "x"}))
    other = write_lines(tmp_path / "other.jsonl", output_row("zz", 200))
    with pytest.raises(LooplmError, match="custom_id 'zz', which the input does not have"):
        resume(other, requests)
    assert results(other)["zz"]  # left as it was
    garbage = write_lines(tmp_path / "garbage.jsonl", "nonsense", output_row("a", 200))
    with pytest.raises(LooplmError, match="garbage.jsonl:1 is not a batch output line"):
        resume(garbage, requests)


# -- running ---------------------------------------------------------------------------------------


def test_a_batch_gives_the_servers_replies_and_a_rerun_only_retries_failures(tmp_path: Path, model) -> None:  # noqa: ANN001
    questions = [f"What is {i}+{i}?" for i in range(6)]
    lines = [openai_line(f"q{i}", {"messages": [{"role": "user", "content": q}], "max_tokens": 9, "temperature": 0})
             for i, q in enumerate(questions)]
    lines.append({"custom_id": "story", "prompt": "Once upon a time", "n": 2, "temperature": 0})
    lines.append({"custom_id": "bad", "prompt": "x", "max_tokens": -1})
    source = write_lines(tmp_path / "in.jsonl", *lines)
    out = tmp_path / "out" / "results.jsonl"
    seen: list[tuple[int, int]] = []

    def progress(total: int, done: int):  # noqa: ANN202
        seen.append((total, done))
        return lambda finished: seen.append((-1, finished))

    summary = run_batch(model, plan_batch(source, out, max_tokens=7), "tiny", max_batch=3, progress=progress)
    rows = results(out)
    assert seen[0] == (8, 0) and seen.count((-1, 1)) == 8
    assert (summary.total, summary.succeeded, summary.failed, summary.failed_ids) == (8, 7, 1, ["bad"])
    for i, question in enumerate(questions):  # batched with others, each gives its greedy reply alone
        body = rows[f"q{i}"]["response"]["body"]
        assert rows[f"q{i}"]["response"]["status_code"] == 200 and rows[f"q{i}"]["error"] is None
        assert body["model"] == "tiny" and rows[f"q{i}"]["response"]["request_id"] == body["id"]
        assert body["choices"][0]["message"]["content"] == greedy_chat(model, question, 9)
    story = rows["story"]["response"]["body"]
    assert story["usage"]["completion_tokens"] <= 14  # --max-tokens 7 for a request without max_tokens
    assert story["choices"][0]["text"] == story["choices"][1]["text"]
    assert summary.completion_tokens == sum(r["response"]["body"]["usage"]["completion_tokens"]
                                            for r in rows.values() if r["response"]["status_code"] == 200)
    bad = rows["bad"]["response"]
    assert bad["status_code"] == 400 and "max_tokens" in bad["body"]["error"]["message"]

    first = {key: row["id"] for key, row in rows.items()}
    again = run_batch(model, plan_batch(source, out), "tiny", max_batch=3)
    assert (again.skipped, again.succeeded, again.failed) == (7, 0, 1)
    rows = results(out)
    assert {key: row["id"] for key, row in rows.items() if key != "bad"} == {
        key: value for key, value in first.items() if key != "bad"}  # finished lines kept as they were
    assert rows["bad"]["id"] != first["bad"]  # tried again


def test_a_request_the_server_fails_on_unexpectedly_is_a_500_line_not_a_stopped_batch(
        tmp_path: Path, model, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    encode = model.tokenizer.encode

    def buggy(text: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if "boom" in text:
            raise RuntimeError("a bug")
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(model.tokenizer, "encode", buggy)
    source = write_lines(tmp_path / "in.jsonl", {"custom_id": "ok", "prompt": "Once", "max_tokens": 2},
                         {"custom_id": "boom", "prompt": "boom", "max_tokens": 2})
    summary = run_batch(model, plan_batch(source, tmp_path / "out.jsonl"), "tiny", max_batch=2)
    rows = results(tmp_path / "out.jsonl")
    assert (summary.succeeded, summary.failed_ids) == (1, ["boom"])
    assert rows["ok"]["response"]["status_code"] == 200
    assert rows["boom"]["response"]["status_code"] == 500
    assert "a bug" in rows["boom"]["response"]["body"]["error"]["message"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_is_one_error(tmp_path: Path, model) -> None:  # noqa: ANN001
    source = write_lines(tmp_path / "in.jsonl", {"prompt": "Once", "max_tokens": 2})
    with pytest.raises(LooplmError, match="could not write /dev/full .No space left on device.; the requests finished"):
        run_batch(model, plan_batch(source, "/dev/full"), "tiny", max_batch=1)


def test_an_output_that_became_unwritable_after_the_plan_is_one_error(tmp_path: Path, model) -> None:  # noqa: ANN001
    source = write_lines(tmp_path / "in.jsonl", {"prompt": "Once", "max_tokens": 2})
    plan = plan_batch(source, tmp_path / "out.jsonl")
    (tmp_path / "out.jsonl").mkdir()  # e.g. while the model loaded
    with pytest.raises(LooplmError, match=r"^cannot write .*out.jsonl \(Is a directory\)$"):
        run_batch(model, plan, "tiny", max_batch=1)


# -- the command line ------------------------------------------------------------------------------


def invoke(*args: str):  # noqa: ANN201
    return CliRunner().invoke(app, ["batch", *args])


def test_cli_runs_a_batch_and_says_what_failed(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", {"custom_id": "ok", "prompt": "Once", "max_tokens": 3},
                         {"custom_id": "bad", "prompt": "Once", "temperature": 9})
    out = tmp_path / "out.jsonl"
    result = invoke(str(source), "-o", str(out), "--dtype", "float32", "--max-batch", "2")
    assert result.exit_code == 1
    assert "1 request done" in result.stderr
    assert "error: 1 of 2 requests failed (bad)" in result.stderr and "retries them" in result.stderr
    assert results(out)["ok"]["response"]["status_code"] == 200
    source.write_text(json.dumps({"custom_id": "ok", "prompt": "Once", "max_tokens": 3}) + "\n")
    result = invoke(str(source), "-o", str(out))
    assert result.exit_code == 0 and "already in" in result.stderr


def test_cli_checks_its_files_and_options_before_loading_the_model(tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", {"prompt": "x"})
    missing_model = str(tmp_path / "no-model")
    nan = write_lines(tmp_path / "nan.jsonl", {"prompt": "x"}, '{"prompt": "hi", "temperature": NaN}')
    for args, message in [
        ((str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl"), "-m", missing_model), "does not exist"),
        ((str(source), "-o", str(tmp_path), "-m", missing_model), f"--output {tmp_path} is a directory"),
        ((str(source), "-o", str(tmp_path / "o.jsonl"), "--max-batch", "0"), "--max-batch must be a positive"),
        ((str(source), "-o", str(tmp_path / "o.jsonl"), "--max-tokens", "0"), "--max-tokens must be a positive"),
        ((str(source), "-o", str(tmp_path / "o.jsonl"), "--prefix-cache-mb", "-1"), "--prefix-cache-mb must be"),
        ((str(nan), "-o", str(tmp_path / "o.jsonl"), "-m", missing_model), "nan.jsonl:2: not JSON (NaN is not"),
    ]:
        result = invoke(*args)
        assert result.exit_code == 1, args
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


@pytest.mark.parametrize("text", ["my important notes\n", '{"custom_id": "a", "prompt": "an input file"}\n'])
def test_cli_refuses_an_output_that_is_not_batch_output_before_loading_the_model(tmp_path: Path, text: str) -> None:
    source = write_lines(tmp_path / "in.jsonl", {"prompt": "x"})
    notes = tmp_path / "notes.txt"
    notes.write_text(text)
    result = invoke(str(source), "-o", str(notes), "-m", str(tmp_path / "no-model"))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "notes.txt:1 is not a batch output line" in result.stderr
    assert notes.read_text() == text


def test_cli_refuses_a_read_only_output_before_loading_the_model(tmp_path: Path, read_only_file: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", {"prompt": "x"})
    result = invoke(str(source), "-o", str(read_only_file), "-m", str(tmp_path / "no-model"))
    assert result.exit_code == 1
    assert result.stderr == f"error: --output {read_only_file} exists and is not writable (read-only)\n", result.stderr


def test_cli_refuses_to_resume_from_a_changed_bare_request(tmp_path: Path) -> None:
    out = tmp_path / "res.jsonl"
    first = write_lines(tmp_path / "v1.jsonl", {"prompt": "hello", "max_tokens": 2})
    assert invoke(str(first), "-o", str(out), "--dtype", "float32").exit_code == 0
    before = out.read_text()
    second = write_lines(tmp_path / "v2.jsonl", {"prompt": "goodbye", "max_tokens": 2})  # as many lines
    result = invoke(str(second), "-o", str(out), "-m", str(tmp_path / "no-model"))
    assert result.exit_code == 1, result.stderr  # was: "all 1 requests are already in res.jsonl"
    assert result.stderr.count("\n") == 1 and "which the input does not have" in result.stderr
    assert out.read_text() == before


def test_cli_interrupted_says_how_to_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import looplm.server.offline as offline

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(offline, "run_batch", interrupted)
    source = write_lines(tmp_path / "in.jsonl", {"prompt": "x"})
    result = invoke(str(source), "-o", str(tmp_path / "o.jsonl"))
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "run the same command again" in result.stderr
