"""`looplm train`: Stage I (LM + exit gate) or Stage II (gate only) training of an Ouro-layout model.

Runs as one process or under `torchrun --nproc-per-node N` (DDP). The work is in `looplm.train`.
`--resume` continues a run with the settings it saved: the flags given on its command line are
passed on as `TrainConfig.explicit`, the rest take the saved values.
"""

import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer

from looplm.cli import common
from looplm.errors import LooplmError


def _opt(help: str, *names: str):  # noqa: A002, ANN202
    return typer.Option(*names, help=help)


# The options whose TrainConfig field has another name.
_FIELDS = {"data": "data_dir", "out": "out_dir", "warmup": "warmup_steps"}


# --model-config's one named architecture, the embedded model's, so that a new run needs no file
# from the repository.
_PRESET = "tiny-ouro"
_TOKENIZER_KEYS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")  # the run's tokenizer sets these


def _read_model_config(value: Path) -> dict:
    if str(value) == _PRESET and not value.exists():
        from looplm.default_model import PACKAGED_DIR

        raw = json.loads((PACKAGED_DIR / "config.json").read_text())
        return {key: item for key, item in raw.items() if key not in _TOKENIZER_KEYS}
    try:
        return json.loads(value.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LooplmError(f"{value}: cannot read the model config ({exc})") from None


def _explicit(ctx: typer.Context) -> tuple[str, ...]:
    """The TrainConfig fields whose options the command line gave (not left at their defaults)."""
    from looplm.train.trainer import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    # By name: newer typer releases carry their own copy of click, and of its ParameterSource.
    sources = {name: getattr(ctx.get_parameter_source(name), "name", "DEFAULT") for name in ctx.params}
    given = [_FIELDS.get(name, name) for name, source in sources.items() if source not in ("DEFAULT", "DEFAULT_MAP")]
    return tuple(name for name in given if name in names)


@common.app.command()
def train(
    ctx: typer.Context,
    out: Annotated[Path, _opt("Output directory: HF-layout checkpoint, trainer_state.pt, log and plot.")],
    data: Annotated[Optional[Path], _opt("Data directory (tokenizer + token files + data.json; see "
                                         "looplm.train.data). With --resume: the run's unless given (a new one "
                                         "must share its tokenizer).")] = None,
    model_config: Annotated[Optional[Path], _opt("JSON model config for a new model, or 'tiny-ouro': the "
                                                 "embedded model's architecture (token ids and vocabulary from "
                                                 "the data's tokenizer).")] = None,
    init_from: Annotated[Optional[Path], _opt("Start from this checkpoint directory instead.")] = None,
    stage: Annotated[int, _opt("1: LM + gate (expected loss - beta * entropy); 2: gate only, LM frozen.")] = 1,
    steps: Annotated[int, _opt("Optimizer steps; the cosine ends there. With --resume it may change (a longer "
                               "or shorter run).")] = 100,
    batch_size: Annotated[int, _opt("Global sequences per optimizer step (all processes).")] = 16,
    micro_batch: Annotated[int, _opt("Sequences per forward pass per process (0 = all of its share).")] = 0,
    seq_len: Annotated[int, _opt("Tokens per sequence.")] = 256,
    lr: Annotated[float, _opt("Peak learning rate.")] = 1e-3,
    min_lr_ratio: Annotated[float, _opt("Final learning rate as a fraction of the peak (cosine).")] = 0.1,
    warmup: Annotated[int, _opt("Linear warmup steps.")] = 50,
    weight_decay: Annotated[float, _opt("AdamW weight decay (matrices only).")] = 0.1,
    beta: Annotated[float, _opt("Stage I entropy weight.")] = 0.1,
    bf16: Annotated[bool, _opt("bf16 autocast.", "--bf16/--no-bf16")] = True,
    grad_checkpointing: Annotated[bool, _opt("Recompute layer activations in backward.", "--grad-checkpointing")] = False,
    save_every: Annotated[int, _opt("Save a checkpoint every N steps (0 = only at the end).")] = 0,
    seed: Annotated[int, _opt("Seed for init and data order.")] = 0,
    resume: Annotated[bool, _opt("Continue the run in OUT (trainer_state.pt) with its saved settings and model: "
                                 "flags not given take the run's values; one that differs is an error, except "
                                 "--steps, --data and the per-command ones (--stop-at, --save-every, "
                                 "--micro-batch, --device, ...).", "--resume")] = False,
    overwrite: Annotated[bool, _opt("Start a new run in an OUT that holds an earlier one, replacing its files.",
                                    "--overwrite")] = False,
    stop_at: Annotated[Optional[int], _opt("Stop after this step (checkpoint saved); --resume continues.")] = None,
    device: common.Device = "auto",
    threads: common.Threads = None,
    progress: Annotated[bool, _opt("Show a progress bar.", "--progress/--no-progress")] = True,
) -> None:
    """Train an Ouro-architecture model with the LoopLM objective; loss per step goes to OUT/train_log.jsonl."""
    from looplm.train.trainer import TrainConfig
    from looplm.train.trainer import train as run

    raw = None if model_config is None else _read_model_config(model_config)
    config = TrainConfig(
        data_dir=data, out_dir=out, model_config=raw, init_from=init_from, stage=stage, steps=steps,
        batch_size=batch_size, micro_batch=micro_batch, seq_len=seq_len, lr=lr, min_lr_ratio=min_lr_ratio,
        warmup_steps=warmup, weight_decay=weight_decay, beta=beta, bf16=bf16, grad_checkpointing=grad_checkpointing,
        save_every=save_every, seed=seed, resume=resume, overwrite=overwrite, stop_at=stop_at, device=device,
        progress=progress, explicit=_explicit(ctx),
    )
    common.set_threads(threads)
    final = run(config)
    if final and os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line
        common.stderr().print(f"step {final['step']}: loss {final['loss']:.4f}; checkpoint in {out}")
