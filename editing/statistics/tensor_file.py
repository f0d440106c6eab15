"""Writing a safetensors file without building it in memory first.

``safetensors.torch.save_file`` serialises every tensor into one in-memory buffer before
writing it: saving a ``d_mlp x d_mlp`` float32 matrix (1.07 GB at GPT-J's width) briefly
holds two more copies of it. :func:`write_safetensors` writes the same format itself: the
8-byte little-endian header length, the JSON header (each tensor's dtype, shape and byte
range, an optional ``__metadata__`` of strings, padded with spaces to a multiple of 8 bytes),
then each tensor's raw bytes, streamed from the tensor's own memory in slices. The file
reads back with ``safetensors.torch.load_file`` bit for bit.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from tracing.errors import InvalidInput

#: safetensors' names of the dtypes it stores
DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

#: bytes written per call: a slice of the tensor's memory, not a copy of it
CHUNK_BYTES = 64 << 20


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    chunk_bytes: int = CHUNK_BYTES,
) -> None:
    """Write ``tensors`` (CPU, contiguous: others are copied one at a time) to ``path`` in the
    safetensors format, in name order; ``metadata``: string pairs kept in the header. The
    transient memory is one tensor's contiguous copy where a tensor is not already a
    contiguous CPU tensor, else nothing beyond the header."""
    if sys.byteorder != "little":
        raise InvalidInput("write_safetensors: safetensors stores little-endian bytes")
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise InvalidInput(f"safetensors metadata must map strings to strings: {bad[0]!r}")
        header["__metadata__"] = dict(metadata)
    names = sorted(tensors)
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise InvalidInput(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            t = tensors[name].detach().cpu().contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else None
            if raw is None:
                continue
            for start in range(0, raw.size, chunk_bytes):
                f.write(raw[start : start + chunk_bytes].data)  # a view, not a copy
