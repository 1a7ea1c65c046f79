"""Exit distribution over UT steps and the rule that picks a step per token.

Pure tensor functions; nothing here imports the model.

The gate gives lambda_t = sigmoid(gate(h_t)). The exit distribution is
p_t = lambda_t * prod_{s<t} (1 - lambda_s) for t < T, and the last step takes the
remaining mass. Like the reference, the recursion and the cumulative sum run in the
gate's dtype: in bf16 a CDF that rounds to 1.0 before the last step exits early even
at threshold 1.0 (spec 5.3). Pass `cdf_dtype=torch.float32` for the exact rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from looplm.errors import GenerationError


def exit_distribution(gate_lambda: torch.Tensor) -> torch.Tensor:
    """`[T, ...]` instantaneous exit probabilities -> `[T, ...]` exit pdf summing to 1 over T."""
    remaining = torch.ones_like(gate_lambda[0])
    pdf = []
    last = gate_lambda.shape[0] - 1
    for step, lam in enumerate(gate_lambda):
        if step < last:
            pdf.append(lam * remaining)
            remaining = remaining * (1.0 - lam)
        else:
            pdf.append(remaining)
    return torch.stack(pdf, dim=0)


def threshold_exit_steps(exit_probs: torch.Tensor, threshold: float, cdf_dtype: torch.dtype | None = None) -> torch.Tensor:
    """First step (0-based) whose cumulative exit mass reaches `threshold`, else the last.

    `exit_probs` is `[T, ...]`; the result is int64 `[...]`.
    """
    probs = exit_probs if cdf_dtype is None else exit_probs.to(cdf_dtype)
    reached = torch.cumsum(probs, dim=0) >= threshold
    last = exit_probs.shape[0] - 1
    first = torch.argmax(reached.to(torch.uint8), dim=0)
    return torch.where(reached.any(dim=0), first, torch.full_like(first, last))


def select_exit_steps(
    exit_probs: torch.Tensor,
    threshold: float | None,
    fixed_step: int | None = None,
) -> torch.Tensor:
    """Per-token exit step following the reference's priority: fixed step, threshold, last step."""
    steps = exit_probs.shape[0]
    shape = exit_probs.shape[1:]
    if fixed_step is not None and 0 <= fixed_step < steps:
        return torch.full(shape, fixed_step, dtype=torch.long, device=exit_probs.device)
    if threshold is not None:
        return threshold_exit_steps(exit_probs, threshold)
    return torch.full(shape, steps - 1, dtype=torch.long, device=exit_probs.device)


def mix_steps(exit_probs: torch.Tensor, per_step_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reference's weighted exit, sum over steps of p_t * logits_t: `[T, ...]` weights, T logits
    `[..., V]`, added one step at a time in the logits' dtype as the reference does."""
    mixed = None
    for weight, logits in zip(exit_probs, per_step_logits):
        term = logits * weight.unsqueeze(-1).to(logits.dtype)
        mixed = term if mixed is None else mixed + term
    return mixed


def gather_steps(per_step: torch.Tensor, exit_steps: torch.Tensor) -> torch.Tensor:
    """Pick `per_step[exit_steps[b, s], b, s]`: `[T, B, S, D]` x `[B, S]` -> `[B, S, D]`."""
    index = exit_steps.unsqueeze(0).unsqueeze(-1).expand(1, *exit_steps.shape, per_step.shape[-1])
    return torch.gather(per_step, 0, index).squeeze(0)


# ---------------------------------------------------------------------------------------------
# Exit policies for generation: small objects behind one interface.
#
# The engine runs the stack one UT step at a time. After each step it shows the policy the rows
# still running (`StepView`) and asks which of them exit now. With `skip_compute` the exited
# rows stop computing; without it every step runs and only the readout step is chosen, which is
# the reference's behaviour. Adding a policy means adding one class and one registry entry.
# ---------------------------------------------------------------------------------------------


@dataclass
class StepView:
    step: int  # 0-based step just computed
    total: int  # steps available
    rows: torch.Tensor  # (N,) batch rows still running
    batch_size: int
    gate_lambda: torch.Tensor | None  # (N,) sigmoid of the gate, model dtype; None without a gate
    logits: torch.Tensor | None  # (N, V) this step's logits, when the policy asks for them


class ExitPolicy:
    """Base class. `exits` returns a bool `(N,)` mask of the rows that stop after this step."""

    name = "base"
    needs_logits = False  # the engine computes lm_head at every step only for policies that read it
    can_skip = True  # False: every step must run (the readout mixes all steps)

    def reset(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Called before the first step of every new token."""

    def exits(self, view: StepView) -> torch.Tensor:
        raise NotImplementedError

    def readout(self, per_step_logits: list[torch.Tensor]) -> torch.Tensor | None:
        """Custom readout from all steps' logits `[N, V]`; None means "the exit step's logits"."""
        return None


class LastPolicy(ExitPolicy):
    """Run every step and read the last (vLLM's behaviour)."""

    name = "last"

    def exits(self, view: StepView) -> torch.Tensor:
        return torch.full((view.rows.numel(),), view.step == view.total - 1, device=view.rows.device)


class FixedPolicy(ExitPolicy):
    """Exit after `n` steps (1-based)."""

    name = "fixed"

    def __init__(self, n: int) -> None:
        self.n = n

    def exits(self, view: StepView) -> torch.Tensor:
        done = view.step >= min(self.n, view.total) - 1
        return torch.full((view.rows.numel(),), done, device=view.rows.device)


class GatePolicy(ExitPolicy):
    """The reference rule: exit at the first step whose cumulative exit mass reaches `threshold`.

    The running product and the cumulative sum are taken in the gate's dtype, over the same
    values and in the same order as `exit_distribution` + `threshold_exit_steps`, so the chosen
    steps are identical to the reference's.
    """

    name = "gate"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def reset(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.remaining = torch.ones(batch_size, dtype=dtype, device=device)
        self.pdf: list[torch.Tensor] = []

    def exits(self, view: StepView) -> torch.Tensor:
        if view.gate_lambda is None or view.step == view.total - 1:
            return torch.full((view.rows.numel(),), view.step == view.total - 1, device=view.rows.device)
        rows, lam = view.rows, view.gate_lambda
        p = torch.zeros_like(self.remaining)
        p[rows] = lam * self.remaining[rows]
        self.remaining[rows] = self.remaining[rows] * (1.0 - lam)
        self.pdf.append(p)
        cdf = torch.cumsum(torch.stack(self.pdf), dim=0)[-1]
        return cdf[rows] >= self.threshold


class ConfidencePolicy(ExitPolicy):
    """Exit when the step's top-token probability is at least `threshold`."""

    name = "confidence"
    needs_logits = True

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def exits(self, view: StepView) -> torch.Tensor:
        top = torch.softmax(view.logits.float(), dim=-1).amax(dim=-1)
        return (top >= self.threshold) | (view.step == view.total - 1)


class KLPolicy(ExitPolicy):
    """Exit when KL(p_t || p_{t-1}) between successive steps' next-token distributions <= threshold."""

    name = "kl"
    needs_logits = True

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def reset(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.previous: torch.Tensor | None = None  # (B, V) log-probs of the previous step

    def exits(self, view: StepView) -> torch.Tensor:
        logp = torch.log_softmax(view.logits.float(), dim=-1)
        if self.previous is None:
            self.previous = torch.zeros(view.batch_size, logp.shape[-1], device=logp.device)
            done = torch.zeros(view.rows.numel(), dtype=torch.bool, device=logp.device)
        else:
            kl = (logp.exp() * (logp - self.previous[view.rows])).sum(dim=-1)
            done = kl <= self.threshold
        self.previous[view.rows] = logp
        return done | (view.step == view.total - 1)


class WeightedPolicy(ExitPolicy):
    """The reference's mixture: sum over steps of p_t * logits_t (all steps run; saves nothing)."""

    name = "weighted"
    needs_logits = True
    can_skip = False

    def reset(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.gate = GatePolicy(threshold=2.0)  # never fires; used for its exit distribution
        self.gate.reset(batch_size, dtype, device)
        self.lambdas: list[torch.Tensor] = []

    def exits(self, view: StepView) -> torch.Tensor:
        if view.gate_lambda is not None:
            self.lambdas.append(view.gate_lambda)
        return torch.full((view.rows.numel(),), view.step == view.total - 1, device=view.rows.device)

    def readout(self, per_step_logits: list[torch.Tensor]) -> torch.Tensor | None:
        if not self.lambdas:  # no gate: the last step is the whole mass
            return per_step_logits[-1]
        return mix_steps(exit_distribution(torch.stack(self.lambdas)), per_step_logits)


POLICY_NAMES = ("last", "gate", "confidence", "kl", "fixed", "weighted")


def check_threshold(name: str, threshold: float) -> None:
    """A GenerationError unless `threshold` means something to the rule `name`: a cumulative exit
    mass in (0, 1] (gate), a probability in [0, 1] (confidence; 0 exits after the first loop), a
    KL divergence >= 0 (kl)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise GenerationError(f"exit_threshold must be a number, got {threshold!r}")
    if name == "kl":
        if not 0.0 <= threshold < float("inf"):
            raise GenerationError(f"the kl exit threshold is a KL divergence, >= 0; got {threshold!r}")
    elif name == "confidence":
        if not 0.0 <= threshold <= 1.0:
            raise GenerationError(f"the confidence exit threshold is a probability in [0, 1], got {threshold!r}")
    elif not 0.0 < threshold <= 1.0:
        raise GenerationError(f"exit_threshold must be in (0, 1], got {threshold!r}")


def check_exit_options(policy: str | None, threshold: float | None) -> None:
    """A GenerationError for a threshold the policy would not read (`last`, `fixed`, `weighted`:
    it used to be ignored in silence) or one outside the range of the rule that reads it. None
    is the reference's default rule, the gate."""
    if threshold is None:
        return
    if policy in ("last", "fixed", "weighted"):
        raise GenerationError(f"exit_policy '{policy}' reads no threshold; leave out exit_threshold ({threshold})")
    check_threshold(policy if policy in ("confidence", "kl") else "gate", threshold)


def make_policy(
    name: str | None,
    threshold: float | None,
    steps: int,
    config_threshold: float | None,
    config_fixed_step: int | None = None,
) -> ExitPolicy:
    """Build a policy from plain arguments.

    `name=None` keeps the reference's default: a fixed step if the config sets
    `early_exit_step`, else the gate rule at `threshold` (or the config's threshold), else last.
    A `threshold` given is checked for the rule that reads it (`check_threshold`).
    """
    if threshold is not None and name in (None, "gate", "confidence", "kl"):
        check_threshold(name or "gate", threshold)
    if name is None:
        if config_fixed_step is not None and 0 <= config_fixed_step < steps:
            return FixedPolicy(config_fixed_step + 1)
        chosen = threshold if threshold is not None else config_threshold
        return GatePolicy(chosen) if chosen is not None else LastPolicy()
    if name not in POLICY_NAMES:
        raise GenerationError(f"unknown exit policy '{name}' (choose from {', '.join(POLICY_NAMES)})")
    if name in ("gate", "confidence", "kl"):
        default = {"gate": config_threshold if config_threshold is not None else 1.0, "confidence": 0.9, "kl": 0.01}
        value = default[name] if threshold is None else threshold
        return {"gate": GatePolicy, "confidence": ConfidencePolicy, "kl": KLPolicy}[name](value)
    if name == "fixed":
        return FixedPolicy(steps)
    return WeightedPolicy() if name == "weighted" else LastPolicy()
