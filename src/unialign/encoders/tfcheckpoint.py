"""Read a TensorFlow 1.x checkpoint (``<prefix>.index`` + ``<prefix>.data-00000-of-00001``) without TensorFlow.

Why: musicnn's weights ship as a TF1 checkpoint and its package needs TensorFlow 1.x with numpy < 1.17,
which cannot be installed next to this project; the checkpoint format itself is simple. The ``.index``
file is a LevelDB-style table (uncompressed blocks of prefix-compressed keys, restart array, a 48-byte
footer with the index block's handle) mapping each variable name to a ``BundleEntryProto`` (dtype,
shape, shard, offset, size, crc32c); the ``.data`` shard holds the raw little-endian tensor bytes at
those offsets. Only what TF's own ``BundleWriter`` produces for float variables in one shard is
accepted; anything else is refused with the variable's name.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DataError

TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB's table magic number, the last 8 bytes of the .index file
DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 9: "<i8"}  # TF DataType enum -> numpy dtype (what checkpoints of floats hold)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message: varints as ints, the rest as bytes."""
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        wire = tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield tag >> 3, value
            continue
        if wire == 2:
            size, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise DataError(f"unsupported protobuf wire type {wire} in a checkpoint index")
        yield tag >> 3, buf[i : i + size]
        i += size


def _block(buf: bytes, offset: int, size: int) -> bytes:
    if buf[offset + size] != 0:  # the trailer's first byte is the compression type: 0 = none
        raise DataError("compressed checkpoint index blocks are not supported")
    return buf[offset : offset + size]


def _entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Key/value pairs of one table block (keys are stored as shared prefix length + suffix)."""
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end, i, key = len(block) - 4 - 4 * n_restarts, 0, b""
    while i < end:
        shared, i = _varint(block, i)
        unshared, i = _varint(block, i)
        size, i = _varint(block, i)
        key = key[:shared] + block[i : i + unshared]
        i += unshared
        yield key, block[i : i + size]
        i += size


def _shape(shape_proto: bytes) -> tuple[int, ...]:
    dims = []
    for field, dim in _proto_fields(shape_proto):
        if field == 2:  # TensorShapeProto.dim
            dims.append(int(dict(_proto_fields(dim)).get(1, 0)))  # Dim.size
    return tuple(dims)


def read_checkpoint(prefix: str | Path, skip: tuple[str, ...] = ("/Adam", "_power")) -> dict[str, np.ndarray]:
    """Every variable of the checkpoint at ``prefix`` (optimizer slots, whose names contain a ``skip``
    fragment, left out) as a read-only numpy array of its shape."""
    prefix = str(prefix)
    try:
        index = Path(prefix + ".index").read_bytes()
        data = Path(prefix + ".data-00000-of-00001").read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the TensorFlow checkpoint {prefix!r} ({e})") from None
    if len(index) < 48 or struct.unpack_from("<Q", index, len(index) - 8)[0] != TABLE_MAGIC:
        raise DataError(f"{prefix}.index is not a TensorFlow checkpoint index (bad footer)")
    footer = index[-48:]
    _, j = _varint(footer, 0)  # metaindex handle: unused
    _, j = _varint(footer, j)
    index_offset, j = _varint(footer, j)
    index_size, _ = _varint(footer, j)
    out: dict[str, np.ndarray] = {}
    for _, handle in _entries(_block(index, index_offset, index_size)):
        offset, k = _varint(handle, 0)
        size, _ = _varint(handle, k)
        for key, value in _entries(_block(index, offset, size)):
            name = key.decode()
            if not name or any(s in name for s in skip):  # "" is the bundle header
                continue
            out[name] = _tensor(name, value, data)
    return out


def _tensor(name: str, entry: bytes, data: bytes) -> np.ndarray:
    fields = dict(_proto_fields(entry))
    dtype = DTYPES.get(int(fields.get(1, 0)))
    if dtype is None or int(fields.get(3, 0)) != 0 or 7 in fields:
        raise DataError(f"checkpoint variable {name!r}: only unsliced tensors of {sorted(DTYPES)} in shard 0 are read")
    shape = _shape(fields.get(2, b""))  # type: ignore[arg-type]
    offset, size = int(fields.get(4, 0)), int(fields.get(5, 0))
    if offset + size > len(data) or size != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
        raise DataError(f"checkpoint variable {name!r}: {size} bytes at {offset} do not hold a {shape} {dtype} tensor")
    return np.frombuffer(data, dtype=dtype, count=size // np.dtype(dtype).itemsize, offset=offset).reshape(shape)


__all__ = ["read_checkpoint"]
