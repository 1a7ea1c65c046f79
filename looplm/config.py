"""Model configuration, read once from config.json and checked.

`OuroConfig` holds only what the checkpoint defines. Runtime knobs (steps override,
sampling, exit threshold) are arguments of `forward_steps` / `generate`, not config.
Every shape value comes from the file: the class has no Qwen-style defaults to fall back on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looplm.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("ouro", "llama")
MIN_STEPS, MAX_STEPS = 1, 8


@dataclass(frozen=True)
class OuroConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    total_ut_steps: int
    early_exit_threshold: float | None
    early_exit_step: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None

    @property
    def sandwich_norm(self) -> bool:
        """Ouro wraps each sublayer output in a second norm; Llama does not."""
        return self.model_type == "ouro"

    @property
    def has_exit_gate(self) -> bool:
        return self.model_type == "ouro"

    @property
    def max_steps(self) -> int:
        """The most UT steps a run may ask for: 8, or the checkpoint's own count when it has more."""
        return max(MAX_STEPS, self.total_ut_steps)

    @property
    def num_kv_slots(self) -> int:
        return self.total_ut_steps * self.num_hidden_layers

    def with_steps(self, steps: int | None) -> OuroConfig:
        """A copy with `total_ut_steps` overridden (1 to `max_steps`); warns outside the trained range."""
        if steps is None or steps == self.total_ut_steps:
            return self
        check_steps(steps, self.max_steps)
        return dataclasses.replace(self, total_ut_steps=steps)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> OuroConfig:
        """The config of a config.json dict; the keys in DEFAULTED_KEYS may be left out."""
        def need(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise ConfigError(f"{source}: required key '{key}' is missing")
            return raw[key]

        model_type = need("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type '{model_type}' is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if raw.get("rope_scaling") not in (None, {}):
            raise ConfigError(f"{source}: rope_scaling {raw['rope_scaling']!r} is not supported (plain RoPE only)")
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: sliding-window attention is not supported")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act '{act}' is not supported (only silu)")

        ints = {}
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            ints[key] = _positive_int(need(key), key, source)
        heads = ints["num_attention_heads"]
        kv_heads = _positive_int(raw.get("num_key_value_heads", heads), "num_key_value_heads", source)
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = raw.get("head_dim") or ints["hidden_size"] // heads
        head_dim = _positive_int(head_dim, "head_dim", source)
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim {head_dim} must be even for RoPE")

        default_steps = 4 if model_type == "ouro" else 1
        steps = _positive_int(raw.get("total_ut_steps", default_steps), "total_ut_steps", source)
        threshold = raw.get("early_exit_threshold", 1.0 if model_type == "ouro" else None)
        if threshold is not None:  # any finite value has the reference's meaning (above 1: never early)
            threshold = _finite(threshold, "early_exit_threshold", source)
        exit_step = raw.get("early_exit_step")
        if exit_step is not None and (isinstance(exit_step, bool) or not isinstance(exit_step, int)):
            raise ConfigError(f"{source}: early_exit_step must be an integer, got {exit_step!r}")
        tied = raw.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):  # "yes" would tie, and silently drop the file's lm_head
            raise ConfigError(f"{source}: tie_word_embeddings must be true or false, got {tied!r}")

        return cls(
            model_type=model_type,
            **ints,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=_positive(raw.get("rope_theta", 10000.0), "rope_theta", source),
            rms_norm_eps=_positive(raw.get("rms_norm_eps", 1e-6), "rms_norm_eps", source),
            max_position_embeddings=_positive_int(
                raw.get("max_position_embeddings", 4096), "max_position_embeddings", source
            ),
            tie_word_embeddings=tied,
            total_ut_steps=steps,
            early_exit_threshold=threshold,
            early_exit_step=exit_step,
            bos_token_id=_optional_id(raw.get("bos_token_id"), "bos_token_id", source),
            eos_token_ids=token_ids(raw.get("eos_token_id"), "eos_token_id", source),
            pad_token_id=_optional_id(raw.get("pad_token_id"), "pad_token_id", source),
        )

    @classmethod
    def from_file(cls, path: Path) -> OuroConfig:
        return cls.from_dict(read_json(path), source=str(path))


def check_steps(steps: int, most: int = MAX_STEPS) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not MIN_STEPS <= steps <= most:
        raise ConfigError(f"steps must be an integer from {MIN_STEPS} to {most}, got {steps!r}")
    if steps < 2 or steps > 4:
        warnings.warn(f"steps={steps} is outside the trained range 2-4; quality is expected to drop", stacklevel=3)


# The keys `OuroConfig.from_dict` gives a default (the model class's, spec 1.1) when config.json
# leaves them out; `looplm inspect` says which ones a checkpoint relied on.
DEFAULTED_KEYS = ("total_ut_steps", "early_exit_threshold", "num_key_value_heads", "head_dim", "rope_theta",
                  "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object; missing or malformed files raise ConfigError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); is it the right file?") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _positive_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{source}: '{key}' must be a positive integer, got {value!r}")
    return value


def is_finite_number(value: object) -> bool:
    """A finite int or float; not a bool, whose True would pass as 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)  # isfinite(10**400) would overflow


def _finite(value: Any, key: str, source: str) -> float:
    try:
        number = float(value) if is_finite_number(value) else math.nan
    except OverflowError:  # an int past float's range (JSON allows 1 followed by 400 zeros)
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
    return number


def _positive(value: Any, key: str, source: str) -> float:
    number = _finite(value, key, source)
    if number <= 0:  # rope_theta 0 or a negative norm epsilon gives NaN
        raise ConfigError(f"{source}: '{key}' must be positive, got {value!r}")
    return number


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _optional_id(value: Any, key: str, source: str) -> int | None:
    if value is not None and not _is_id(value):
        raise ConfigError(f"{source}: '{key}' must be a token id (an integer >= 0), got {value!r}")
    return value


def token_ids(value: Any, key: str, source: str) -> tuple[int, ...]:
    """A token id or a list of them (HF writes either) as a tuple; a ConfigError naming `key`
    otherwise ("12" used to become ids 1 and 2)."""
    if value is None:
        return ()
    ids = [value] if not isinstance(value, list) else value
    if not all(_is_id(v) for v in ids):
        raise ConfigError(f"{source}: '{key}' must be a token id or a list of token ids, got {value!r}")
    return tuple(ids)
