"""The embedded default model, so that every command works offline out of the box.

The default is `tiny-ouro`, a small Ouro-layout model trained by `looplm train` and shipped
inside the package (`looplm/data/tiny-ouro/`; recipe in docs/tiny-ouro.md). It is loaded
through the same code path as any HF-layout directory.

If the packaged weights are missing (e.g. a source checkout without them), the fallback is a
tiny RANDOM-weight checkpoint with a byte-level tokenizer, written on first use to
`$LOOPLM_HOME/default-random-v1` (default `~/.cache/looplm`), with a warning: its output is
noise. `write_random_checkpoint` is also what tests and benchmarks use for random models.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from looplm.config import OuroConfig
from looplm.models.ouro import OuroForCausalLM

PACKAGED_DIR = Path(__file__).resolve().parent / "data" / "tiny-ouro"
DEFAULT_NAME = "default-random-v1"
DEFAULT_CONFIG = {
    "architectures": ["OuroForCausalLM"],
    "model_type": "ouro",
    "vocab_size": 259,  # the byte-level tokenizer: 3 special ids + 256 bytes
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "total_ut_steps": 4,
    "early_exit_threshold": 1.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "torch_dtype": "bfloat16",
}


def looplm_home() -> Path:
    return Path(os.environ.get("LOOPLM_HOME", Path.home() / ".cache" / "looplm"))


def default_model_dir() -> Path:
    """The packaged tiny-ouro model; if it is missing, the random fallback (with a warning)."""
    if (PACKAGED_DIR / "model.safetensors").exists():
        return PACKAGED_DIR
    warnings.warn(
        f"the packaged default model is missing ({PACKAGED_DIR}); using a tiny RANDOM model whose output is noise. "
        "Reinstall looplm or pass -m PATH",
        stacklevel=2,
    )
    return random_model_dir()


def random_model_dir() -> Path:
    """Path of the tiny random-weight model, creating it on first use (atomically: no half-written dirs)."""
    target = looplm_home() / DEFAULT_NAME
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".default-", dir=target.parent))
    try:
        write_random_checkpoint(staging, DEFAULT_CONFIG, seed=0)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_random_checkpoint(path: Path, config: dict, seed: int = 0, with_tokenizer: bool = True) -> None:
    """Write an HF-layout Ouro checkpoint with random bf16 weights (also used by tests and benches)."""
    from looplm.tokenizer import byte_level_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):  # names and shapes only; tensors are made one at a time in bf16
        shapes = {name: p.shape for name, p in OuroForCausalLM(OuroConfig.from_dict(config)).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            state[name] = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    del state
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [config.get("eos_token_id", 2)], "pad_token_id": config.get("pad_token_id")})
    )
    if with_tokenizer:
        byte_level_tokenizer().save(path)
