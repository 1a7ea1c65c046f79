"""Write a training run as an HF-layout Ouro checkpoint that `looplm.load` reads.

Files: config.json, model.safetensors (bf16), generation_config.json, tokenizer.json,
tokenizer_config.json, and - for resuming only - trainer_state.pt (fp32 weights, optimizer
state, step, RNG and the run's training settings; read back with `torch.load(weights_only=True)`). Every file is written to a
temporary name and renamed, so an interrupted save never leaves a torn checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from looplm.models.ouro import OuroForCausalLM
from looplm.safetensors_io import save_safetensors
from looplm.tokenizer import Tokenizer

STATE_FILE = "trainer_state.pt"
HF_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def save_pretrained(out: Path, model: OuroForCausalLM, raw_config: dict, tokenizer: Tokenizer | None) -> None:
    """The inference files: weights in bf16 (a tied lm_head is stored once, as the embedding)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[name] = tensor.detach().to("cpu", torch.bfloat16).contiguous()
    atomic_write(out / "model.safetensors", lambda tmp: save_safetensors(state, tmp))
    config = {**raw_config, "torch_dtype": "bfloat16"}
    atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    eos = config.get("eos_token_id")
    generation = {"eos_token_id": eos if isinstance(eos, list) else [eos], "pad_token_id": config.get("pad_token_id")}
    atomic_write(out / "generation_config.json", lambda tmp: tmp.write_text(json.dumps(generation, indent=2) + "\n"))
    if tokenizer is not None:
        tokenizer.save(out)


def save_checkpoint(
    out: Path,
    model: OuroForCausalLM,
    raw_config: dict,
    tokenizer: Tokenizer | None,
    optimizer: torch.optim.Optimizer,
    step: int,
    rng: dict,
    settings: dict | None = None,
) -> None:
    """`save_pretrained` plus trainer_state.pt for `--resume`; `settings`: what `--resume` continues with
    (plain JSON-like values, so `weights_only` loading reads them)."""
    save_pretrained(out, model, raw_config, tokenizer)
    state = {
        "model": {k: v.detach().to("cpu") for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rng": rng,
        "settings": settings,
    }
    atomic_write(out / STATE_FILE, lambda tmp: torch.save(state, tmp))


def atomic_write(path: Path, write) -> None:  # noqa: ANN001
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # a failed or interrupted write leaves neither a torn file nor its temporary
        tmp.unlink(missing_ok=True)
        raise


def jsonable(value):  # noqa: ANN001, ANN202
    """A value with Paths as strings and tuples as lists, for JSON (logs, saved settings)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value
