"""Quantize a loaded model's layer projections in place, and convert between a float weight,
the portable on-disk tensors and a quantized module."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from looplm.errors import QuantizationError
from looplm.kernels.swap import is_layer_projection, replace_linears
from looplm.quant.kernels import pack_nibbles, quantize_int4, quantize_int8, unpack_nibbles
from looplm.quant.linear import INT4_GROUP_SIZES, Int4Linear, Int8Linear

QUANT_NAMES = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 128


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize the layer projections. int8 is per output channel, so `group_size` only
    matters for int4. Embeddings, lm_head and the exit gate stay in the model dtype
    (docs/quantization.md has the measured cost of an int8 lm_head)."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise QuantizationError(f"quantization bits must be 8 or 4, got {self.bits}")
        if self.bits == 4 and self.group_size not in INT4_GROUP_SIZES:
            raise QuantizationError(
                f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {self.group_size}"
            )

    @classmethod
    def parse(cls, quant: str | int, group_size: int = DEFAULT_GROUP_SIZE) -> QuantSpec:
        """'int8' / 'int4' (or 8 / 4) -> a spec."""
        bits = QUANT_NAMES.get(quant) if isinstance(quant, str) else quant
        if bits is None:
            raise QuantizationError(f"quant must be one of {', '.join(QUANT_NAMES)} (or none), got '{quant}'")
        return cls(bits, group_size if bits == 4 else DEFAULT_GROUP_SIZE)

    def selects(self, name: str) -> bool:
        return is_layer_projection(name)

    def to_json(self) -> dict:
        return {"quant_method": "looplm", "format_version": 1, "bits": self.bits,
                "group_size": self.group_size if self.bits == 4 else None}


def check_shape(name: str, out_features: int, in_features: int, spec: QuantSpec) -> None:
    if spec.bits == 4 and in_features % spec.group_size:
        fitting = [str(size) for size in INT4_GROUP_SIZES if in_features % size == 0]
        advice = (f"group size {' or '.join(fitting)} fits" if fitting else
                  f"no int4 group size ({', '.join(map(str, INT4_GROUP_SIZES))}) divides it: use int8")
        raise QuantizationError(
            f"int4 group size {spec.group_size} does not divide {name}'s {in_features} input features; {advice}"
        )


def portable_tensors(name: str, weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The on-disk tensors for one linear: `qweight` and `scales` (+ `mins` for int4), by suffix."""
    out_features, in_features = weight.shape
    check_shape(name, out_features, in_features, spec)
    if spec.bits == 8:
        q, scale = quantize_int8(weight)
        return {"qweight": q, "scales": scale}
    q, scale, low = quantize_int4(weight, spec.group_size)
    return {"qweight": pack_nibbles(q), "scales": scale, "mins": low}


def expected_shapes(out_features: int, in_features: int, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if spec.bits == 8:
        return {"qweight": ((out_features, in_features), torch.int8), "scales": ((out_features,), torch.float32)}
    groups = in_features // spec.group_size
    return {
        "qweight": ((out_features, in_features // 2), torch.uint8),
        "scales": ((out_features, groups), torch.float32),
        "mins": ((out_features, groups), torch.float32),
    }


def module_from_portable(
    tensors: dict[str, torch.Tensor],
    spec: QuantSpec,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    int4_layout: str | None = None,
) -> nn.Module:
    """`int4_layout`: see `Int4Linear` (None: torch's layout where it applies)."""
    if spec.bits == 8:
        return Int8Linear(tensors["qweight"], tensors["scales"], bias, dtype)
    q = unpack_nibbles(tensors["qweight"])
    return Int4Linear(q, tensors["scales"], tensors["mins"], spec.group_size, bias, dtype, int4_layout)


def quantize_linear(name: str, linear: nn.Linear, spec: QuantSpec, int4_layout: str | None = None) -> nn.Module:
    """The quantized replacement of `linear`; the linear's float weight is released (its
    storage freed unless shared), since `replace_linears` keeps every old module alive until
    it returns and the float copies would otherwise pile up."""
    tensors = portable_tensors(name, linear.weight, spec)
    module = module_from_portable(tensors, spec, linear.bias, linear.weight.dtype, int4_layout)
    linear.weight.data = torch.empty(0, dtype=linear.weight.dtype, device=linear.weight.device)
    return module


def quantize_model(
    model: nn.Module,
    bits: int | str | QuantSpec,
    group_size: int = DEFAULT_GROUP_SIZE,
    int4_layout: str | None = None,
) -> nn.Module:
    """Swap the layer projections for quantized modules, in place (`bits`: 8, 4, "int8", "int4").

    One linear at a time: its float weight is freed as soon as its module is swapped, so peak
    memory stays near the float model's size. A model already running on looplm's CPU kernels
    (`model.kernels` set by the loader) gets them for its quantized layers too. Returns the model."""
    kernels_on = bool(getattr(model, "kernels", None))
    if kernels_on and int4_layout is None:
        int4_layout = "looplm"
    spec = bits if isinstance(bits, QuantSpec) else QuantSpec.parse(bits, group_size)
    for name, module in model.named_modules():  # check every shape before touching anything
        if isinstance(module, nn.Linear) and spec.selects(name):
            check_shape(name, module.out_features, module.in_features, spec)
    with torch.no_grad():
        replace_linears(
            model, lambda name, linear: quantize_linear(name, linear, spec, int4_layout) if spec.selects(name) else None
        )
    model.quantization = spec
    if kernels_on:
        from looplm.kernels.cpu import use_cpu_kernels  # looplm.kernels imports this package

        model.kernels = use_cpu_kernels(model)
    return model
