"""Answer extraction, math equivalence (math-verify), the code sandbox, and the packaged data sets."""

from __future__ import annotations

import time

import pytest

from looplm.errors import LooplmError
from looplm.eval.code_exec import humaneval_program, run_program
from looplm.eval.scoring import extract_answer, extract_code, last_boxed, math_equal


def test_extraction() -> None:
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert last_boxed("\\boxed{unclosed") is None
    assert extract_answer("She pays 5 + 13 = 18 dollars.\n#### 1,018") == "1,018"
    assert extract_answer("so the total is 72 apples.") == "72"
    assert extract_answer("no digits here") is None
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"


@pytest.mark.parametrize(("reply", "answer"), [
    ("The answer is 18. Check: 18 = 9 + 9.", "18"),  # the stated answer, not the last number
    ("So the answer is: $1,234.", "1234"),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("the answer is not 5, it is 7", "7"),  # words after "answer is": the last number, as before
    ("The answer is \\frac{3}{4}. Done", "\\frac{3}{4}"),
    ("the answer is .5", ".5"),  # a leading point is part of the number
    ("it costs .75 more", ".75"),
    ("so \\boxed{18.}", "18"),  # a full stop inside the box
    ("\\boxed{1, 2, ...}", "1, 2, ..."),  # an ellipsis is not a full stop
    ("\\boxed 5. The set is {1,2}", "5"),  # no brace right after the command: the next word
    ("\\fbox 7 done", "7"),
    ("x = \\boxed{\\frac{1}{2", None),  # cut off inside the box: no answer, not the last number
    ("\\boxed{3} first, then \\boxed{\\frac{1}{2", None),
])
def test_answer_extraction_edge_cases(reply: str, answer: str | None) -> None:
    assert extract_answer(reply) == answer


@pytest.mark.parametrize(("prediction", "reference", "equal"), [
    ("1,018", "1018", True), ("\\frac{1}{2}", "0.5", True), ("18", "17", False), (None, "1", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True), ("x^2+2x+1", "(x+1)^2", True),
    ("\\$18.00", "18", True),
])
def test_math_equivalence_is_not_a_string_compare(prediction, reference, equal) -> None:  # noqa: ANN001
    assert math_equal(prediction, reference) is equal


def test_code_runs_isolated_with_timeout_and_no_network() -> None:
    stub = 'def add(a, b):\n    """Add."""\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    assert run_program(humaneval_program(stub, "    return a + b\n", test, "add")) == (True, "passed")
    assert run_program(humaneval_program(stub, "def add(a, b):\n    return a - b\n", test, "add"))[0] is False
    assert run_program("while True:\n    pass\n", timeout_s=1.5) == (False, "timeout")
    passed, reason = run_program("import socket\nsocket.create_connection(('198.51.100.1', 80), timeout=2)\n")
    assert not passed and ("Network is unreachable" in reason or "disabled" in reason), reason


ADD_STUB = 'def add(a, b):\n    """Add."""\n'
ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n"


@pytest.mark.parametrize("escape", [
    "import sys\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "raise SystemExit\n",
    "import unittest\nclass T(unittest.TestCase):\n    def test(self):\n        pass\n"
    "if __name__ == '__main__':\n    unittest.main()\n",
])
def test_a_wrong_program_that_exits_early_does_not_pass(escape: str) -> None:
    # HumanEval counts a pass only when check() ran to its end (OpenAI's human-eval executes the
    # program as a module, so a __main__ block never runs, and SystemExit is a failure).
    program = humaneval_program(ADD_STUB, "    return a - b\n\n" + escape, ADD_TEST, "add")
    assert run_program(program)[0] is False


def test_a_right_program_with_a_main_block_passes() -> None:
    program = humaneval_program(ADD_STUB, "    return a + b\n\nif __name__ == '__main__':\n    input()\n",
                                ADD_TEST, "add")
    assert run_program(program) == (True, "passed")


def test_background_processes_neither_delay_the_result_nor_outlive_it(tmp_path) -> None:  # noqa: ANN001
    marker = tmp_path / "alive"
    child = f"import time, pathlib\ntime.sleep(3)\npathlib.Path({str(marker)!r}).write_text('x')\n"
    body = f"    return a + b\n\nimport subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\n"
    started = time.monotonic()
    assert run_program(humaneval_program(ADD_STUB, body, ADD_TEST, "add"), timeout_s=8) == (True, "passed")
    assert time.monotonic() - started < 3  # not kept waiting on the child's open output
    time.sleep(3.5)
    assert not marker.exists()  # the child was killed with the program's process group


def test_endless_output_is_cut_off() -> None:
    passed, reason = run_program("while True:\n    print('y' * 4096)\n", timeout_s=20)
    assert not passed and "File too large" in reason, reason


@pytest.mark.parametrize(("task", "count", "kind"), [
    ("gsm8k", 1319, "generate"), ("math500", 500, "generate"), ("mmlu", 14042, "loglik"),
    ("hellaswag", 100, "loglik"), ("aime25", 30, "generate"), ("gpqa", 198, "loglik"), ("humaneval", 164, "generate"),
])
def test_packaged_data_sets(task: str, count: int, kind: str) -> None:
    from looplm.eval.tasks import get_task

    spec = get_task(task)
    try:
        items = spec.load(0)
    except LooplmError as exc:
        pytest.skip(f"data package unavailable: {exc}")
    assert len(items) == count and spec.kind == kind and len({item.id for item in items}) == count
    if kind == "loglik":
        assert all(len(item.choices) == 4 and 0 <= item.label < 4 for item in items)
    else:
        assert all(item.messages and item.answer for item in items)
    if task == "gpqa":  # the shuffle is fixed and spreads the right answer over the letters
        labels = [item.label for item in items]
        assert labels == [item.label for item in spec.load(0)] and len(set(labels)) == 4


def test_humaneval_reference_solutions_pass_and_wrong_ones_fail() -> None:
    from looplm.eval.tasks import get_task

    try:
        items = get_task("humaneval").load(0)
    except LooplmError as exc:
        pytest.skip(f"data package unavailable: {exc}")
    for item in items[:3]:
        meta = item.meta
        program = humaneval_program(meta["prompt"], meta["canonical_solution"], item.answer, meta["entry_point"])
        assert run_program(program) == (True, "passed"), item.id
        wrong = humaneval_program(meta["prompt"], "    return None\n", item.answer, meta["entry_point"])
        assert run_program(wrong)[0] is False, item.id
