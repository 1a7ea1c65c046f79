"""Read safetensors weights straight into preallocated parameters.

`safetensors.safe_open` validates each file (header, offsets, size). The bytes are then read
with plain file reads into the destination parameter's own memory, chunk by chunk when the
dtype changes, so loading never holds a second full copy of the weights and never maps the
whole file (mapped pages would count against peak RSS).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from looplm.errors import CheckpointError

DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
# Quantized checkpoints (looplm.quant) also hold int8 weights and packed int4 nibbles.
QUANTIZED_DTYPES = {"I8": torch.int8, "U8": torch.uint8}
CHUNK_BYTES = 64 << 20  # bounded staging buffer when converting dtypes


class TensorEntry:
    def __init__(self, path: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int) -> None:
        self.path, self.name, self.dtype, self.shape = path, name, dtype, shape
        self.start, self.end = start, end


def index_file(path: Path, quantized: bool = False) -> dict[str, TensorEntry]:
    """Validate one .safetensors file and list its tensors with their byte ranges.
    Integer tensors are accepted only in a `quantized` checkpoint."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({first_line})") from None
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    data_start = 8 + header_len
    entries = {}
    for name in names:
        info = header[name]
        dtype = DTYPES.get(info["dtype"]) or (QUANTIZED_DTYPES.get(info["dtype"]) if quantized else None)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {info['dtype']}, expected a float type")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(path, name, dtype, tuple(info["shape"]), data_start + begin, data_start + end)
    return entries


def read_into(entry: TensorEntry, dest: torch.Tensor) -> None:
    """Fill `dest` (any dtype/device, same shape) from the file, converting in bounded chunks."""
    if tuple(dest.shape) != entry.shape:
        raise CheckpointError(
            f"{entry.path}: tensor '{entry.name}' has shape {list(entry.shape)}, the config expects {list(dest.shape)}"
        )
    with open(entry.path, "rb") as fh:
        fh.seek(entry.start)
        if dest.dtype == entry.dtype and dest.device.type == "cpu" and dest.is_contiguous():
            _readinto_exact(fh, _byte_view(dest), entry)
            return
        flat = dest.view(-1)
        itemsize = torch.empty((), dtype=entry.dtype).element_size()
        per_chunk = max(1, CHUNK_BYTES // itemsize)
        staging = torch.empty(min(per_chunk, flat.numel()), dtype=entry.dtype)
        for begin in range(0, flat.numel(), per_chunk):
            count = min(per_chunk, flat.numel() - begin)
            part = staging[:count]
            _readinto_exact(fh, _byte_view(part), entry)
            flat[begin : begin + count].copy_(part)


def _byte_view(tensor: torch.Tensor) -> np.ndarray:
    # numpy has no bf16, but a uint8 view of the same memory is a writable buffer.
    return tensor.detach().view(-1).view(torch.uint8).numpy()


def _readinto_exact(fh, buffer: np.ndarray, entry: TensorEntry) -> None:  # noqa: ANN001
    view = memoryview(buffer)
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{entry.path}: truncated while reading tensor '{entry.name}'")
        done += got


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """`safetensors.torch.save_file`, with the file mode any new file gets here (the process
    umask): safetensors creates its files owner-only (0600), so a model saved for others to
    load would not be readable by them. A failed write (a full disk) is an OSError, as for any
    other file, not safetensors' own error."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
