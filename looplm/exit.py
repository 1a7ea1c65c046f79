"""Exit distribution over UT steps and the rule that picks a step per token.

Pure tensor functions; nothing here imports the model.

The gate gives lambda_t = sigmoid(gate(h_t)). The exit distribution is
p_t = lambda_t * prod_{s<t} (1 - lambda_s) for t < T, and the last step takes the
remaining mass. Like the reference, the recursion and the cumulative sum run in the
gate's dtype: in bf16 a CDF that rounds to 1.0 before the last step exits early even
at threshold 1.0 (spec 5.3). Pass `cdf_dtype=torch.float32` for the exact rule.
"""

from __future__ import annotations

import torch


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


def gather_steps(per_step: torch.Tensor, exit_steps: torch.Tensor) -> torch.Tensor:
    """Pick `per_step[exit_steps[b, s], b, s]`: `[T, B, S, D]` x `[B, S]` -> `[B, S, D]`."""
    index = exit_steps.unsqueeze(0).unsqueeze(-1).expand(1, *exit_steps.shape, per_step.shape[-1])
    return torch.gather(per_step, 0, index).squeeze(0)
