"""Benchmark tasks: records from the pinned PyPI data packages -> `Item`s with their prompts.

Two kinds of task:
- `loglik` (multiple choice): `Item.context` + each of `Item.choices` is scored by the sum of
  the continuation's token log-probabilities; the best choice is the prediction.
- `generate`: the model answers `Item.messages` (chat template) greedily and `scoring.py`
  checks the answer.

Prompt formats (all 0-shot unless `num_fewshot` is given, which only gsm8k supports):
- hellaswag: `"{activity_label}: {ctx}"` + `" {ending}"`; accuracy is length-normalised
  (`acc_norm`: log-likelihood / characters of the scored continuation, its leading space
  included, as lighteval divides; lm-eval divides by the ending's bytes without the space).
- mmlu: the cloze form, `"Question: {question}\\nAnswer:"` + `" {answer text}"`, `acc_norm`.
  This is the "MMLU (cloze)" setting of the SmolLM2 model cards.
- gpqa: the four answers shuffled with a fixed seed and lettered A-D; choices `" A"`..`" D"`, `acc`.
- gsm8k, math500, aime25: the question plus an instruction to put the answer in `\\boxed{}`.
- humaneval: the function stub in a code block; the reply's code is run against the tests.

With `chat=True` a loglik context is wrapped in the chat template as the user turn, and the
choices continue the assistant turn.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from looplm.assets import fetch_asset
from looplm.errors import LooplmError

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Item:
    id: str
    context: str = ""  # loglik: text before each choice (before chat wrapping)
    choices: list[str] = field(default_factory=list)  # loglik: continuations, each with its leading space
    label: int = -1  # loglik: index of the right choice
    messages: list[dict] = field(default_factory=list)  # generate: the conversation to answer
    answer: str = ""  # generate: the reference answer (or the tests for humaneval)
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "loglik" | "generate"
    metric: str  # "acc" | "acc_norm" | "math_equiv" | "pass@1"
    load: Callable[[int], list[Item]]  # num_fewshot -> items
    max_new_tokens: int = 0
    needs_code_execution: bool = False


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _no_fewshot(name: str, num_fewshot: int) -> None:
    if num_fewshot:
        raise LooplmError(f"--num-fewshot is supported for gsm8k only; run {name} with 0 shots")


# -- multiple choice ---------------------------------------------------------------------------


def _clean_hellaswag(text: str) -> str:
    # WikiHow contexts carry " [title]" markers and bracketed headers; remove them as the standard
    # preprocessing does, and drop double spaces.
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return " ".join(text.split())


def load_hellaswag(num_fewshot: int) -> list[Item]:
    _no_fewshot("hellaswag", num_fewshot)
    items = []
    for row in read_jsonl(fetch_asset("hellaswag-sample")):
        context = _clean_hellaswag(f"{row['activity_label']}: {row['ctx']}")
        choices = [" " + _clean_hellaswag(e) for e in row["endings"]]
        items.append(Item(id=row["id"], context=context, choices=choices, label=int(row["expected_index"])))
    return items


def load_mmlu(num_fewshot: int) -> list[Item]:
    _no_fewshot("mmlu", num_fewshot)
    items = []
    for index, row in enumerate(read_jsonl(fetch_asset("mmlu-test"))):
        if row["correct_answer"] == "answer":  # two repeated CSV header rows in the packaged file
            continue
        answers = [row[f"answer_{letter}"] for letter in "abcd"]
        items.append(Item(
            id=f"mmlu-{index}", context=f"Question: {row['question'].strip()}\nAnswer:",
            choices=[f" {str(a).strip()}" for a in answers], label="ABCD".index(row["correct_answer"]),
            meta={"topic": row["topic"]},
        ))
    return items


def load_gpqa(num_fewshot: int) -> list[Item]:
    _no_fewshot("gpqa", num_fewshot)
    path = fetch_asset("gpqa-diamond")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    items = []
    for index, row in enumerate(rows):
        answers = [row["Correct Answer"]] + [row[f"Incorrect Answer {k}"] for k in (1, 2, 3)]
        order = list(range(4))
        random.Random(f"gpqa-{index}").shuffle(order)  # fixed per-question seed
        shuffled = [answers[k].strip() for k in order]
        lines = [row["Question"].strip(), ""] + [f"{letter}. {text}" for letter, text in zip("ABCD", shuffled)]
        items.append(Item(
            id=f"gpqa-{index}", context="\n".join(lines) + "\nAnswer:", choices=[" A", " B", " C", " D"],
            label=order.index(0), meta={"domain": row.get("High-level domain", "")},
        ))
    return items


# -- generation --------------------------------------------------------------------------------


def gsm8k_reference(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def load_gsm8k(num_fewshot: int) -> list[Item]:
    shots: list[dict] = []
    if num_fewshot:
        train = read_jsonl(fetch_asset("gsm8k-train"))  # shots from the train split only
        for row in train[:num_fewshot]:
            reasoning = row["answer"].split("####")[0].strip()
            shots += [{"role": "user", "content": f"{row['question']}\n{BOXED_INSTRUCTION}"},
                      {"role": "assistant", "content": f"{reasoning}\nThe final answer is "
                       f"\\boxed{{{gsm8k_reference(row['answer'])}}}."}]
    items = []
    for index, row in enumerate(read_jsonl(fetch_asset("gsm8k-test"))):
        messages = shots + [{"role": "user", "content": f"{row['question']}\n{BOXED_INSTRUCTION}"}]
        items.append(Item(id=f"gsm8k-{index}", messages=messages, answer=gsm8k_reference(row["answer"])))
    return items


def load_math500(num_fewshot: int) -> list[Item]:
    _no_fewshot("math500", num_fewshot)
    return [
        Item(id=row["unique_id"], messages=[{"role": "user", "content": f"{row['problem']}\n{BOXED_INSTRUCTION}"}],
             answer=row["answer"], meta={"level": row["level"], "subject": row["subject"]})
        for row in read_jsonl(fetch_asset("math500"))
    ]


def load_aime25(num_fewshot: int) -> list[Item]:
    _no_fewshot("aime25", num_fewshot)
    items = []
    for part in ("i", "ii"):
        for index, row in enumerate(read_jsonl(fetch_asset(f"aime25-{part}"))):
            items.append(Item(id=f"aime25-{part.upper()}-{index + 1}",
                              messages=[{"role": "user", "content": f"{row['question']}\n{BOXED_INSTRUCTION}"}],
                              answer=str(row["answer"]).strip()))
    return items


HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole function in one "
                         "```python code block.\n\n```python\n{prompt}```")


def load_humaneval(num_fewshot: int) -> list[Item]:
    _no_fewshot("humaneval", num_fewshot)
    return [
        Item(id=row["task_id"], messages=[{"role": "user", "content": HUMANEVAL_INSTRUCTION.format(prompt=row["prompt"])}],
             answer=row["test"], meta={"prompt": row["prompt"], "entry_point": row["entry_point"],
                                      "canonical_solution": row["canonical_solution"]})
        for row in read_jsonl(fetch_asset("humaneval"))
    ]


TASKS: dict[str, Task] = {
    "gsm8k": Task("gsm8k", "generate", "math_equiv", load_gsm8k, max_new_tokens=384),
    "math500": Task("math500", "generate", "math_equiv", load_math500, max_new_tokens=1024),
    "mmlu": Task("mmlu", "loglik", "acc_norm", load_mmlu),
    "hellaswag": Task("hellaswag", "loglik", "acc_norm", load_hellaswag),
    "aime25": Task("aime25", "generate", "math_equiv", load_aime25, max_new_tokens=2048),
    "gpqa": Task("gpqa", "loglik", "acc", load_gpqa),
    "humaneval": Task("humaneval", "generate", "pass@1", load_humaneval, max_new_tokens=512,
                      needs_code_execution=True),
}


def get_task(name: str) -> Task:
    task = TASKS.get(name)
    if task is None:
        raise LooplmError(f"unknown task {name!r}; tasks: {', '.join(TASKS)} (and arithmetic)")
    return task


def select_items(items: list[Item], limit: int | None, shard: tuple[int, int] | None) -> list[Item]:
    """`limit` items spread evenly over the set (MMLU is sorted by subject), then every n-th for shard i/n."""
    if limit is not None and limit < len(items):
        items = [items[(k * len(items)) // limit] for k in range(limit)]
    if shard is not None:
        index, count = shard
        items = items[index::count]
    return items
