"""LoopLM training objectives (spec section 8), as pure functions of per-step tensors.

Shapes: T UT steps, B rows, S positions, V vocab. `targets` are the next-token ids `[B, S]`
and `mask` `[B, S]` marks positions that count (None: all). Every reduction is a sum over
counted positions divided by `count` (default: how many this batch counts). A trainer that
splits one batch over processes or micro-batches passes `count` = the whole batch's count /
the number of pieces, so the pieces' losses average back to the whole batch's mean.

- Stage I: sum_t p(t|x) * L_t  -  beta * H(p), per position, with p the exit distribution.
- Stage II: the LM is frozen; the gate at step t >= 2 learns, by binary cross-entropy,
  the target continuation probability w_t = sigmoid(k * (max(0, L_{t-1} - L_t) - gamma)).

The exit distribution is computed in fp32 from the gate *logits* in log space
(log lambda = logsigmoid(z), log(1 - lambda) = logsigmoid(-z)), so saturated gates give
finite losses and gradients. It equals `looplm.exit.exit_distribution(sigmoid(z))`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

STAGE2_K = 50.0
STAGE2_GAMMA = 0.005


def per_step_token_loss(step_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every step's logits `[T, B, S, V]` against `targets` `[B, S]` -> `[T, B, S]`, fp32."""
    steps = step_logits.shape[0]
    flat = step_logits.float().reshape(-1, step_logits.shape[-1])  # (T*B*S, V)
    flat_targets = targets.unsqueeze(0).expand(steps, *targets.shape).reshape(-1)
    return F.cross_entropy(flat, flat_targets, reduction="none").view(steps, *targets.shape)


def exit_log_probs(gate_logits: torch.Tensor) -> torch.Tensor:
    """log p_t `[T, ...]` from gate logits `[T, ...]`: log lambda_t + sum_{j<t} log(1 - lambda_j); the last step
    takes the remaining mass (its own gate is ignored), as in spec 5.1."""
    z = gate_logits.float()
    log_exit = F.logsigmoid(z)  # log lambda_t
    log_stay = F.logsigmoid(-z)  # log(1 - lambda_t)
    # Survival before step t: sum of log(1 - lambda_j) for j < t (0 for the first step).
    survival = torch.cumsum(log_stay, dim=0) - log_stay
    log_p = log_exit + survival
    log_p[-1] = survival[-1]
    return log_p


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None, count: float | None = None) -> torch.Tensor:
    """Sum of `[B, S]` values over the positions `mask` marks, over `count` (default: the number marked)."""
    if mask is None:
        return values.sum() / (count or values.numel())
    mask = mask.to(values.dtype)
    return (values * mask).sum() / (count or mask.sum().clamp_min(1.0))


@dataclass
class Stage1Loss:
    loss: torch.Tensor  # scalar, what backward() is called on
    expected_ce: torch.Tensor  # scalar: mean over positions of sum_t p_t * L_t
    entropy: torch.Tensor  # scalar: mean exit-distribution entropy (nats)
    step_ce: torch.Tensor  # (T,): mean cross-entropy of each step, detached
    exit_probs: torch.Tensor  # (T,): mean exit distribution, detached


def stage1_loss(
    step_logits: torch.Tensor,
    gate_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    beta: float = 0.1,
    count: float | None = None,
) -> Stage1Loss:
    """Entropy-regularised expected next-token loss (spec 8.1) for logits `[T, B, S, V]`, gate logits `[T, B, S]`."""
    assert step_logits.shape[:3] == gate_logits.shape, (step_logits.shape, gate_logits.shape)
    token_loss = per_step_token_loss(step_logits, targets)  # (T, B, S)
    log_p = exit_log_probs(gate_logits)  # (T, B, S)
    p = log_p.exp()
    expected = (p * token_loss).sum(0)  # (B, S)
    entropy = -(p * log_p).sum(0)  # (B, S)
    expected_ce, mean_entropy = _masked_mean(expected, mask, count), _masked_mean(entropy, mask, count)
    with torch.no_grad():
        step_ce = torch.stack([_masked_mean(step, mask, count) for step in token_loss])
        mean_p = torch.stack([_masked_mean(step, mask, count) for step in p])
    return Stage1Loss(expected_ce - beta * mean_entropy, expected_ce.detach(), mean_entropy.detach(), step_ce, mean_p)


def stage2_targets(token_loss: torch.Tensor, k: float = STAGE2_K, gamma: float = STAGE2_GAMMA) -> torch.Tensor:
    """Target continuation probabilities w `[T-1, B, S]` for steps 2..T from detached per-step losses `[T, B, S]`."""
    token_loss = token_loss.detach().float()
    improvement = (token_loss[:-1] - token_loss[1:]).clamp_min(0.0)  # I_t = max(0, L_{t-1} - L_t), t = 2..T
    return torch.sigmoid(k * (improvement - gamma))


@dataclass
class Stage2Loss:
    loss: torch.Tensor  # scalar
    step_bce: torch.Tensor  # (T-1,): the loss at steps 2..T, detached
    continue_target: torch.Tensor  # (T-1,): mean target continuation probability w at steps 2..T


def stage2_loss(
    gate_logits: torch.Tensor,
    token_loss: torch.Tensor,
    mask: torch.Tensor | None = None,
    k: float = STAGE2_K,
    gamma: float = STAGE2_GAMMA,
    count: float | None = None,
) -> Stage2Loss:
    """Focused adaptive gate loss (spec 8.2): (1/T) sum_{t=2..T} BCE(1 - lambda_t, w_t), mean over positions.

    `token_loss` `[T, B, S]` is the per-step LM loss (detached here); `gate_logits` `[T, B, S]` carry the grad.
    """
    steps = gate_logits.shape[0]
    assert token_loss.shape == gate_logits.shape, (token_loss.shape, gate_logits.shape)
    w = stage2_targets(token_loss, k, gamma)  # (T-1, B, S)
    z = gate_logits[1:].float()
    # -[w log(1 - lambda) + (1 - w) log lambda], with log(1 - lambda) = logsigmoid(-z), log lambda = logsigmoid(z).
    bce = -(w * F.logsigmoid(-z) + (1.0 - w) * F.logsigmoid(z))  # (T-1, B, S)
    step_bce = torch.stack([_masked_mean(step, mask, count) for step in bce])
    with torch.no_grad():
        mean_w = torch.stack([_masked_mean(step, mask, count) for step in w])
    return Stage2Loss(step_bce.sum() / steps, step_bce.detach(), mean_w)
