"""The arithmetic task: held-out split, problem answers, the eval loop and its results format."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import looplm
from looplm.cli import app
from looplm.default_model import write_random_checkpoint
from looplm.eval import arithmetic as arithmetic_eval
from looplm.eval.arithmetic import evaluate_arithmetic, format_table, score_problems
from looplm.train.data import (
    Problem,
    arithmetic_documents,
    arithmetic_problems,
    build_arithmetic_phase,
    train_tokenizer,
    write_data_dir,
)

RESULT_KEYS = {"steps", "exit_policy", "exit_threshold", "accuracy", "mean_steps", "n"}


def test_problem_answers() -> None:
    assert Problem(999, "+", 1).text == "999+1=1000"
    assert Problem(305, "-", 7).answer == "298"
    chain = Problem(47, "-", 8, (("+", 23),))
    assert chain.text == "47-8+23=62" and chain.terms == 3
    assert Problem(3, "-", 9, (("+", 9),)).answer == "3"  # left to right: (3 - 9) + 9


@pytest.mark.parametrize("max_terms", [2, 3])
def test_held_out_split_is_disjoint_from_training(max_terms: int) -> None:
    held = arithmetic_problems(300, seed=1234, held_out=True, max_terms=max_terms)
    assert len(set(held)) == 300 and all(p.held_out for p in held)
    assert held == arithmetic_problems(300, seed=1234, held_out=True, max_terms=max_terms)  # the seed fixes the set
    docs = arithmetic_documents(5000, seed=7, max_terms=max_terms)
    train_lines = {line for doc in docs for line in doc.split()}
    assert not train_lines & {p.text for p in held}
    parsed = [_parse(line) for line in train_lines]
    assert all(p.text == line for p, line in zip(parsed, train_lines))
    assert all(not p.held_out for p in parsed)
    assert all(int(p.answer) >= 0 for p in held + parsed)
    assert {p.terms for p in held} == set(range(2, max_terms + 1))


def _parse(line: str) -> Problem:
    """Problem from a training line like `47-8+23=62`."""
    lhs = line.split("=")[0]
    numbers = [int(n) for n in re.split(r"[+-]", lhs)]
    ops = re.findall(r"[+-]", lhs)
    return Problem(numbers[0], ops[0], numbers[1], tuple(zip(ops[1:], numbers[2:])))


def test_eval_prompt_is_tokenized_as_in_training() -> None:
    """The eval feeds `<|endoftext|>` + prompt; training lines must start with exactly those tokens."""
    docs = arithmetic_documents(400, seed=3, max_digits=2, max_terms=3)
    tokenizer = train_tokenizer(docs, vocab_size=300)
    for problem in arithmetic_problems(50, seed=5, held_out=True, max_digits=2, max_terms=3):
        line = tokenizer.encode(problem.text + "\n")
        prompt = tokenizer.encode(problem.prompt)
        assert line[: len(prompt)] == prompt
        assert tokenizer.decode(line[len(prompt):]) == problem.answer + "\n"


def test_answers_are_read_up_to_the_newline(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact match parses the greedy continuation: answer, newline, then anything (ignored)."""
    model = looplm.load(tiny_dir, dtype="float32")
    tok = model.tokenizer
    problems = [Problem(47, "-", 8, (("+", 23),)), Problem(9, "+", 9), Problem(12, "-", 3)]
    replies = ["62\n5+5", "18\n", "19\n"]  # right, right (stops at the newline), wrong
    seen_new_tokens = []

    def fake_greedy(model, prompts, steps, exit_threshold, max_new_tokens):  # noqa: ANN001, ANN202
        seen_new_tokens.append(max_new_tokens)
        rows = [tok.encode(r) for r in replies]
        return rows, [[steps] * len(r) for r in rows]

    monkeypatch.setattr(arithmetic_eval, "greedy_answers", fake_greedy)
    correct, mean_steps = score_problems(model, problems, steps=3)
    assert correct == [True, True, False] and mean_steps == 3.0
    assert seen_new_tokens == [4]  # the longest answer (2 digits) + newline + 1


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    tokenizer = train_tokenizer(arithmetic_documents(500, seed=0), vocab_size=280)
    config = {"architectures": ["OuroForCausalLM"], "model_type": "ouro", "vocab_size": tokenizer.vocab_size,
              "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64, "total_ut_steps": 4,
              "eos_token_id": 0, "pad_token_id": 0}
    write_random_checkpoint(path, config, seed=0, with_tokenizer=False)
    tokenizer.save(path)
    return path


def test_eval_results_format(tiny_dir: Path) -> None:
    model = looplm.load(tiny_dir, dtype="float32")
    fixed = evaluate_arithmetic(model, [1, 2, 4], n=12, batch_size=5)
    assert fixed["task"] == "arithmetic" and fixed["model"] == str(tiny_dir)
    assert [r["steps"] for r in fixed["results"]] == [1, 2, 4]
    for r in fixed["results"]:
        assert set(r) == RESULT_KEYS and r["n"] == 12 and 0.0 <= r["accuracy"] <= 1.0
        assert r["exit_policy"] == "last" and r["exit_threshold"] is None and r["mean_steps"] == r["steps"]
    assert fixed["metric"] == "exact_match"
    # A threshold adds the gate's row at the largest loop count; the fixed depths stay.
    last, gated = evaluate_arithmetic(model, [2, 4], n=6, exit_threshold=0.5)["results"][1:]
    assert (last["exit_policy"], last["steps"]) == ("last", 4)
    assert (gated["exit_policy"], gated["steps"], gated["exit_threshold"]) == ("gate", 4, 0.5)
    assert 1.0 <= gated["mean_steps"] <= 4.0
    assert "| 4 | gate 0.5 |" in format_table({"results": [gated]})


def test_eval_cli_writes_json(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["eval", "arithmetic", "-m", str(tiny_dir), "--steps", "1,3", "--n", "4",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["steps"] for r in data["results"]] == [1, 3] and "| 3 | last |" in result.stdout
    # Default loop counts: 1..T of the model (this copy runs 3); --limit is --n, as in the other tasks
    three = tmp_path / "three-loops"
    shutil.copytree(tiny_dir, three)
    config = json.loads((three / "config.json").read_text())
    (three / "config.json").write_text(json.dumps({**config, "total_ut_steps": 3}))
    default = CliRunner().invoke(app, ["eval", "arithmetic", "-m", str(three), "--limit", "2", "--output", str(out)])
    assert default.exit_code == 0, default.output
    assert [r["steps"] for r in json.loads(out.read_text())["results"]] == [1, 2, 3]
    bad = CliRunner().invoke(app, ["eval", "arithmetic", "-m", str(tiny_dir), "--steps", "1,x"])
    assert bad.exit_code == 1 and "--steps" in bad.output


def test_second_phase_data_keeps_tokenizer_and_text(tmp_path: Path) -> None:
    """The curriculum switch: same tokenizer and text tokens, a new arithmetic source (1 digit, up to 4 terms)."""
    docs = arithmetic_documents(300, seed=0, max_digits=2, max_terms=3)
    text = ["To be, or not to be, that is the question.\n"] * 20
    tokenizer = train_tokenizer(docs + text, vocab_size=300)
    write_data_dir(tmp_path / "a", {"text": (text, 0.35), "arithmetic": (docs, 0.65)}, tokenizer)
    meta = build_arithmetic_phase(tmp_path / "a", tmp_path / "b", 0.65, n_problems=400, max_digits=1, max_terms=4,
                                  seed=2)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert np.array_equal(np.load(tmp_path / "a" / "text.npy"), np.load(tmp_path / "b" / "text.npy"))
    assert meta["sources"]["arithmetic"]["weight"] == 0.65 and meta["sources"]["text"]["weight"] == pytest.approx(0.35)
    lines = tokenizer.decode(np.load(tmp_path / "b" / "arithmetic.npy").tolist()).split()
    problems = [_parse(line) for line in lines]
    assert {p.terms for p in problems} == {2, 3, 4}
    assert all(n < 10 for p in problems for n in (p.a, p.b, *(c for _, c in p.rest)))
    assert all(not p.held_out and p.text == line for p, line in zip(problems, lines))
