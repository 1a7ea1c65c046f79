"""looplm: run, serve, evaluate and train looped language models (Ouro) in pure PyTorch."""

from looplm.errors import LooplmError
from looplm.loading import load

__all__ = ["LooplmError", "load"]
__version__ = "0.1.0"
