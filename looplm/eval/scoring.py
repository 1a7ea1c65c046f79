"""Answer extraction and checking for generation tasks.

- `extract_answer(text)`: the last `\\boxed{...}` (braces balanced), else what follows the last
  `####`, else the last number in the text, else None.
- `math_equal(prediction, reference)`: mathematical equivalence with `math-verify` (sympy-based;
  `1/2` == `0.5` == `\\frac{1}{2}`, `(3, \\frac{\\pi}{2})` == `\\left( 3, \\frac{\\pi}{2} \\right)`),
  never a string compare.
- `extract_code(text)`: the first fenced Python block of a reply (else the reply itself).
"""

from __future__ import annotations

import re

from looplm.errors import LooplmError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), with nested braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        tail = text[start + len("\\boxed"):].strip()  # "\boxed 5"
        return tail.split()[0].rstrip(".$") if tail else None
    depth = 0
    for index in range(brace, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : index].strip()
    return None  # unclosed: the reply was cut off


def extract_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        after = text.rsplit("####", 1)[1].strip()
        if after:
            return after.splitlines()[0].strip().rstrip(".")
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def _math_verify():  # noqa: ANN202
    try:
        import math_verify
    except ImportError as exc:
        raise LooplmError("math answers are checked with math-verify, which is not installed; "
                          "run: pip install 'math-verify==0.9.0'") from exc
    return math_verify


def math_equal(prediction: str | None, reference: str) -> bool:
    """True when `prediction` is mathematically equivalent to `reference` (both LaTeX or plain)."""
    if prediction is None or not prediction.strip():
        return False
    mv = _math_verify()
    gold = mv.parse(f"\\boxed{{{reference}}}")
    pred = mv.parse(f"\\boxed{{{prediction}}}")
    if not gold or not pred:
        return False
    return bool(mv.verify(gold, pred))


def extract_code(text: str) -> str:
    blocks = re.findall(r"```(?:python|py)?[^\n]*\n(.*?)```", text, flags=re.DOTALL)
    if blocks:
        return blocks[0]
    if "```" in text:  # an opened block the reply never closed (cut off)
        return text.split("```", 1)[1].split("\n", 1)[-1]
    return text
