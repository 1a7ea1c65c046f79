"""Tests for the `looplm` command line (looplm.cli) and the text layer under it (looplm.text).

Most runs go through typer's CliRunner in-process; a few real `python -m looplm` subprocesses
prove the exit codes and that errors never print a traceback. Everything runs on the embedded
tiny random model (created once in a temporary LOOPLM_HOME) and the ouro-tiny fixture.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import looplm
from looplm.cli import app
from looplm.errors import GenerationError
from looplm.text import ReasoningStream, TextChunk, _find_stop, _stop_prefix_len, stream_text

OURO_TINY = Path("/work/shared/fixtures/ouro-tiny")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def looplm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private LOOPLM_HOME with the default model written once; one torch thread (tiny model)."""
    home = tmp_path_factory.mktemp("looplm-home")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOPLM_HOME", str(home))
        from looplm.default_model import default_model_dir

        default_model_dir()
        torch.set_num_threads(1)
        yield home
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def default_model() -> looplm.models.ouro.OuroForCausalLM:
    return looplm.load(None, dtype="float32")


def invoke(*args: str, input: str | None = None):  # noqa: A002, ANN201
    return CliRunner().invoke(app, list(args), input=input)


def run_module(*args: str, **kwargs) -> subprocess.Popen:  # noqa: ANN003
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "looplm", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def assert_one_line_error(result, *needles: str) -> None:  # noqa: ANN001
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]


# -- generate -----------------------------------------------------------------------------------


def test_generate_streams_text_and_timings() -> None:
    result = invoke("generate", "Hello", "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    timings = re.search(r"(\d+) new tokens?, [\d.]+ tok/s .* finish: (\w+)", result.stderr)
    assert timings, result.stderr
    new_tokens, finish = int(timings.group(1)), timings.group(2)  # an eos may come before the 8th token
    assert (new_tokens, finish) == (8, "length") or (new_tokens < 8 and finish == "stop"), result.stderr
    one = invoke("generate", "Hello", "--max-new-tokens", "1")
    assert re.search(r"\b1 new token, ", one.stderr), one.stderr


def test_generate_json_is_greedy_and_deterministic(default_model) -> None:  # noqa: ANN001
    # The embedded model samples by default (its generation_config.json); --temperature 0 is greedy.
    runs = [json.loads(invoke("generate", "Hello", "--max-new-tokens", "12", "--json", "--temperature", "0").stdout)
            for _ in range(2)]
    first = runs[0]
    assert first["finish_reason"] == "length" and len(first["new_ids"]) == 12
    assert first["prompt_ids"] == default_model.tokenizer.encode("Hello")
    assert first["usage"] == {"prompt_tokens": len(first["prompt_ids"]), "new_tokens": 12}
    assert set(first["timings"]) == {"setup_s", "prefill_s", "decode_s", "decode_tok_s"}
    assert first["decoder"] == ("graph" if torch.cuda.is_available() else "dynamic")  # --decoder auto
    assert 1 <= first["mean_exit_step"] <= default_model.config.total_ut_steps
    assert first["text"] == default_model.tokenizer.decode(first["new_ids"])
    assert runs[1]["new_ids"] == first["new_ids"] and runs[1]["text"] == first["text"]
    sampled = [json.loads(invoke("generate", "Hello", "--max-new-tokens", "12", "--json", "--seed", str(seed)).stdout)
               ["new_ids"] for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible
    assert sampled[0] != sampled[2]  # and different seeds sample differently


def test_generate_penalty_options_reach_the_library(default_model) -> None:  # noqa: ANN001
    args = ["generate", "Hello", "--max-new-tokens", "16", "--json", "--temperature", "0", "--dtype", "float32"]
    penalised = json.loads(invoke(*args, "--frequency-penalty", "1.5", "--presence-penalty", "0.5").stdout)
    ids = default_model.tokenizer.encode("Hello")
    expected = default_model.generate(ids, 16, frequency_penalty=1.5, presence_penalty=0.5)[0]
    assert penalised["new_ids"] == expected[: len(penalised["new_ids"])]
    assert penalised["new_ids"] != json.loads(invoke(*args).stdout)["new_ids"]
    assert_one_line_error(invoke(*args, "--presence-penalty", "2.5"), "presence_penalty must be in [-2, 2]")
    repeated = json.loads(invoke(*args, "--repetition-penalty", "1.3").stdout)["new_ids"]
    expected = default_model.generate(ids, 16, repetition_penalty=1.3)[0]
    assert repeated == expected[: len(repeated)]
    assert_one_line_error(invoke(*args, "--min-p", "-0.1"), "min_p must be in [0, 1]")
    assert_one_line_error(invoke(*args, "--temperature", "nan"), "temperature must be a finite number >= 0, got nan")


def test_generation_config_sampling_defaults_reach_the_cli(tmp_path: Path, default_model) -> None:  # noqa: ANN001
    import shutil

    from looplm.default_model import default_model_dir

    shutil.copytree(default_model_dir(), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.3}))
    args = ["generate", "Hello", "--max-new-tokens", "16", "--json", "--temperature", "0", "--dtype", "float32"]
    from_config = json.loads(invoke(*args, "-m", str(tmp_path / "m")).stdout)["new_ids"]
    assert from_config == json.loads(invoke(*args, "--repetition-penalty", "1.3").stdout)["new_ids"]
    assert from_config != json.loads(invoke(*args).stdout)["new_ids"]


def test_generate_json_reports_exit_steps_and_kv_mode(default_model) -> None:  # noqa: ANN001
    args = ["generate", "Hello", "--max-new-tokens", "10", "--json", "--exit-policy", "gate", "--exit-threshold",
            "0.5", "--skip-compute"]
    full = json.loads(invoke(*args).stdout)
    shared = json.loads(invoke(*args, "--kv-mode", "shared").stdout)
    assert len(full["steps_per_token"]) == 10
    assert all(1 <= n <= 4 for n in full["steps_per_token"])
    assert full["mean_steps"] == sum(full["steps_per_token"]) / 10
    assert full["kv_mode"] == "full" and shared["kv_mode"] == "shared"
    assert full["kv_bytes_per_token"] == 4 * shared["kv_bytes_per_token"]


def test_generate_seed_is_reproducible() -> None:
    def sample(seed: str) -> list[int]:
        args = ["generate", "Hello", "--max-new-tokens", "16", "--temperature", "1.0", "--json", "--seed", seed]
        return json.loads(invoke(*args).stdout)["new_ids"]

    assert sample("7") == sample("7")
    assert sample("7") != sample("8")


def test_generate_chat_wraps_prompt_in_template(default_model) -> None:  # noqa: ANN001
    data = json.loads(invoke("generate", "hi", "--chat", "--max-new-tokens", "2", "--json").stdout)
    rendered = default_model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert data["prompt_ids"] == default_model.tokenizer.encode(rendered)


def test_stop_string_is_cut_and_held_back(default_model) -> None:  # noqa: ANN001
    full = "".join(c.text for c in stream_text(default_model, "The", max_new_tokens=24))
    # A two-character printable stop string spans two byte tokens, so its first half is held back.
    k = next(i for i in range(1, len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].isprintable())
    stop = full[k : k + 2]
    chunks = list(stream_text(default_model, "The", max_new_tokens=24, stop=[stop, "never-seen"]))
    text = "".join(c.text for c in chunks)
    assert text == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])
    assert len(chunks[-1].token_ids) < 24
    result = invoke("generate", "The", "--max-new-tokens", "24", "--stop", stop, "--json", "--temperature", "0")
    assert json.loads(result.stdout)["text"] == text


def test_static_decoder_gives_the_dynamic_text_with_stop_strings(default_model) -> None:  # noqa: ANN001
    """`--decoder eager` (the static-shape step, what a GPU replays as a CUDA graph) streams
    the same greedy text as the dynamic step, and cuts it at the same stop string."""
    args = ["generate", "The", "--max-new-tokens", "24", "--json", "--temperature", "0", "--device", "cpu"]
    dynamic = json.loads(invoke(*args, "--decoder", "dynamic").stdout)
    static = json.loads(invoke(*args, "--decoder", "eager").stdout)
    assert static["decoder"] == "eager" and dynamic["decoder"] == "dynamic"
    assert static["new_ids"] == dynamic["new_ids"] and static["text"] == dynamic["text"]
    assert static["steps_per_token"] == dynamic["steps_per_token"]
    assert static["timings"]["setup_s"] > 0 and dynamic["timings"]["setup_s"] == 0
    stop = dynamic["text"][len(dynamic["text"]) // 2 :][:3]
    cut = [json.loads(invoke(*args, "--decoder", name, "--stop", stop).stdout) for name in ("dynamic", "eager")]
    assert cut[0]["finish_reason"] == cut[1]["finish_reason"] == "stop"
    assert cut[1]["text"] == cut[0]["text"] == dynamic["text"][: dynamic["text"].index(stop)]
    assert cut[1]["new_ids"] == cut[0]["new_ids"]


def test_speculative_decoding_gives_the_same_text_and_reports_acceptance(default_model) -> None:  # noqa: ANN001
    """`--draft-steps 3`: the same greedy text, exit steps and stop-string cut (fp32), and the
    JSON says how many drafts were accepted; an impossible draft is a one-line error."""
    args = ["generate", "ROMEO:", "--max-new-tokens", "32", "--json", "--temperature", "0", "--dtype", "float32",
            "--device", "cpu"]
    normal = json.loads(invoke(*args).stdout)
    spec = json.loads(invoke(*args, "--draft-steps", "3", "--draft-tokens", "5").stdout)
    assert spec["new_ids"] == normal["new_ids"] and spec["steps_per_token"] == normal["steps_per_token"]
    assert normal["speculative"] is None
    drafts = spec["speculative"]
    # 5 drafts a round, fewer only where the budget has fewer tokens left
    assert drafts["draft_steps"] == 3 and drafts["rounds"] <= drafts["proposed"] <= 5 * drafts["rounds"]
    assert drafts["accepted"] <= 31
    assert 0 < drafts["accepted"] <= drafts["proposed"] and drafts["acceptance"] == drafts["accepted"] / drafts["proposed"]
    stop = normal["text"][len(normal["text"]) // 2 :][:3]
    cut = json.loads(invoke(*args, "--draft-steps", "2", "--stop", stop).stdout)
    assert cut["finish_reason"] == "stop" and cut["text"] == normal["text"][: normal["text"].index(stop)]
    bad = invoke("generate", "hi", "--draft-steps", "4", "--max-new-tokens", "2")
    assert bad.exit_code == 1 and "draft_steps must be an integer from 1 to 3" in bad.output
    assert "Traceback" not in bad.output


def test_generate_system_and_think_use_the_chat_template_and_json_splits_reasoning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple] = []

    def fake_stream(model, request, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append((request, kwargs.get("enable_thinking")))
        from looplm.generate import GenerationStats

        yield TextChunk("weighing it\n</think>\n\nfinal answer", finish_reason="stop", stats=GenerationStats())

    monkeypatch.setattr("looplm.cli.generate.stream_text", fake_stream)
    result = invoke("generate", "q", "--system", "be brief", "--think", "--json")
    assert result.exit_code == 0, result.output
    assert seen[-1] == ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}], True)
    data = json.loads(result.stdout)
    assert (data["reasoning"], data["answer"]) == ("weighing it", "final answer")
    assert invoke("generate", "q", "--json").exit_code == 0
    assert seen[-1] == ("q", False)  # plain text prompt: no template, no split
    assert json.loads(invoke("generate", "q", "--json").stdout)["reasoning"] is None


@pytest.mark.parametrize(("opens", "think", "expected"), [
    (True, False, ("Let me compute 2+2 and", "")),  # a Thinking template opens the block by itself: cut off inside it
    (False, True, (None, "The answer is 4.")),  # --think on a template that ignores it: a plain reply
])
def test_generate_json_splits_by_the_prompt_as_rendered(monkeypatch: pytest.MonkeyPatch, opens: bool, think: bool,
                                                         expected: tuple) -> None:
    from looplm.generate import GenerationStats

    reply = expected[0] or expected[1]

    def fake_stream(model, request, **kwargs):  # noqa: ANN001, ANN003, ANN202
        yield TextChunk(reply, finish_reason="length", stats=GenerationStats())

    monkeypatch.setattr("looplm.cli.generate.stream_text", fake_stream)
    ending = "<|im_start|>assistant\n<think>\n" if opens else "<|im_start|>assistant\n"
    monkeypatch.setattr("looplm.cli.generate.render_prompt", lambda model, request, thinking: "...\n" + ending)
    result = invoke("generate", "What is 2+2?", "--chat", "--json", *(["--think"] if think else []))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["reasoning"], data["answer"]) == expected
    assert ("does not open a <think> block" in result.stderr) == (think and not opens)


def test_compiling_a_model_on_the_cpu_kernels_is_a_clear_error() -> None:
    """The default bf16 CPU model runs looplm's C++ kernels, which Dynamo cannot trace."""
    result = invoke("generate", "hi", "--decoder", "compile", "--max-new-tokens", "2", "--device", "cpu")
    assert result.exit_code == 1 and "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: torch.compile could not compile") and "kernels='torch'" in last


def test_unexpected_exception_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("a bug")

    monkeypatch.setattr("looplm.cli.generate.stream_text", broken)
    result = invoke("generate", "Hello")
    assert isinstance(result.exception, RuntimeError)  # not turned into an "error:" line
    assert "error:" not in result.stderr


# -- errors -------------------------------------------------------------------------------------


def test_missing_model_is_one_line_error_in_a_real_process() -> None:
    proc = run_module("generate", "hi", "-m", "/nonexistent")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert out == b""
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "/nonexistent" in lines[0]
    assert b"Traceback" not in err


@pytest.mark.parametrize("module", ["looplm.exit_quality", "looplm.eval.lm_eval_adapter"])
def test_python_m_entry_points_print_a_missing_model_as_an_error_line(module: str) -> None:
    if module.endswith("lm_eval_adapter"):
        pytest.importorskip("lm_eval")
        args = ["--model_args", "pretrained=/nonexistent", "--tasks", "hellaswag", "--device", "cpu"]
    else:
        args = ["-m", "/nonexistent"]
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
                          check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: /nonexistent: no such file or directory"


def run_looplm(*args: str, **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
    return subprocess.run([sys.executable, "-m", "looplm", *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          stderr=subprocess.PIPE, timeout=300, check=False, **kwargs)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_that_cannot_be_written_is_one_line_in_a_real_process() -> None:
    """`looplm generate hi > /dev/full` (a full disk) ended in an OSError traceback."""
    with open("/dev/full", "wb") as full:
        proc = run_looplm("generate", "hi", "--max-new-tokens", "2", stdout=full)
    assert proc.returncode == 1 and proc.stderr == b"error: cannot write the output (No space left on device)\n"
    reader = subprocess.Popen([sys.executable, "-m", "looplm", "generate", "hi", "--max-new-tokens", "40"], cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # as `| head` does once it has its lines: a closed pipe ends the command quietly
    assert reader.communicate(timeout=300)[1] == b"" and reader.returncode == 1


def test_output_buffered_until_exit_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    """Block-buffered stdout (a file, without PYTHONUNBUFFERED) is written at the exit, where
    Python's own flush failed with "Exception ignored ... OSError" and exit code 120. A file-size
    limit fails the write as a full disk does."""
    resource = pytest.importorskip("resource")

    def small_files() -> None:  # in the child: files stop at 5 bytes, with EFBIG rather than a signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (5, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    with open(tmp_path / "out.txt", "wb") as out:
        proc = subprocess.run([sys.executable, "-m", "looplm", "--version"], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.PIPE, preexec_fn=small_files, timeout=300, check=False)
    assert proc.returncode == 1 and proc.stderr == b"error: cannot write the output (File too large)\n"


def test_ctrl_c_exits_130_quietly_in_a_real_process(make_checkpoint) -> None:  # noqa: ANN001
    # a random model: the embedded one may end its answer (eos) before the signal arrives
    proc = run_module("generate", "hi", "-m", str(make_checkpoint(max_position_embeddings=8192)),
                      "--max-new-tokens", "4000")
    proc.stdout.read(1)  # generation is under way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip() == b""


def test_corrupt_config_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "ouro",\n  oops')
    assert_one_line_error(invoke("generate", "hi", "-m", str(tmp_path)), "config.json", "invalid JSON")
    assert_one_line_error(invoke("inspect", "-m", str(tmp_path)), "config.json")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--top-p", "0"], "top_p"),
        (["--exit-threshold", "1.5"], "exit-threshold"),
        (["--exit-policy", "last", "--exit-threshold", "0.5"], "exit_policy 'last' reads no threshold"),
        (["--exit-policy", "kl", "--exit-threshold", "-1"], "KL divergence, >= 0"),
        (["--steps", "9"], "steps"),
        (["--dtype", "int3"], "dtype"),
        (["--stop", ""], "stop"),
        (["--exit-policy", "sometimes"], "exit-policy"),
        (["--kv-mode", "half"], "kv-mode"),
        (["--decoder", "fast"], "--decoder"),
        (["--device", "cpu", "--decoder", "graph"], "CUDA"),
        (["--device", "tpu"], "device 'tpu' is not supported"),
        (["--decoder", "eager", "--kv-mode", "shared"], "kv_mode='shared'"),
        (["--decoder", "compile", "--skip-compute"], "skip_compute"),
        (["--draft-steps", "0"], "--draft-steps"),
        (["--draft-steps", "1", "--draft-tokens", "0"], "--draft-tokens"),
        (["--draft-steps", "1", "--draft-confidence", "1"], "--draft-confidence"),
        (["--draft-steps", "1", "--kv-mode", "shared"], "full KV cache"),
        (["--draft-tokens", "4"], "give --draft-steps too"),  # ignored before
        (["--group-size", "64"], "--group-size applies with --quant int4"),  # likewise
        (["--quant", "int8", "--group-size", "64"], "--group-size applies with --quant int4"),
        (["--draft-confidence", "0.5"], "give --draft-steps too"),
    ],
)
def test_bad_options_are_one_line_errors(args: list[str], needle: str) -> None:
    assert_one_line_error(invoke("generate", "hi", *args), needle)


def test_serve_refuses_a_bad_or_busy_address_before_loading() -> None:
    import socket

    assert_one_line_error(invoke("serve", "--port", "70000"), "--port must be from 1 to 65535")
    assert_one_line_error(invoke("serve", "--threads", "0"), "--threads must be a positive integer")
    assert_one_line_error(invoke("serve", "--prefill-chunk", "0"), "--prefill-chunk must be a positive integer")
    assert_one_line_error(invoke("serve", "--max-batch", "0"), "--max-batch must be a positive integer")
    assert_one_line_error(invoke("serve", "--max-queue", "0"), "--max-queue must be a positive integer")
    assert_one_line_error(invoke("serve", "--prefix-cache-mb", "-1"), "--prefix-cache-mb must be 0 or more")
    assert_one_line_error(invoke("serve", "--host", "no-such-host.invalid"), "--host 'no-such-host.invalid'")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(invoke("serve", "--port", str(port), "-m", "/nonexistent/model"),
                              f"cannot listen on 127.0.0.1:{port}")  # the address is checked before the model


def test_model_without_tokenizer_cannot_take_text(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"prompt": "hi"}\n')
    batch = ["batch", str(requests), "-o", str(tmp_path / "out.jsonl")]
    with monkeypatch.context() as patched:  # the text commands refuse before reading the weights
        patched.setattr(looplm, "load", lambda *args, **kwargs: pytest.fail("weights read first"))
        for command in (["generate", "hi"], ["chat"], ["eval", "arithmetic", "--n", "2"], batch):
            assert_one_line_error(invoke(*command, "-m", str(OURO_TINY)), "has no tokenizer.json")
    model = looplm.load(OURO_TINY)
    with pytest.raises(GenerationError, match="no tokenizer"):
        next(stream_text(model, "hi", max_new_tokens=1))


def test_library_warnings_are_one_line() -> None:
    result = invoke("generate", "hi", "--steps", "6", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert "UserWarning" not in result.stderr and "warnings.warn" not in result.stderr
    assert any(line.startswith("warning: steps=6 is outside") for line in result.stderr.splitlines())


# -- chat ---------------------------------------------------------------------------------------


def test_chat_with_piped_input() -> None:
    result = invoke("chat", "--max-new-tokens", "6", input="hi\n/exit\nnever sent\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() and "Traceback" not in result.output
    result = invoke("chat", "--max-new-tokens", "4", "--system", "be brief", input="hi\n/reset\n/nope\nagain\n")
    assert result.exit_code == 0, result.output  # EOF ends the session
    assert "history cleared" in result.stderr and "unknown command" in result.stderr


def test_chat_saves_and_loads_a_conversation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[dict]] = []

    def fake_stream(lm, history, **kwargs):  # noqa: ANN001, ANN003, ANN202 - replies "r1", "r2", ...
        seen.append([dict(m) for m in history])
        yield TextChunk(f"r{len(seen)}", finish_reason="stop")

    monkeypatch.setattr("looplm.cli.chat.stream_text", fake_stream)
    saved = tmp_path / "conv.json"
    result = invoke("chat", "--system", "be brief", input=f"q1\n/save {saved}\nq2\n")
    assert result.exit_code == 0, result.output
    expected = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "r1"}]
    assert json.loads(saved.read_text()) == {"messages": expected}
    assert "saved 3 messages" in result.stderr

    seen.clear()
    result = invoke("chat", "--load", str(saved), input=f"q3\n/reset\nq4\n/save {saved}\n")
    assert result.exit_code == 0, result.output
    assert seen[0] == [*expected, {"role": "user", "content": "q3"}]  # the loaded conversation goes on
    assert seen[1] == [expected[0], {"role": "user", "content": "q4"}]  # /reset keeps the loaded system prompt
    assert json.loads(saved.read_text())["messages"] == [*seen[1], {"role": "assistant", "content": "r2"}]

    result = invoke("chat", input=f"q\n/save\n/save {tmp_path / 'no' / 'dir' / 'x.json'}\n")
    assert result.exit_code == 1  # piped: a failed save is a failed run
    assert "/save needs a file name" in result.stderr and "cannot write" in result.stderr
    assert "error: 2 /save commands failed" in result.stderr


def test_a_failed_save_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    """/save wrote over the file in place: on a full disk, a 52-byte conversation became a cut-off
    4096-byte one. A file-size limit fails the write the same way, without a full disk."""
    resource = pytest.importorskip("resource")
    from looplm.conversation import read_messages, write_messages

    path = tmp_path / "conv.json"
    old = [{"role": "user", "content": "hi"}]
    write_messages(path, old)
    os.chmod(path, 0o600)
    before = path.read_bytes()
    limit, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 100, hard))
    try:
        with pytest.raises(OSError):
            write_messages(path, [{"role": "user", "content": "word " * 2000}])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_bytes() == before and read_messages(path) == old
    assert [p.name for p in tmp_path.iterdir()] == ["conv.json"]  # no temporary file left behind
    write_messages(path, [*old, {"role": "assistant", "content": "hello"}])  # saving again replaces it
    assert len(read_messages(path)) == 2 and path.stat().st_mode & 0o777 == 0o600


def test_text_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python hands arguments' bytes that are not UTF-8 over as lone surrogates, and stdin's raised
    UnicodeDecodeError (a traceback; in chat, the end of the session and its later /save)."""
    def unloaded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        pytest.fail("the model loaded first")

    with monkeypatch.context() as patched:
        patched.setattr(looplm, "load", unloaded)
        assert_one_line_error(invoke("generate", "hi \udcff"), "the prompt is not valid UTF-8: byte 0xff at character 3")
        assert_one_line_error(invoke("generate", "-", input=b"caf\xe9\n"), "the prompt is not valid UTF-8: byte 0xe9")
        assert_one_line_error(invoke("generate", "hi", "--system", "s\udce9"), "--system is not valid UTF-8")
        assert_one_line_error(invoke("chat", "--system", "s\udcff"), "--system is not valid UTF-8: byte 0xff")
        assert_one_line_error(invoke("generate", "hi", "--stop", "\udcff"), "--stop is not valid UTF-8")
        conversation = tmp_path / "conv.json"
        conversation.write_text('{"messages": [{"role": "user", "content": "a\\ud800"}]}')
        assert_one_line_error(invoke("chat", "--load", str(conversation)), "message 0 holds a lone surrogate")

    saved = tmp_path / "saved.json"
    result = invoke("chat", "--max-new-tokens", "3", input=f"hi \xff\nsecond\n/save {saved}\n".encode("latin-1"))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: the message is not valid UTF-8: byte 0xff at character 3; convert it to UTF-8 first "
                      "(e.g. iconv -f latin1 -t utf-8)", "error: 1 of 2 messages got no reply"]
    assert [m["content"] for m in json.loads(saved.read_text())["messages"]][0] == "second"  # the chat went on


def test_chat_takes_a_message_of_several_lines_between_triple_quotes(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []

    def fake_stream(lm, history, **kwargs):  # noqa: ANN001, ANN003, ANN202
        sent.append(history[-1]["content"])
        yield TextChunk("ok", finish_reason="stop")

    monkeypatch.setattr("looplm.cli.chat.stream_text", fake_stream)
    typed = '"""def f(x):\n    return x\n"""\n"""/etc/hosts is a file"""\nplain\n"""\nunfinished\n  at the end'
    result = invoke("chat", input=typed)
    assert result.exit_code == 0, result.output
    assert sent == ["def f(x):\n    return x", "/etc/hosts is a file", "plain", "unfinished\n  at the end"]
    assert "unknown command" not in result.stderr  # fenced text is never a command


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    ("{not json", "is not a readable JSON file"),
    ('{"turns": []}', 'expected {"messages": [...]} or a list of messages'),
    ('[{"role": "bot", "content": "x"}]', "message 0 is not a"),
    ('[{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]', "only the first message may be"),
])
def test_chat_load_refuses_a_bad_file_before_the_model_loads(tmp_path: Path, content: str | None,
                                                              message: str) -> None:
    path = tmp_path / "conv.json"
    if content is not None:
        path.write_text(content)
    result = invoke("chat", "--load", str(path), "-m", str(tmp_path / "no-model"), input="hi\n")
    assert_one_line_error(result, message)


def test_more_threads_than_cpus_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from looplm import cpu_load

    monkeypatch.setattr(cpu_load, "allowed_cpus", lambda: {0, 1})
    before = __import__("torch").get_num_threads()
    try:
        result = invoke("generate", "hi", "--threads", "64", "--max-new-tokens", "1")
    finally:
        __import__("torch").set_num_threads(before)
    assert result.exit_code == 0 and "--threads 64 is more than the 2 CPUs this process may use" in result.stderr


def test_chat_refuses_a_reply_budget_that_leaves_no_room_for_a_message() -> None:
    """Every message failed, each with a hint (/reset) that could not help."""
    assert_one_line_error(invoke("chat", "--max-new-tokens", "5000", input="hi\n"),
                          "--max-new-tokens 5000 leaves no room for a message in the model's context of 4096 tokens")


def test_chat_load_with_its_own_system_message_refuses_system(tmp_path: Path) -> None:
    path = tmp_path / "conv.json"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "a"}]}))
    assert_one_line_error(invoke("chat", "--load", str(path), "--system", "b"), "has its own system message")


def test_chat_with_a_broken_template_stops_before_reading_input(tmp_path: Path) -> None:
    import shutil

    from looplm.default_model import default_model_dir

    model_dir = tmp_path / "model"
    shutil.copytree(default_model_dir(), model_dir)
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}"
    config_file.write_text(json.dumps(config))
    result = invoke("chat", "-m", str(model_dir), input="hi\nagain\n")
    assert_one_line_error(result, "chat template does not parse")
    assert result.stdout == ""


def test_piped_chat_exits_1_when_a_message_got_no_reply() -> None:
    too_long = " ".join(["word"] * 5000)  # more tokens than the embedded model's 4096 positions
    result = invoke("chat", "--max-new-tokens", "4", input=f"hi\n{too_long}\nagain\n")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "context" in errors[0], result.stderr
    assert errors[1] == "error: 1 of 3 messages got no reply"
    assert result.stdout.strip() and "Traceback" not in result.output  # the other two were answered


def test_chat_drops_the_oldest_exchanges_to_fit_the_context(monkeypatch: pytest.MonkeyPatch,
                                                             default_model) -> None:  # noqa: ANN001
    seen: list[list[dict]] = []

    def fake_stream(model, messages, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append([dict(m) for m in messages])
        yield TextChunk("fine " * 10, finish_reason="stop")

    monkeypatch.setattr("looplm.cli.chat.stream_text", fake_stream)
    message = " ".join(["word"] * 30)
    # 4096 positions - 4000 for the reply leave 96 for the prompt: about two exchanges fit
    result = invoke("chat", "--max-new-tokens", "4000", "--system", "be brief", input=f"{message}\n" * 5)
    assert result.exit_code == 0, result.output
    assert "oldest turn" in result.stderr and "error" not in result.stderr
    assert all(turn[0] == {"role": "system", "content": "be brief"} for turn in seen)  # the system prompt stays
    tok = default_model.tokenizer
    for turn in seen:  # every prompt fits beside the reply's budget
        assert len(tok.encode(tok.apply_chat_template(turn))) + 4000 <= default_model.config.max_position_embeddings
    assert len(seen[-1]) < 1 + 2 * 5 - 1  # without dropping, the fifth prompt would hold 9 messages
    assert seen[-1][-1] == {"role": "user", "content": message}
    assert all(m["role"] != "assistant" or m["content"] for m in seen[-1])


def test_after_dropping_turns_the_next_turns_keep_the_history_in_place(default_model) -> None:  # noqa: ANN001
    """fit_context drops down to 3/4 of the prompt budget, so the following short turns fit without
    another drop, and each prompt starts with the one before (its cached K/V stays usable)."""
    from looplm.conversation import fit_context

    tok, limit = default_model.tokenizer, default_model.config.max_position_embeddings - 3800

    def length(messages: list[dict]) -> int:
        return len(tok.encode(tok.apply_chat_template(messages)))

    exchange = [{"role": "user", "content": "word " * 12}, {"role": "assistant", "content": "fine " * 12}]
    history = [{"role": "system", "content": "be brief"}] + exchange * 12 + [{"role": "user", "content": "next"}]
    assert length(history) > limit
    assert fit_context(default_model, history, 1, 3800) > 0
    assert length(history) <= limit - limit // 4 and history[0]["role"] == "system"
    for _ in range(2):  # two more short exchanges: no drop, the history only grows at its end
        before = [dict(m) for m in history]
        history += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
        assert fit_context(default_model, history, 1, 3800) == 0 and history[: len(before)] == before


def test_a_chat_message_that_gets_no_reply_keeps_every_earlier_turn(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """Turns left the history to make room for a message that then failed, and never came back."""
    saved = tmp_path / "conv.json"
    too_long = " ".join(["word"] * 5000)  # too long even alone: nothing is dropped for it
    result = invoke("chat", "--max-new-tokens", "4", input=f"hi\n{too_long}\nafter\n/save {saved}\n")
    assert result.exit_code == 1 and "context" in result.stderr, result.output
    assert "left the conversation" not in result.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hi", "after"]

    def fake_stream(model, messages, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if messages[-1]["content"].startswith("fail"):
            raise GenerationError("no reply for this one")
        yield TextChunk("fine " * 10, finish_reason="stop")

    monkeypatch.setattr("looplm.cli.chat.stream_text", fake_stream)
    message = " ".join(["word"] * 20)  # 96 positions beside a 4000-token reply: two exchanges, not three
    result = invoke("chat", "--max-new-tokens", "4000", input=f"{message}\n{message}\nfail {message}\n/save {saved}\n")
    assert result.exit_code == 1, result.output
    assert "oldest turn" in result.stderr and "no reply for this one" in result.stderr
    assert [m["role"] for m in json.loads(saved.read_text())["messages"]] == ["user", "assistant"] * 2


def test_chat_shows_reasoning_apart_and_keeps_answers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[dict]] = []

    def fake_stream(model, messages, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append([dict(m) for m in messages])
        yield TextChunk("<thi")
        yield TextChunk("nk>\nweighing it</th")
        yield TextChunk("ink>\n\nfinal answer", finish_reason="stop")

    monkeypatch.setattr("looplm.cli.chat.stream_text", fake_stream)
    result = invoke("chat", input="q1\nq2\n")
    assert result.exit_code == 0, result.output
    assert "<think>" not in result.stdout and "</think>" not in result.stdout
    assert result.stdout.index("weighing it") < result.stdout.index("final answer")
    assert "weighing it\n\nfinal answer" in result.stdout  # apart from the answer
    assert seen[1][-2:] == [{"role": "assistant", "content": "final answer"}, {"role": "user", "content": "q2"}]
    hidden = invoke("chat", "--hide-think", input="q1\n")
    assert "final answer" in hidden.stdout and "weighing it" not in hidden.stdout


def test_chat_show_steps_reports_mean_steps_and_loops_saved(default_model) -> None:  # noqa: ANN001
    """--show-steps prints one line per reply, with the numbers the library's stats give."""
    args = ["chat", "--dtype", "float32", "--max-new-tokens", "12", "--exit-policy", "gate", "--exit-threshold", "0.5",
            "--temperature", "0"]  # greedy, like the library call below (the embedded model samples by default)
    skipping = invoke(*args, "--skip-compute", "--show-steps", input="hi\nagain\n")
    assert skipping.exit_code == 0, skipping.output
    lines = [line for line in skipping.stderr.splitlines() if line.startswith("mean steps per token")]
    assert len(lines) == 2  # one per reply
    chunks = list(stream_text(default_model, [{"role": "user", "content": "hi"}], max_new_tokens=12,
                              exit_policy="gate", exit_threshold=0.5, skip_compute=True))
    stats = chunks[-1].stats
    assert 0 < stats.loops_saved < stats.loops_possible  # this gate exits early on some tokens, not all
    assert lines[0].startswith(f"mean steps per token {stats.mean_steps:.2f} of 4 | "
                               f"loops saved {stats.loops_saved} of {stats.loops_possible} ")
    no_skip = invoke(*args, "--show-steps", input="hi\n")
    assert "loops saved 0 (every loop ran" in no_skip.stderr
    assert "mean steps per token" not in invoke(*args, input="hi\n").stderr  # off by default


def test_loops_saved_counts_decoded_tokens_only() -> None:
    from looplm.cli.chat import steps_line
    from looplm.generate import GenerationStats

    stats = GenerationStats(steps_per_token=[[2, 1, 2, 4], [4, 3]], steps_available=4, skipping=True)
    # the first token of each row came from the full-depth prefill: (3 + 2 + 0) + 1 saved of 4 * 4
    assert (stats.loops_saved, stats.loops_possible) == (6, 16)
    assert steps_line(stats).startswith("mean steps per token 2.67 of 4 | loops saved 6 of 16 (38%")
    stats.skipping = False
    assert stats.loops_saved == 0 and "loops saved 0" in steps_line(stats)
    stats.prompt_tokens, stats.cached_tokens = 236, 215
    assert steps_line(stats).endswith(" | prompt 236 tokens, 215 kept from the last turn")


# -- inspect ------------------------------------------------------------------------------------


def test_inspect_default_model() -> None:
    result = invoke("inspect")
    assert result.exit_code == 0, result.output
    for needle in ("num_hidden_layers", "KV bytes per token", "parameters", "<|endoftext|>", "model.embed_tokens.weight"):
        assert needle in result.stdout
    assert "49 tensors in all" in result.stdout  # the packaged tiny-ouro (4 layers); first 20 shown by default


def test_inspect_ouro_tiny_numbers() -> None:
    result = invoke("inspect", "-m", str(OURO_TINY))
    assert result.exit_code == 0, result.output
    assert "num_hidden_layers" in result.stdout and "2,048" in result.stdout
    data = json.loads(invoke("inspect", "-m", str(OURO_TINY), "--json").stdout)
    # 2 (K and V) * 4 steps * 2 layers * 4 kv heads * 16 head_dim * 2 bytes (bf16)
    assert data["kv_bytes_per_token"] == 2 * 4 * 2 * 4 * 16 * 2 == 2048
    assert data["kv_bytes_per_token"] == looplm.load(OURO_TINY).make_cache(1, 1).nbytes()
    assert data["kv_slots"] == 8 and data["stop_ids"] == [0] and data["tokenizer"] is None
    assert data["config"]["num_hidden_layers"] == 2
    assert data["parameters"] == data["weight_bytes"]["bf16"] // 2
    # int8: the 2 layers' projections (4 x 64x64 + 3 x 176x64 each) in bytes plus an fp32 scale per
    # output row (4 x 64 + 2 x 176 + 64 per layer), the rest in bf16; int4 at group 128 does not fit 64 inputs
    projections = 2 * (4 * 64 * 64 + 3 * 176 * 64)
    assert data["weight_bytes"]["int8"] == projections + 4 * 2 * 672 + 2 * (data["parameters"] - projections)
    assert data["weight_bytes"]["int4"] is None
    assert len(data["tensors"]) == 27 and data["tensors"][0]["dtype"] == "bfloat16"
    steps2 = json.loads(invoke("inspect", "-m", str(OURO_TINY), "--json", "--steps", "2", "--no-tensors").stdout)
    assert steps2["kv_bytes_per_token"] == 1024 and steps2["kv_slots"] == 4 and steps2["tensors"] == []


def test_inspect_says_which_config_values_are_defaults(tmp_path: Path) -> None:
    """A config.json without total_ut_steps or early_exit_threshold loads with the class defaults
    (4 and 1.0, spec 1.1); inspect says they were not in the file."""
    from conftest import small_config

    from looplm.default_model import write_random_checkpoint

    write_random_checkpoint(tmp_path, small_config(), seed=0)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("total_ut_steps", "early_exit_threshold"):
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    data = json.loads(invoke("inspect", "-m", str(tmp_path), "--json", "--no-tensors").stdout)
    assert {"total_ut_steps", "early_exit_threshold"} <= set(data["config_defaults"])
    assert data["config"]["total_ut_steps"] == 4 and data["config"]["early_exit_threshold"] == 1.0
    text = invoke("inspect", "-m", str(tmp_path), "--no-tensors").stdout
    assert "(default: not in config.json)" in text
    assert json.loads(invoke("inspect", "--json", "--no-tensors").stdout)["config_defaults"] == []  # embedded


@pytest.mark.parametrize("bits", [8, 4])
def test_inspect_estimates_the_quantized_size_and_lists_every_stored_tensor(tmp_path: Path, bits: int) -> None:
    """The estimate counted every parameter at 1 or 0.5 bytes (embeddings too, scales not); the
    tensor list left out the quantized layers' buffers."""
    out = tmp_path / f"q{bits}"
    assert invoke("quantize", "--bits", str(bits), "-o", str(out)).exit_code == 0
    estimate = json.loads(invoke("inspect", "--json").stdout)["weight_bytes"][f"int{bits}"]
    stored = (out / "model.safetensors").stat().st_size
    assert 0 < stored - estimate < 0.01 * stored  # the file adds only its JSON header
    data = json.loads(invoke("inspect", "-m", str(out), "--json").stdout)
    names = [t["name"] for t in data["tensors"]]
    # 49 float tensors before; each of the 28 projections (4 layers x 7) now holds 2 (int8: weights and
    # scales) or 3 (int4: weights, scales, minimums) buffers in the layout the kernels read
    assert len(names) == 49 - 28 + 28 * (2 if bits == 8 else 3)
    assert sum(name.startswith("model.layers.3.mlp.down_proj.") for name in names) == (2 if bits == 8 else 3)
    group = " g128" if bits == 4 else ""  # int8 has no groups
    assert f"(int{bits}{group} layers, bfloat16, cpu)" in invoke("inspect", "-m", str(out), "--no-tensors").stdout


@pytest.mark.parametrize(("args", "needle"), [
    (["--shapes", ","], "--shapes names no shape"),  # measured the bandwidth, then an empty table
    (["--shapes", "tiny", "--rows-tiny", "int4", "--group-size", "7"], "int4 group size must be one of"),
    (["--shapes", "tiny", "--rows-tiny", "int4"], "--group-size 128 does not divide the tiny shape's layer widths"),
    (["--exit", "--shape", "tiny", "--repeats", "-1"], "--repeats must be a positive integer"),  # a traceback
    (["--exit", "--shape", "tiny", "--new-tokens", "0"], "--new-tokens must be a positive integer"),
    (["--exit", "--shape", "tiny", "--gate-threshold", "7"], r"exit_threshold must be in (0, 1], got 7.0"),
    (["--speculative", "--shape", "bogus"], "unknown shape 'bogus'"),  # after minutes of part 1
    (["--speculative", "--threads", "-1"], "--threads must be a positive integer"),
])
def test_bench_options_are_checked_before_any_work(args: list[str], needle: str) -> None:
    proc = run_module("bench", *args, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and needle in err and "Traceback" not in err, err
    assert out == ""  # nothing measured, nothing printed


# -- looplm.text helpers ------------------------------------------------------------------------


def test_stop_helpers() -> None:
    assert _find_stop("abcSTOPxSTO", ["STOP", "cS"]) == 2
    assert _find_stop("abc", ["x"]) is None
    assert _stop_prefix_len("hello <|im", ["<|im_end|>"]) == 4
    assert _stop_prefix_len("hello", ["<|im_end|>"]) == 0
    assert _stop_prefix_len("ab", ["b", "abc"]) == 2  # a complete stop is found by _find_stop, not held


def test_reasoning_stream_handles_split_tags() -> None:
    stream = ReasoningStream()
    pieces = []
    for part in ["pre <th", "ink>deep ", "thought</thi", "nk> answer <", "b>"]:
        pieces += stream.feed(part)
    pieces += stream.flush()
    reasoning = "".join(t for r, t in pieces if r)
    answer = "".join(t for r, t in pieces if not r)
    assert reasoning == "deep thought" and answer == "pre  answer <b>"
    opened = ReasoningStream(in_reasoning=True)
    assert opened.feed("a</think>b") == [(True, "a"), (False, "b")]


@pytest.mark.parametrize("parts", [["<think>\nTwo and two.</think>4"], ["\n<th", "ink>", "\nTwo and two.</think>4"],
                                   ["", "<", "think>Two and two.", "</think>", "4"]])
def test_reasoning_stream_drops_a_think_tag_the_reply_repeats(parts: list[str]) -> None:
    """The prompt opened the block (enable_thinking) and the model opened it again: the second
    tag is a tag, not reasoning text."""
    stream = ReasoningStream(in_reasoning=True)
    pieces = [piece for part in parts for piece in stream.feed(part)] + stream.flush()
    reasoning = "".join(t for r, t in pieces if r)
    assert reasoning.strip() == "Two and two." and "".join(t for r, t in pieces if not r) == "4"
    later = ReasoningStream(in_reasoning=True)  # only at the start: later text stays as written
    assert "".join(t for _, t in later.feed("x <think> y</think>z") + later.flush()) == "x <think> yz"


def test_bench_compare_table_runs_on_the_tiny_shape(tmp_path: Path) -> None:
    proc = run_module("bench", "--shapes", "tiny", "--rows-tiny", "no-cache,bf16,int8", "--prompt-len", "8",
                      "--new-tokens", "3", "--baseline-tokens", "2", "--repeats", "2", "--turn-tokens", "1",
                      "--workdir", str(tmp_path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert "Ouro tiny shape" in out.decode() and "no-cache (reference)" in out.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    rows = result["shapes"]["tiny"]
    assert [row["key"] for row in rows] == ["no-cache", "bf16", "int8"]
    assert rows[0]["decode_vs_no-cache"] == 1.0 and rows[0]["tokens"] == 2 and rows[1]["tokens"] == 3
    assert all(row["decode_tok_s"]["n"] == 2 and row["pct_roofline"] > 0 for row in rows)
    # rounds: each repeat of each row in its own process, and a ratio per round against the same round's row
    assert all(len(row["bandwidth_samples_gb_s"]) == 2 and row["load_seconds"]["n"] == 2 for row in rows)
    paired = rows[2]["decode_vs_no-cache_paired"]
    assert rows[0]["decode_vs_no-cache_paired"]["median"] == 1.0 and paired["n"] == 2
    speeds = [[s["decode_tok_s"] for s in row["samples"]] for row in (rows[2], rows[0])]
    assert paired["min"] == pytest.approx(min(a / b for a, b in zip(*speeds)))
    assert rows[1]["kernels"]["linears"] > 0 and rows[0]["kernels"] is None  # looplm kernels vs torch ops
    assert rows[2]["layer_bytes"] < rows[1]["layer_bytes"] * 0.6  # int8 layers: about half of bf16
    # then the looplm rows (not the no-cache one) decode in turns in one process: 2 turns of 1 token
    turns = result["turns"]["tiny"]
    assert [row["key"] for row in turns] == ["bf16", "int8"]
    assert all(row["turns"] == 2 and row["ms_per_token"]["n"] == 2 and row["ms_per_token"]["min"] > 0 for row in turns)
    assert turns[0]["speedup_paired"]["median"] == 1.0 and turns[1]["reference"] == "bf16 (looplm)"
    by_turn = [a / b for a, b in zip(turns[0]["ms_per_token_by_turn"], turns[1]["ms_per_token_by_turn"])]
    assert turns[1]["speedup_paired"]["n"] == 2 and turns[1]["speedup_paired"]["min"] == pytest.approx(min(by_turn))
    assert "decode taking turns in one process" in out.decode()


def test_bench_compare_leaves_out_what_failed_and_keeps_the_rest(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """A row that fails (say, out of memory) is left out after its first failure, the other rows and
    the turns go on, the report says what failed, and the command exits non-zero after printing."""
    from looplm import bench_compare
    from looplm.errors import LooplmError

    real_child = bench_compare.run_in_child
    calls: list[str] = []

    def some_fail(flag: str, spec: dict, emulate_avx2: bool = False) -> dict:
        what = spec["variant"]["name"] if "variant" in spec else "turns"
        calls.append(what)
        if what == "int8" or (what == "turns" and len(spec["variants"]) == 1):
            raise LooplmError(f"bench {what} failed: out of memory (simulated)")
        return real_child(flag, spec, emulate_avx2)

    monkeypatch.setattr(bench_compare, "run_in_child", some_fail)
    common = ["--shapes", "tiny", "--prompt-len", "8", "--new-tokens", "3", "--baseline-tokens", "2",
              "--repeats", "2", "--turn-tokens", "1", "--workdir", str(tmp_path)]
    assert bench_compare.main([*common, "--rows-tiny", "bf16,int8,bf16-torch"]) == 1
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert calls == ["bf16 (looplm)", "int8", "bf16, torch ops", "bf16 (looplm)", "bf16, torch ops"]  # no retry
    assert [row["key"] for row in result["shapes"]["tiny"]] == ["bf16", "bf16-torch"]
    assert result["shapes"]["tiny"][1]["decode_vs_bf16_paired"]["n"] == 2
    assert "out of memory" in result["failed"]["tiny"]["int8"] and "turns" not in result  # one looplm row left
    assert "int8 row failed and is left out" in out and "part of the benchmark failed" in err

    def turns_fail(flag: str, spec: dict, emulate_avx2: bool = False) -> dict:
        if flag == "--child-turns":
            raise LooplmError("bench the rows taking turns failed: out of memory (simulated)")
        return real_child(flag, spec, emulate_avx2)

    monkeypatch.setattr(bench_compare, "run_in_child", turns_fail)  # the turns failing alone
    assert bench_compare.main([*common, "--repeats", "1", "--rows-tiny", "bf16,int8"]) == 1
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert [row["key"] for row in result["shapes"]["tiny"]] == ["bf16", "int8"]
    assert list(result["failed"]["tiny"]) == ["turns"] and "rows decoding in turns failed and is left out" in out


def test_bench_compare_interrupted_prints_the_rounds_every_row_finished(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """Ctrl-C in round 2 of 3: the table holds round 1 of every row, the next shape does not run,
    the JSON still comes out, and the exit code is 130."""
    from looplm import bench_compare

    real_child = bench_compare.run_in_child
    calls: list[str] = []

    def interrupt_in_round_two(flag: str, spec: dict, emulate_avx2: bool = False) -> dict:
        calls.append(spec["variant"]["name"])
        if len(calls) == 4:  # bf16, int8 of round 1 done; bf16 of round 2 done; then Ctrl-C
            raise KeyboardInterrupt
        return real_child(flag, spec, emulate_avx2)

    monkeypatch.setattr(bench_compare, "run_in_child", interrupt_in_round_two)
    code = bench_compare.main(["--shapes", "tiny,1.4b", "--rows-tiny", "bf16,int8", "--prompt-len", "8",
                               "--new-tokens", "3", "--repeats", "3", "--workdir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 130 and "interrupted" in err
    result = json.loads(out.strip().splitlines()[-1])
    assert list(result["shapes"]) == ["tiny"] and result["interrupted"] == {"shape": "tiny", "during": "rounds", "rounds_kept": 1}
    assert all(row["decode_tok_s"]["n"] == 1 and row["load_seconds"]["n"] == 1 for row in result["shapes"]["tiny"])
    assert "median [min-max] of 1 round " in out and "interrupted during the rounds of tiny" in out
    assert [entry.name for entry in tmp_path.iterdir()] == ["ouro-tiny-random-bf16-v1-seed0"]  # 1.4b never started


def test_bench_compare_report_wraps_in_a_narrow_terminal_and_never_cuts_numbers() -> None:
    from rich.console import Console

    from looplm.bench_compare import print_report

    saved = json.loads((Path(__file__).parent.parent / "docs" / "bench-compare-run24-avx2.json").read_text())
    console = Console(width=90, record=True)
    print_report(saved, console)
    text = console.export_text()
    assert "…" not in text and "of 2 rounds" in text
    assert "7.22" in text and "3.35x" in text  # the spreads fold onto the lines below
    one_round = json.loads(json.dumps(saved))
    one_round["options"]["repeats"] = 1
    for row in one_round["shapes"]["1.4b"]:
        row["decode_tok_s"] = {**row["decode_tok_s"], "n": 1}
        row["load_seconds"] = {**row["load_seconds"], "n": 1}
    console = Console(width=200, record=True)
    print_report(one_round, console)
    text = console.export_text()
    assert "of 1 round " in text and re.search(r"│ +7\.22 │", text)  # a lone median, no [min-max]


def test_bench_compare_report_prints_the_rows_taking_turns_under_each_shape() -> None:
    from rich.console import Console

    from looplm.bench_compare import print_report

    saved = json.loads((Path(__file__).parent.parent / "docs" / "bench-compare-run26-avx512.json").read_text())
    console = Console(width=200, record=True)
    print_report(saved, console)
    text = console.export_text()
    first, second = text.index("Ouro 1.4b shape, decode taking turns"), text.index("Ouro 2.6b shape, decode taking turns")
    assert text.index("Ouro 1.4b shape, random weights") < first < text.index("Ouro 2.6b shape, random weights") < second
    assert re.search(r"│ +int4 g128 │ +107\.9 \[95\.2-121\.5\] │ +3\.11x \[2\.80-3\.33\] │", text)
    assert "decode x bf16 (looplm)" in text[first:second] and "decode x int8" in text[second:]
    without = {key: value for key, value in saved.items() if key != "turns"}  # runs before 26, or --turn-tokens 0
    console = Console(width=200, record=True)
    print_report(without, console)
    assert "taking turns" not in console.export_text()


def test_paired_decode_benchmark_script_runs_on_the_default_model() -> None:
    """benchmarks/bench_decode_context.py: every row decodes and gets a paired ratio to the first."""
    from looplm.default_model import default_model_dir

    script = Path(__file__).parent.parent / "benchmarks" / "bench_decode_context.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(default_model_dir()), "--rows", "bf16,int8",
                           "--context", "16", "--tokens", "2", "--rounds", "2"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| bf16 |", "| int8 |"))]
    assert len(rows) == 2 and rows[0].endswith("| 1.00x [1.00-1.00] |")
    assert re.search(r"\| int8 \| [0-9.]+ \[[0-9.]+-[0-9.]+\] \| [0-9.]+x \[[0-9.]+-[0-9.]+\] \|", rows[1])


def test_bench_detail_runs_on_the_tiny_shape(tmp_path: Path) -> None:
    proc = run_module("bench", "--detail", "--shape", "tiny", "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1",
                      "--batch-sizes", "1", "--workdir", str(tmp_path), "--bandwidth-mib", "64", "--warmup-steps", "1")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["options"]["shape"] == "tiny"
    text = json.dumps(result)
    assert "roofline" in text and "tok_s" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_on_cuda_without_a_gpu_is_one_line_error() -> None:
    proc = run_module("bench", "--device", "cuda")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err.decode()
    assert err.decode().strip().splitlines()[-1].startswith("error:") and "CUDA" in err.decode()


def test_the_command_line_starts_without_torch() -> None:
    """torch takes about 1.5 s to import: `looplm --help`, `--version` and option errors do not wait for it,
    and `looplm.load` still brings it in on first use."""
    code = ("import sys, looplm.cli; before = 'torch' in sys.modules; looplm.load; "
            "print(before, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("command", [["generate", "hi", "--max-new-tokens", "1"], ["chat", "--max-new-tokens", "1"],
                                     ["eval", "arithmetic", "--n", "1", "--steps", "1"]])
def test_threads_option_sets_torch_threads_before_the_work(command: list[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # the test process keeps its own threads
    result = invoke(*command, "--threads", "1", input="hi\n")
    assert result.exit_code == 0, result.output
    assert calls == [1]
    assert_one_line_error(invoke(*command, "--threads", "0", input="hi\n"), "--threads must be a positive integer")


def test_train_takes_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import looplm.train.trainer as trainer

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(trainer, "train", lambda config: None)  # the threads are set before the run starts
    args = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    assert invoke(*args, "--threads", "1").exit_code == 0
    assert calls == [1]
    assert_one_line_error(invoke(*args, "--threads", "0"), "--threads must be a positive integer")


def test_batch_decode_benchmark_script_compares_the_settings_on_the_default_model() -> None:
    """benchmarks/bench_batch_decode.py: one row per batch, a paired speed-up per setting."""
    from looplm.default_model import default_model_dir
    from looplm.kernels.extension import extension_or_reason

    script = Path(__file__).parent.parent / "benchmarks" / "bench_batch_decode.py"
    command = [sys.executable, str(script), "--model", str(default_model_dir()), "--batches", "1,5",
               "--settings", "1,4", "--tokens", "2", "--rounds", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if extension_or_reason()[1] != "avx512bf16":  # the settings are the AVX-512 BF16 kernel's
        assert proc.returncode != 0 and "needs looplm's kernels on a CPU with AVX-512 BF16" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\| [15] \|", line)]
    assert len(rows) == 2 and all(row.count("| 1.00x [1.00-1.00] |") == 1 for row in rows)
    assert all(re.search(r"\| [0-9]+ \[[0-9]+-[0-9]+\] \| [0-9.]+x \[[0-9.]+-[0-9.]+\] \|$", row) for row in rows)
