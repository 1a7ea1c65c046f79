"""Resuming a training run: its saved state, and the settings it continues with.

`trainer_state.pt` keeps the fp32 weights, the AdamW state, the step, the RNG state and the
run's `RUN_SETTINGS`. On resume a setting the command did not set on purpose (`TrainConfig.explicit`)
takes the saved value; one set to another value is an error, except `CHANGEABLE_ON_RESUME`. A
state saved before the settings were recorded resumes with the config as given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from looplm.errors import LooplmError
from looplm.train.saving import jsonable

if TYPE_CHECKING:
    from looplm.train.trainer import TrainConfig

# What shapes a run's trajectory (schedule, objective, data and its order, numerics): saved in trainer_state.pt and
# taken back on resume. The other fields are per command (device, micro_batch, save_every, stop_at, ...).
RUN_SETTINGS = ("stage", "steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                "betas", "clip", "beta", "bf16", "seed", "data_dir")
# Of those, what a resumed run may change: `steps` re-spans the cosine (a longer or shorter run; the recipe in
# scripts/train_tiny_ouro.sh does it), `data_dir` moves to another data directory with the same tokenizer (a
# curriculum phase, see looplm.train.data.build_arithmetic_phase).
CHANGEABLE_ON_RESUME = ("steps", "data_dir")
_FLAGS = {"warmup_steps": "--warmup", "data_dir": "--data", "bf16": "--bf16/--no-bf16", "betas": "betas", "clip": "clip"}


@dataclass
class Resume:
    state: dict  # trainer_state.pt as saved
    step: int  # the step it had reached
    changed: dict  # {setting: [saved, now]} of CHANGEABLE_ON_RESUME set to another value
    saved_settings: bool  # False: a state saved before settings were recorded (the config is used as given)


def load_state(state_file: Path) -> dict:
    if not state_file.exists():
        raise LooplmError(f"{state_file}: nothing to resume from; drop --resume to start fresh")
    with _unusable_state(state_file):
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        int(state["step"])
        if not isinstance(state.get("settings", {}), (dict, type(None))):
            raise TypeError(f"settings is a {type(state['settings']).__name__}")
    return state


def restore(state: dict, state_file: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a saved run's model, optimizer and RNG state."""
    with _unusable_state(state_file):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])


@contextlib.contextmanager
def _unusable_state(state_file: Path) -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # unpickling, a missing key, shapes of another model: all say the file is not this run's
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        raise LooplmError(f"{state_file}: cannot resume from it ({reason}); it is corrupt or from another model "
                          "or settings") from None


def run_settings(config: TrainConfig) -> dict:
    """The config's RUN_SETTINGS as plain values (what trainer_state.pt keeps); the data directory absolute, so a
    resume from another working directory finds it."""
    return {name: _setting(config, name) for name in RUN_SETTINGS}


def _setting(config: TrainConfig, name: str):  # noqa: ANN202
    value = getattr(config, name)
    if name == "data_dir" and value is not None:
        return str(Path(value).resolve())
    return jsonable(value)


def _from_saved(name: str, value):  # noqa: ANN001, ANN202
    return tuple(value) if name == "betas" else Path(value) if name == "data_dir" else value


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _as_flag(name: str, value: object) -> str:
    if name == "bf16":
        return "--bf16" if value else "--no-bf16"
    return f"{_flag(name)} {value}"


def resumed(config: TrainConfig, state: dict, state_file: Path) -> tuple[TrainConfig, Resume]:
    """The config a resume continues with: the saved settings, except those set on purpose to the same value or,
    for CHANGEABLE_ON_RESUME, to a new one; any other new value is an error (it would change the run midway)."""
    step = int(state["step"])
    saved = state.get("settings")
    if saved is None:  # the trainer warns that the settings are the command's
        if config.data_dir is None:
            raise LooplmError(f"give the run's data directory (--data): {state_file} does not record it")
        return config, Resume(state, step, {}, saved_settings=False)
    given = set(RUN_SETTINGS if config.explicit is None else config.explicit)
    updates, changed = {}, {}
    for name in RUN_SETTINGS:
        if name not in saved:  # a setting added after this state was saved: the config's
            continue
        old, new = saved[name], _setting(config, name)
        if name not in given or new is None:
            updates[name] = _from_saved(name, old)
        elif new != old and name in CHANGEABLE_ON_RESUME:
            changed[name] = [old, new]
        elif new != old:
            raise LooplmError(f"{_as_flag(name, new)} differs from the run's {_as_flag(name, old)} ({state_file}); "
                              f"{_flag(name)} cannot change on --resume: drop it to continue with "
                              f"{_as_flag(name, old)}, or start a new run (another --out)")
    return replace(config, **updates), Resume(state, step, changed, saved_settings=True)


def rng_state() -> dict:
    # Batches come from their own (seed, step) generator; this covers any other torch randomness.
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
