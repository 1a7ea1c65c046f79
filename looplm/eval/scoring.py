"""Answer extraction and checking for generation tasks.

- `extract_answer(text)`: the last `\\boxed{...}` (braces balanced; None when the reply was cut
  off inside it), else what follows the last `####`, else what follows the last "answer is"
  (a number there, or math in `$...$` or LaTeX up to the end of that sentence), else the last
  number in the text, else None.
- `math_equal(prediction, reference)`: mathematical equivalence with `math-verify` (sympy-based;
  `1/2` == `0.5` == `\\frac{1}{2}`, `(3, \\frac{\\pi}{2})` == `\\left( 3, \\frac{\\pi}{2} \\right)`),
  never a string compare.
- `extract_code(text)`: the first fenced Python block of a reply (else the reply itself).
"""

from __future__ import annotations

import re

from looplm.errors import LooplmError

_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")  # 1,018 and 2.5 and .5
_BOXED = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS = re.compile(r"answer is\b[\s:]*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces balanced; None when
    there is none or it was never closed."""
    commands = list(_BOXED.finditer(text))
    if not commands:
        return None
    rest = text[commands[-1].end():]
    argument = rest.lstrip()
    if not argument.startswith("{"):  # "\boxed 5."
        return argument.split()[0].rstrip(".$") if argument else None
    depth = 0
    for index, char in enumerate(argument):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return _drop_full_stop(argument[1:index].strip())
    return None  # unclosed: the reply was cut off


def extract_answer(text: str) -> str | None:
    if _BOXED.search(text):  # the reply gave a boxed answer: that one, or none if it was cut off
        return last_boxed(text)
    if "####" in text:
        after = text.rsplit("####", 1)[1].strip()
        if after:
            return after.splitlines()[0].strip().rstrip(".")
    stated = _stated_answer(text)
    if stated:
        return stated
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def _stated_answer(text: str) -> str | None:
    """What follows the last "answer is": a number, or math in `$...$` / LaTeX up to the end of
    the sentence. Words ("the answer is not 5, it is 7") are no stated answer."""
    phrases = list(_ANSWER_IS.finditer(text))
    if not phrases:
        return None
    line = text[phrases[-1].end():].split("\n", 1)[0]
    rest = line.lstrip("$ ")
    number = _NUMBER.match(rest)
    if number:
        return number.group().replace(",", "")
    if not (line.startswith("$") or rest.startswith("\\")):
        return None
    sentence = _SENTENCE_END.split(rest, maxsplit=1)[0]
    return _drop_full_stop(sentence.strip().strip("$").strip()) or None


def _drop_full_stop(answer: str) -> str:
    """"18." -> "18"; an ellipsis ("1, 2, ...") is kept."""
    return answer[:-1] if answer.endswith(".") and not answer.endswith("..") else answer


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
