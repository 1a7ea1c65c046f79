"""Weight-only quantization: int8 per output channel, int4 group-wise (docs/quantization.md).

- `kernels`: quantize / dequantize / pack functions (pure tensors).
- `linear`: `Int8Linear`, `Int4Linear`, the modules that take the layer projections' place.
- `model`: `QuantSpec`, `quantize_model(model, bits, group_size)` (in place, via `replace_linears`).
- `checkpoint`: load a quantized directory (or quantize a float one while loading it).
- `export`: write a quantized directory (`looplm quantize`).
"""

from looplm.quant.linear import Int4Linear, Int8Linear
from looplm.quant.model import QuantSpec, quantize_model

__all__ = ["Int4Linear", "Int8Linear", "QuantSpec", "quantize_model"]
