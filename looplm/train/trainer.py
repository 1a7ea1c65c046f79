"""The training loop for Ouro-architecture models: Stage I (LM + gate) or Stage II (gate only).

Contract:
- `TrainConfig` holds every knob; `train(config)` runs the loop and returns the final log row.
- One optimizer step sees `batch_size` sequences (the *global* batch) of `seq_len` tokens,
  split evenly over the processes and, inside a process, into micro-batches of `micro_batch`.
  The data of step s depends only on (seed, s), so a resumed run or an N-process run sees the
  same global batch as a single-process run; losses are means over the counted tokens of the
  whole global batch (all of them, unless a data source has a loss mask, e.g. answers only).
- Distributed: under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DDP, gloo on CPU and
  nccl on GPU. Only rank 0 writes files.
- Output directory = an HF-layout checkpoint (`looplm.train.saving`) loadable by `looplm.load`,
  plus `trainer_state.pt` (fp32 weights, AdamW state, step, RNG and the run's `RUN_SETTINGS`) for
  `resume`, `train_log.jsonl` (a start event, one row per step, a resume event per resume) and
  `train_loss.png`.
- Resume continues the run with its saved settings (`looplm.train.resume`). The model comes from
  the output directory's config.json unless `model_config` / `init_from` is given.
- AdamW (betas 0.9/0.95), linear warmup then cosine decay to `min_lr_ratio * lr`, gradient
  clipping at `clip`, bf16 autocast (CPU and CUDA) and optional per-layer activation
  checkpointing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from looplm.config import OuroConfig
from looplm.cpu_load import adjust_threads
from looplm.devices import resolve_device
from looplm.errors import LooplmError
from looplm.models.ouro import OuroForCausalLM
from looplm.output_files import make_output_dir
from looplm.tokenizer import Tokenizer
from looplm.train.data import TokenBatches
from looplm.train.objective import per_step_token_loss, stage1_loss, stage2_loss
from looplm.train.resume import Resume, load_state, restore, resumed, rng_state, run_settings
from looplm.train.saving import STATE_FILE, atomic_write, jsonable, save_checkpoint

LOG_FILE, PLOT_FILE = "train_log.jsonl", "train_loss.png"
RUN_FILES = (STATE_FILE, LOG_FILE, "config.json", "model.safetensors")  # an earlier run (or model) in out_dir

@dataclass
class TrainConfig:
    data_dir: Path | None  # None only with resume: the saved run's
    out_dir: Path
    model_config: dict | None = None  # config.json dict for a new model (vocab_size defaults to the tokenizer's)
    init_from: Path | None = None  # or start from this HF-layout checkpoint
    stage: int = 1  # 1: LM + gate (spec 8.1); 2: gate only, LM frozen (spec 8.2)
    steps: int = 100  # optimizer steps
    batch_size: int = 16  # global sequences per optimizer step
    micro_batch: int = 0  # sequences per forward pass in one process (0: all of this process's share)
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    beta: float = 0.1  # entropy weight of Stage I
    bf16: bool = True
    grad_checkpointing: bool = False
    save_every: int = 0  # 0: save only at the end
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace an earlier run's files in out_dir
    stop_at: int | None = None  # end after this step (checkpoint saved), as if interrupted; --resume continues
    device: str = "auto"
    progress: bool = True
    extra: dict = field(default_factory=dict)  # recorded in the log header, e.g. a recipe name
    # With resume: the fields set on purpose (the command line's flags); the other RUN_SETTINGS take the saved
    # run's values. None: every field counts as set (the Python API).
    explicit: tuple[str, ...] | None = None

    def check(self) -> None:
        """Settings a run cannot start with, each a one-line error before any work."""
        if self.resume and self.overwrite:
            raise LooplmError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        if self.model_config is not None and self.init_from is not None:
            raise LooplmError("--model-config (a new model) and --init-from (a checkpoint) both give the model: "
                              "give one of them")
        if self.data_dir is None and not self.resume:
            raise LooplmError("give a data directory (--data)")
        bounds = [("stage", self.stage in (1, 2), "1 or 2"), ("steps", self.steps >= 1, "at least 1"),
                  ("batch_size", self.batch_size >= 1, "at least 1"), ("micro_batch", self.micro_batch >= 0, ">= 0"),
                  ("seq_len", self.seq_len >= 2, "at least 2"), ("lr", self.lr > 0, "> 0"),
                  ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                  ("warmup_steps", self.warmup_steps >= 0, ">= 0"), ("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("beta", self.beta >= 0, ">= 0"), ("clip", self.clip > 0, "> 0"),
                  ("save_every", self.save_every >= 0, ">= 0"),
                  ("stop_at", self.stop_at is None or self.stop_at >= 1, "at least 1")]
        for name, ok, expected in bounds:
            if not ok:
                raise LooplmError(f"{name} must be {expected}, got {getattr(self, name)!r}")


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from `lr` down to `min_lr_ratio * lr` at `steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


def init_weights(model: OuroForCausalLM, std: float = 0.02) -> None:
    """Normal(0, std) matrices, output projections scaled by 1/sqrt(2 * layer passes), gate bias 0, norms 1."""
    passes = model.config.num_hidden_layers * model.config.total_ut_steps
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            elif name.endswith("early_exit_gate.bias"):
                param.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                param.normal_(0.0, std / math.sqrt(2 * passes))
            else:
                param.normal_(0.0, std)


def enable_grad_checkpointing(model: OuroForCausalLM) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them.

    Done here, by wrapping each layer's forward, so the model file stays free of training flags.
    """
    for layer in model.model.layers:
        plain = layer.forward

        def forward(*args, _plain=plain, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


class StepLogits(nn.Module):
    """What DDP wraps: tokens `[B, S]` -> per-step logits `[T, B, S, V]` and gate logits `[T, B, S]`.

    The gate logits are recomputed from the normed per-step states (the model exposes only
    sigmoid(gate)); Stage II runs the frozen LM without autograd and trains the gate alone.
    """

    def __init__(self, model: OuroForCausalLM, stage: int) -> None:
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
        with torch.set_grad_enabled(self.stage == 1 and torch.is_grad_enabled()):
            out = self.model.run_steps(input_ids, positions)
            logits = self.model.lm_head(out.hidden_states)  # (T, B, S, V)
        gate_logits = self.model.model.early_exit_gate(out.hidden_states.detach() if self.stage == 2 else
                                                       out.hidden_states).squeeze(-1)  # (T, B, S)
        return logits, gate_logits


# -- distributed helpers -------------------------------------------------------------------------


def _setup_distributed(device_option: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(device_option)
    use_cuda = device.type == "cuda"
    if use_cuda:
        if device.index is None:  # each DDP process takes the GPU of its local rank
            device = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def _mean_across(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return value


# -- model / state -------------------------------------------------------------------------------


def _build_model(config: TrainConfig, tokenizer: Tokenizer) -> tuple[OuroForCausalLM, dict]:
    if config.init_from is not None:
        from looplm.loading import load

        config_file = Path(config.init_from) / "config.json"
        if not config_file.is_file():
            raise LooplmError(f"--init-from {config.init_from}: not a checkpoint directory with a config.json "
                              "(training starts from a looplm or HF-layout Ouro checkpoint)")
        model = load(config.init_from, dtype="float32")  # checks config.json and the weights
        raw = json.loads(config_file.read_text())
        if "quantization_config" in raw:  # its saved checkpoints would not load
            raise LooplmError(f"--init-from {config.init_from}: a quantized checkpoint cannot be trained (its "
                              "int8/int4 weights are not parameters); start from the full-precision checkpoint")
        model.tokenizer = None
        return model.train(), raw
    if config.model_config is None:
        if config.resume:
            return _run_model(Path(config.out_dir))
        raise LooplmError("give a model config (--model-config) for a new model, or a checkpoint (--init-from)")
    raw = {"architectures": ["OuroForCausalLM"], "model_type": "ouro", **config.model_config}
    raw.setdefault("vocab_size", tokenizer.vocab_size)
    if raw["vocab_size"] < tokenizer.vocab_size:
        raise LooplmError(f"vocab_size {raw['vocab_size']} is smaller than the tokenizer's {tokenizer.vocab_size}")
    if tokenizer.bos_id is not None:
        raw.setdefault("bos_token_id", tokenizer.bos_id)
    raw.setdefault("eos_token_id", tokenizer.eos_id)
    raw.setdefault("pad_token_id", tokenizer.pad_id)
    raw.setdefault("torch_dtype", "bfloat16")
    model = OuroForCausalLM(OuroConfig.from_dict(raw, source="model config"))
    init_weights(model)
    return model, raw


def _run_model(out: Path) -> tuple[OuroForCausalLM, dict]:
    """The architecture of the run being resumed, from its config.json (the weights come from its state)."""
    config_file = out / "config.json"
    if not config_file.is_file():
        raise LooplmError(f"{config_file} is missing: give the run's model config (--model-config) to resume it")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LooplmError(f"{config_file}: cannot read it ({exc}); give the run's --model-config to resume") from None
    return OuroForCausalLM(OuroConfig.from_dict(raw, source=str(config_file))), raw


def _check_span(config: TrainConfig, done: int) -> None:
    """--steps and --stop-at against each other and against the step a resumed run has reached."""
    if done >= config.steps:
        raise LooplmError(f"{config.out_dir} is at step {done}, already at --steps {config.steps}: nothing to train; "
                          f"give --steps above {done} to continue the run")
    if config.stop_at is not None and config.stop_at > config.steps:
        raise LooplmError(f"--stop-at {config.stop_at} is past --steps {config.steps}; the run would end first")
    if config.stop_at is not None and config.stop_at <= done:
        raise LooplmError(f"--stop-at {config.stop_at}: {config.out_dir} is already at step {done}")


def _warn_about(config: TrainConfig, resume: Resume | None) -> None:
    """Warnings for settings that run but may not do what was meant."""
    if config.warmup_steps >= config.steps:
        _warn(f"--warmup {config.warmup_steps} is not below --steps {config.steps}: the learning rate rises for the "
              f"whole run (to {lr_at(config.steps - 1, config):.3g} of the peak {config.lr:.3g}) and never decays")
    if resume is None:
        return
    if not resume.saved_settings:
        _warn(f"{Path(config.out_dir) / STATE_FILE} holds no training settings (saved by an older looplm): resuming "
              "with this command's settings as given or defaulted; they must match the run's (--lr, --warmup, "
              "--steps, --seed, ...)")
    if "steps" in resume.changed:
        before = lr_at(resume.step, replace(config, steps=resume.changed["steps"][0]))
        after = lr_at(resume.step, config)
        if not math.isclose(before, after, rel_tol=1e-9):
            _warn(f"--steps {config.steps} (the run was set for {resume.changed['steps'][0]}) re-spans the cosine: "
                  f"the learning rate of step {resume.step + 1} is {after:.3g}, not {before:.3g}")
    if "data_dir" in resume.changed:
        old, new = resume.changed["data_dir"]
        _warn(f"--data {new}: the run trained on {old} so far; its batches from step {resume.step + 1} on come from "
              "the new directory (it must share the run's tokenizer)")


def _warn(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line
        warnings.warn(message, stacklevel=4)  # at the caller of train()


def _params_for_decay(model: nn.Module) -> list[dict]:
    """Weight decay on matrices only (not norms, biases or the gate bias)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- the loop ------------------------------------------------------------------------------------


def train(config: TrainConfig) -> dict:
    config.check()
    _check_fresh_out(Path(config.out_dir), config)  # before any process group: every rank fails alike
    resume = None
    if config.resume:
        state_file = Path(config.out_dir) / STATE_FILE
        config, resume = resumed(config, load_state(state_file), state_file)
    _check_span(config, resume.step if resume else 0)
    _warn_about(config, resume)
    rank, world, device = _setup_distributed(config.device)
    if device.type == "cpu":
        # Adam's second moments and small gradients go subnormal within a few steps; x86 CPUs then
        # run those ops ~10x slower. Flushing them to zero changes nothing that matters here.
        torch.set_flush_denormal(True)
    try:
        return _train(config, rank, world, device, resume)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _check_fresh_out(out: Path, config: TrainConfig) -> None:
    """A fresh run must not write over an earlier one: its checkpoint, optimizer state and log would be lost."""
    if config.resume or config.overwrite:
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found:
        raise LooplmError(f"{out} already holds a run ({', '.join(found)}): --resume continues it, --overwrite "
                          "starts a new one there, or choose another --out")


def _train(config: TrainConfig, rank: int, world: int, device: torch.device, resume: Resume | None) -> dict:
    out = Path(config.out_dir)
    if config.batch_size % world:
        raise LooplmError(f"batch_size {config.batch_size} is not a multiple of the {world} processes")
    local_batch = config.batch_size // world
    micro = config.micro_batch or local_batch
    if local_batch % micro:
        raise LooplmError(f"micro_batch {micro} does not divide the per-process batch {local_batch}")
    accum = local_batch // micro

    batches = TokenBatches(Path(config.data_dir), config.seq_len, config.seed)  # says what a data dir needs
    tokenizer = Tokenizer.from_dir(config.data_dir)
    torch.manual_seed(config.seed)
    model, raw_config = _build_model(config, tokenizer)
    if config.seq_len > model.config.max_position_embeddings:  # positions past it were never meant to be used
        raise LooplmError(f"--seq-len {config.seq_len} is longer than the model's max_position_embeddings "
                          f"{model.config.max_position_embeddings}; give a --seq-len up to it")
    if batches.max_token_id >= model.config.vocab_size:  # the embedding lookup would fail mid-run
        raise LooplmError(f"{config.data_dir} holds token id {batches.max_token_id}, past the model's vocab_size "
                          f"{model.config.vocab_size}; was it built with another tokenizer?")
    if config.stage == 2:
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("model.early_exit_gate.")
    model.to(device)
    if config.grad_checkpointing and config.stage == 1:
        enable_grad_checkpointing(model)
    optimizer = torch.optim.AdamW(
        _params_for_decay(model), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
        foreach=device.type == "cuda",
    )
    start_step = 0
    if resume is not None:
        restore(resume.state, out / STATE_FILE, model, optimizer)
        start_step, resume.state = resume.step, {}  # the copy of the weights is not needed any more
    module: nn.Module = StepLogits(model, config.stage)
    if world > 1:
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    if rank == 0:
        make_output_dir(out, "--out")
        if resume is not None:
            with _disk_errors(out, "the training log", start_step):
                _log_resume(out / LOG_FILE, config, resume, world)
        if start_step == 0:
            header = {"event": "start", "world_size": world, "config": jsonable(asdict(config)), "model": raw_config,
                      "parameters": sum(p.numel() for p in model.parameters())}
            (out / LOG_FILE).write_text(json.dumps(header) + "\n")
    progress = _Progress(config.steps, start_step, enabled=config.progress and rank == 0)
    row: dict = {}
    started = time.perf_counter()
    with _StopRequest() as stop:  # Ctrl-C: finish the step, save, stop
        for step in range(start_step, config.steps):
            adjust_threads()  # follows other processes' load, when the command chose the threads
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tokens, counted = batches.global_batch_with_mask(step, config.batch_size)
            # Every piece (process x micro-batch) divides by its share of the global batch's count, so
            # the pieces' losses average (DDP) and add up (accumulation) to the global masked mean.
            count = float(counted[:, 1:].sum().clamp_min(1)) / (world * accum)
            mine = slice(rank * local_batch, (rank + 1) * local_batch)
            tokens, counted = tokens[mine], counted[mine]
            sums: dict[str, torch.Tensor] = {}
            for index in range(accum):
                chunk = tokens[index * micro : (index + 1) * micro].to(device)
                inputs, targets = chunk[:, :-1], chunk[:, 1:]
                mask = counted[index * micro : (index + 1) * micro, 1:].to(device)
                # DDP all-reduces only on the last micro-batch.
                sync = index == accum - 1 or world == 1
                autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
                with _maybe_no_sync(module, sync), autocast:
                    logits, gate_logits = module(inputs)
                    parts = _loss(config, logits, gate_logits, targets, mask, count)
                (parts["loss"] / accum).backward()
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0) + value.detach().float() / accum
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats = {k: _mean_across(v.to(device), world).cpu() for k, v in sums.items()}
            row = {"step": step + 1, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens": (step + 1) * config.batch_size * config.seq_len,
                   "elapsed_s": round(time.perf_counter() - started, 2)}
            row.update({k: (v.tolist() if v.dim() else float(v)) for k, v in stats.items()})
            if rank == 0:
                with _disk_errors(out, "the training log", row["step"]):
                    with (out / LOG_FILE).open("a") as f:
                        f.write(json.dumps(row) + "\n")
            progress.update(row)
            last = step + 1 == config.steps or step + 1 == config.stop_at or stop.agreed(world, device)
            if (config.save_every and (step + 1) % config.save_every == 0) or last:
                if rank == 0:
                    with _disk_errors(out, "the checkpoint", step + 1):
                        save_checkpoint(out, model, raw_config, tokenizer, optimizer, step + 1, rng_state(),
                                        run_settings(config))
                    plot_log(out / LOG_FILE, out / PLOT_FILE)
                if world > 1:
                    dist.barrier()
            if last:
                break
    progress.close()
    if stop.requested:
        if rank == 0:
            print(f"stopped after step {row.get('step', start_step)}: checkpoint in {out}; --resume continues",
                  file=sys.stderr)
        raise KeyboardInterrupt
    return row


@contextlib.contextmanager
def _disk_errors(out: Path, what: str, step: int) -> Iterator[None]:
    """A failed write (a full disk, say) as one error line that says what the run still holds."""
    try:
        yield
    except OSError as exc:
        raise LooplmError(f"could not write {what} of step {step} in {out} ({exc.strerror or exc}); the last "
                          "checkpoint saved there is intact, and --resume continues from it") from None


def _loss(config: TrainConfig, logits: torch.Tensor, gate_logits: torch.Tensor, targets: torch.Tensor,
          mask: torch.Tensor, count: float) -> dict:
    if config.stage == 1:
        result = stage1_loss(logits, gate_logits, targets, mask=mask, beta=config.beta, count=count)
        return {"loss": result.loss, "expected_ce": result.expected_ce, "entropy": result.entropy,
                "step_ce": result.step_ce, "exit_probs": result.exit_probs}
    token_loss = per_step_token_loss(logits.detach(), targets)
    result = stage2_loss(gate_logits, token_loss, mask=mask, count=count)
    weights = mask.to(token_loss.dtype)
    return {"loss": result.loss, "step_bce": result.step_bce, "continue_target": result.continue_target,
            "step_ce": (token_loss * weights).sum(dim=(1, 2)) / count}


class _StopRequest:
    """Ctrl-C during training: the first one lets the current step finish, then the loop saves a
    checkpoint and stops (so no finished step is lost); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        print("\ninterrupted: finishing this step, then saving a checkpoint (Ctrl-C again stops at once)",
              file=sys.stderr)

    def agreed(self, world: int, device: torch.device) -> bool:
        """Whether any process was asked to stop (every process must stop after the same step)."""
        if world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.requested = bool(flag.item())
        return self.requested

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)


class _maybe_no_sync:
    """`module.no_sync()` on micro-batches that should not all-reduce yet (DDP only)."""

    def __init__(self, module: nn.Module, sync: bool) -> None:
        self.ctx = module.no_sync() if (not sync and hasattr(module, "no_sync")) else None

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


class _Progress:
    """A rich progress bar showing the latest loss (rank 0 only)."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=done, info="")
            self.bar.start()

    def update(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=row["step"], info=f"loss {row['loss']:.4f} lr {row['lr']:.2e}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _log_lines(path: Path) -> list[tuple[str, dict]]:
    """Each line of a train_log.jsonl with its row. A cut-short last line (what a crash or a full disk leaves
    mid-write) is dropped; a broken line before it is an error."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((number for number, line in enumerate(lines, 1) if line.strip()), default=0)
    rows = []
    for number, line in enumerate(lines[:last], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            if number == last:
                break
            raise LooplmError(f"{path}:{number} is not a JSON row; the training log is corrupt (only its last line "
                              "may be cut short): repair or remove that line")
        rows.append((line, row))
    return rows


def _log_resume(log: Path, config: TrainConfig, resume: Resume, world: int) -> None:
    """Drop the rows logged after the checkpoint by an interrupted run (and a cut-short last line), then record
    the resume: its step and the settings it continues with."""
    kept = [line for line, row in _log_lines(log) if row.get("step", 0) <= resume.step] if log.exists() else []
    event = {"event": "resume", "step": resume.step, "world_size": world, "config": jsonable(asdict(config)),
             "changed": resume.changed, "saved_settings": resume.saved_settings}
    atomic_write(log, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept) + json.dumps(event) + "\n"))


def read_log(path: Path) -> list[dict]:
    """The per-step rows of a train_log.jsonl (start and resume events are skipped, a cut-short last line too)."""
    return [row for _, row in _log_lines(Path(path)) if "step" in row and "event" not in row]


def plot_log(log: Path, png: Path) -> None:
    """Loss per step (and each UT step's cross-entropy) to a PNG; skipped with a note if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; {png.name} not written (pip install matplotlib)")
        return
    rows = read_log(log)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], label="loss", color="black", linewidth=1.2)
    if "step_ce" in rows[0]:
        for t in range(len(rows[0]["step_ce"])):
            ax.plot(steps, [r["step_ce"][t] for r in rows], label=f"CE at UT step {t + 1}", linewidth=0.8, alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.set_title(f"{log.parent.name}: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
