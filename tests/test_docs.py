"""The README's Python examples run as written, on the embedded model, so the docs cannot drift
from the API. Only the model path is swapped: no Ouro checkpoint exists offline."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_readme_python_examples_run_on_the_embedded_model() -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 3, "the README lost its Python API, exit and speculative examples"
    source = "\n".join(blocks)
    assert 'looplm.load("path/to/Ouro-1.4B"' in source, "update the path swapped below"
    source = source.replace('looplm.load("path/to/Ouro-1.4B"', "looplm.load(None")
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - our own documentation

    model, ids = namespace["model"], namespace["ids"]
    steps = model.config.total_ut_steps
    assert namespace["out"].logits.shape[:3] == (steps, 1, len(ids))
    assert torch.allclose(namespace["out"].exit_probs.float().sum(0), torch.ones(1, len(ids)), atol=1e-2)
    stats = namespace["stats"]
    assert 1 <= stats.mean_steps <= steps and len(stats.steps_per_token) == 1
    answers = namespace["answers"]  # run_jobs: every prompt answered, in the order given
    assert len(answers) == 3 and all(isinstance(text, str) for text in answers) and any(answers)
    new_ids = namespace["new_ids"]  # the speculative example's output, the last one assigned
    assert len(new_ids) == 1 and 1 <= len(new_ids[0]) <= 128
    assert all(0 <= t < model.config.vocab_size for t in new_ids[0])
