"""A GGUF file's metadata (its header's key/value pairs), read in a fraction of a second.

The gguf package's GGUFReader builds a numpy view per array element: on a Qwen vocabulary (150k tokens and as many
merges) that is ~13 s on a 2-core CPU per read, and transformers reads a file that way for its config, its tokenizer
and its weights. What the toolkit itself needs from a file before loading it (an architecture, a head width, an
expert width) is a few scalars: this reader walks the header with struct, skipping arrays by their lengths.

Layout (ggml/docs/gguf.md): magic "GGUF", version u32, tensor count u64, key/value count u64, then per pair a key
(u64 length + UTF-8 bytes), a value type u32 and the value; an array is an element type u32, a count u64 and the
elements. Little-endian (a big-endian file shows as a byte-swapped version and is refused).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

# value type -> struct format of one element (GGUFValueType: 8 is a string, 9 an array)
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class GGUFHeaderError(ValueError):
    """What keeps the file from being read as GGUF (its magic, version or a header that ends early), in words a
    user can act on; the caller names the file."""


def gguf_metadata(path: str | Path) -> dict[str, object]:
    """The header's scalar and string values by key; an array's value is its length (an int), so a caller can tell
    that a key is present without the reader materializing 150k tokens."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise GGUFHeaderError("not a GGUF file (it does not start with the GGUF magic bytes)")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                version, _tensors, count = struct.unpack_from("<IQQ", data, 4)
                if version not in (2, 3):
                    swapped = struct.unpack_from(">I", data, 4)[0]
                    raise GGUFHeaderError(
                        f"a big-endian GGUF file (version {swapped}); only little-endian files are read here"
                        if swapped in (2, 3) else
                        f"GGUF version {version}; GGUF files of version 2 and 3 are read here (re-export the file)")
                return dict(_pairs(data, count, offset=24))
            except struct.error:
                raise GGUFHeaderError("the file ends inside its header (truncated, or not completely written): "
                                      "export or download it again") from None


def _pairs(data, count: int, offset: int):
    for _ in range(count):
        key, offset = _string(data, offset)
        (value_type,), offset = struct.unpack_from("<I", data, offset), offset + 4
        value, offset = _value(data, value_type, offset)
        if offset > len(data):  # an array skipped by its length past the end
            raise struct.error(f"{key} runs past the end")
        yield key, value


def _string(data, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, offset)
    start = offset + 8
    if start + length > len(data):
        raise struct.error(f"a string of {length} bytes at byte {offset} runs past the end")
    return bytes(data[start:start + length]).decode("utf-8", errors="replace"), start + length


def _value(data, value_type: int, offset: int) -> tuple[object, int]:
    if value_type in SCALAR_FORMATS:
        fmt = "<" + SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, data, offset)[0], offset + struct.calcsize(fmt)
    if value_type == STRING:
        return _string(data, offset)
    if value_type != ARRAY:
        raise struct.error(f"unknown value type {value_type} at byte {offset}")
    element_type, length = struct.unpack_from("<IQ", data, offset)
    offset += 12
    if element_type in SCALAR_FORMATS:
        return length, offset + length * struct.calcsize("<" + SCALAR_FORMATS[element_type])
    if element_type == STRING:  # tokens, merges: skipped by their lengths, not decoded
        length_format = struct.Struct("<Q")
        for _ in range(length):
            offset += 8 + length_format.unpack_from(data, offset)[0]
        return length, offset
    for _ in range(length):  # nested arrays: each element says its own size
        _, offset = _value(data, element_type, offset)
    return length, offset
