"""`looplm quantize`: write a weight-only quantized checkpoint directory (docs/quantization.md)."""

from pathlib import Path
from typing import Annotated

import typer

from looplm.cli import common


@common.app.command()
def quantize(
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write.", show_default=False)],
    bits: Annotated[int, common.option("8 (per output channel) or 4 (group-wise).", "--bits")] = 4,
    group_size: common.GroupSize = 128,
    model: common.Model = None,
    dtype: Annotated[str, common.option("Dtype of the unquantized tensors (embeddings, norms, lm_head, gate).")] = "bfloat16",
    overwrite: Annotated[bool, common.option("Replace the model files an existing OUTPUT directory holds.",
                                             "--overwrite")] = False,
) -> None:
    """Quantize a model's layer projections to int8 or int4 and save it as an HF-style directory."""
    from looplm.quant import QuantSpec
    from looplm.quant.export import save_quantized

    spec = QuantSpec(bits, group_size if bits == 4 else 128)  # bad settings fail before loading
    console = common.stderr()
    if console.is_terminal:  # a 2.6B model takes about half a minute: say which stage it is in
        with console.status("loading", spinner="dots") as status:
            out = save_quantized(model, output, spec, dtype=dtype, overwrite=overwrite, report=status.update)
    else:
        out = save_quantized(model, output, spec, dtype=dtype, overwrite=overwrite)
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    label = f"int{bits}" + (f", group size {group_size}" if bits == 4 else "")
    common.stderr().print(f"wrote {out} ({label}, {size / 2**20:.1f} MiB of weights)")
