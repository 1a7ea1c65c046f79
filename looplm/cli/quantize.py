"""`looplm quantize`: write a weight-only quantized checkpoint directory (docs/quantization.md)."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from looplm.cli import common
from looplm.errors import LooplmError


@common.app.command()
def quantize(
    output: Annotated[str, typer.Option("--output", "-o", help="Directory to write.", show_default=False)],
    bits: Annotated[int, common.option("8 (per output channel) or 4 (group-wise).", "--bits")] = 4,
    group_size: Annotated[Optional[int], common.option(
        "int4: input columns per scale, 32, 64, 128 (the default) or 256.", "--group-size")] = None,
    model: common.Model = None,
    dtype: Annotated[str, common.option("Dtype of the unquantized tensors (embeddings, norms, lm_head, gate).")] = "bfloat16",
    overwrite: Annotated[bool, common.option("Replace the model files an existing OUTPUT directory holds.",
                                             "--overwrite")] = False,
) -> None:
    """Quantize a model's layer projections to int8 or int4 and save it as an HF-style directory."""
    from looplm.quant import QuantSpec
    from looplm.quant.export import save_quantized

    if not output.strip():  # Path("") is the current directory
        raise LooplmError("--output is empty; give the directory to write")
    if bits == 8 and group_size is not None:  # it was ignored in silence
        raise LooplmError("--group-size applies to int4; int8 has one scale per output channel")
    group_size = group_size or 128
    spec = QuantSpec(bits, group_size if bits == 4 else 128)  # bad settings fail before loading
    console = common.stderr()
    if console.is_terminal:  # a 2.6B model takes about half a minute: say which stage it is in
        with console.status("loading", spinner="dots") as status:
            out = save_quantized(model, Path(output), spec, dtype=dtype, overwrite=overwrite, report=status.update)
    else:
        out = save_quantized(model, Path(output), spec, dtype=dtype, overwrite=overwrite)
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    label = f"int{bits}" + (f", group size {group_size}" if bits == 4 else "")
    common.stderr().print(f"wrote {out} ({label}, {size / 2**20:.1f} MiB of weights)")
