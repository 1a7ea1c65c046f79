"""Shared fixtures: the golden ouro-tiny fixture and small random checkpoints of any shape."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from looplm.default_model import write_random_checkpoint

# LOOPLM_FIXTURES points elsewhere, e.g. at a copy carried to a GPU machine (benchmarks/gpu_checks.sh).
FIXTURE_DIR = Path(os.environ.get("LOOPLM_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures")) / "ouro-tiny"

# The test models are tiny: a second thread buys nothing, and on a busy machine OpenMP's
# barrier waits make tiny ops 10-50x slower. Benchmarks use every thread.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the embedded default model (created on first use) out of the user's cache."""
    home = tmp_path_factory.getbasetemp() / "looplm-home"
    monkeypatch.setenv("LOOPLM_HOME", str(home))


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURE_DIR / "model.safetensors").exists():
        pytest.skip(f"golden fixture not found at {FIXTURE_DIR}")
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def expected(fixture_dir: Path) -> dict:
    return load_file(str(fixture_dir / "expected.safetensors"))


@pytest.fixture(scope="session")
def expected_meta(fixture_dir: Path) -> dict:
    return json.loads((fixture_dir / "expected.json").read_text())


def random_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Prompts of the given lengths, token ids in [3, vocab) (clear of pad, bos and eos)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def small_config(**overrides: object) -> dict:
    """An Ouro config.json dict for a small random model; override any key."""
    config = {
        "architectures": ["OuroForCausalLM"],
        "model_type": "ouro",
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "total_ut_steps": 4,
        "early_exit_threshold": 1.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    config.update(overrides)
    return config


@pytest.fixture
def make_checkpoint(tmp_path: Path):  # noqa: ANN201
    """Factory: write a random checkpoint with the given config overrides, return its directory."""
    counter = iter(range(1000))

    def make(seed: int = 0, **overrides: object) -> Path:
        path = tmp_path / f"ckpt{next(counter)}"
        write_random_checkpoint(path, small_config(**overrides), seed=seed)
        return path

    return make


def decode_greedily(decoder, ids: torch.Tensor, mask: torch.Tensor | None, new_tokens: int):  # noqa: ANN001, ANN201
    """Greedy tokens `[B][new_tokens]`, 1-based exit steps (as `generate` reports them) and the
    last logits through a `looplm.static_decode.StaticDecoder`."""
    logits, exit_step = decoder.prefill(ids, mask)
    tokens, exits = [logits.argmax(-1)], [exit_step.clone()]
    for _ in range(new_tokens - 1):
        logits, exit_step = decoder.step(tokens[-1])
        tokens.append(logits.argmax(-1))
        exits.append(exit_step.clone())
    return torch.stack(tokens, 1).tolist(), (torch.stack(exits, 1) + 1).tolist(), logits.clone()


@pytest.fixture
def read_only_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file its user may not write. Root may write any file, so under root `os.access` is made to
    answer by the owner's permission bits, as it does for everyone else."""
    path = tmp_path / "read-only.txt"
    path.write_text("kept\n")
    path.chmod(0o444)
    if os.geteuid() == 0:
        real_access = os.access

        def access(target, mode: int, **kwargs) -> bool:  # noqa: ANN001, ANN003
            if mode & os.W_OK and not os.stat(target).st_mode & 0o200:
                return False
            return real_access(target, mode, **kwargs)

        monkeypatch.setattr(os, "access", access)
    return path
