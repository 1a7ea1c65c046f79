"""Device names from users (`--device`, `device=`) -> a `torch.device` that exists on this machine.

looplm runs on CPUs and CUDA GPUs. Anything else, or a GPU this machine lacks, is a one-line
`ConfigError` before any work starts, never a torch traceback or a silent fall back to the CPU.
"""

from __future__ import annotations

import torch

from looplm.errors import ConfigError

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' (CUDA when available, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {str(device)!r} is not supported (choose {DEVICE_CHOICES})")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{device}' was requested but no CUDA device is available; use --device cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(f"device '{device}' does not exist: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    return resolved
