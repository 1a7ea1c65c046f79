"""The arithmetic task: held-out split, problem answers, the eval loop and its results format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import looplm
from looplm.cli import app
from looplm.default_model import write_random_checkpoint
from looplm.eval.arithmetic import evaluate_arithmetic, format_table
from looplm.train.data import Problem, arithmetic_documents, arithmetic_problems, train_tokenizer

RESULT_KEYS = {"steps", "exit_policy", "exit_threshold", "accuracy", "mean_steps", "n"}


def test_problem_answers() -> None:
    assert Problem(999, "+", 1).text == "999+1=1000"
    assert Problem(305, "-", 7).answer == "298"


def test_held_out_split_is_disjoint_from_training() -> None:
    held = arithmetic_problems(300, seed=1234, held_out=True)
    assert len(set(held)) == 300 and all(p.held_out for p in held)
    assert held == arithmetic_problems(300, seed=1234, held_out=True)  # the seed fixes the set
    train_lines = {line for doc in arithmetic_documents(5000, seed=7) for line in doc.split()}
    assert not train_lines & {p.text for p in held}
    assert all(not Problem(*_parse(line)).held_out for line in train_lines)
    assert all(p.a >= p.b for p in held if p.op == "-")


def _parse(line: str) -> tuple[int, str, int]:
    lhs = line.split("=")[0]
    op = "+" if "+" in lhs else "-"
    a, b = lhs.split(op)
    return int(a), op, int(b)


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
    gated = evaluate_arithmetic(model, [4], n=6, exit_threshold=0.5)["results"][0]
    assert gated["exit_policy"] == "threshold" and 1.0 <= gated["mean_steps"] <= 4.0
    assert "| 4 | threshold 0.5 |" in format_table({"results": [gated]})


def test_eval_cli_writes_json(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["eval", "arithmetic", "-m", str(tiny_dir), "--steps", "1,3", "--n", "4",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["steps"] for r in data["results"]] == [1, 3] and "| 3 | last |" in result.stdout
    bad = CliRunner().invoke(app, ["eval", "arithmetic", "-m", str(tiny_dir), "--steps", "1,x"])
    assert bad.exit_code == 1 and "--steps" in bad.output
