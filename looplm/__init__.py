"""looplm: run, serve, evaluate and train looped language models (Ouro) in pure PyTorch."""

from typing import TYPE_CHECKING, Any

from looplm.errors import LooplmError

if TYPE_CHECKING:
    from looplm.loading import load

__all__ = ["LooplmError", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `load` brings in torch (about 1.5 s), so it is imported on first use: `looplm --help`,
    # `--version` and error messages about bad options come back without waiting for it.
    if name == "load":
        from looplm.loading import load

        globals()["load"] = load
        return load
    raise AttributeError(f"module 'looplm' has no attribute {name!r}")
