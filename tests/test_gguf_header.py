"""chatft.model.gguf_header: a GGUF file's metadata as the gguf package's reader gives it, without its cost."""

import struct

import gguf
import numpy as np
import pytest

from chatft.bundled import bundled_gguf_path
from chatft.model.gguf_header import GGUFHeaderError, gguf_metadata


def reader_metadata(path) -> dict:
    """gguf.GGUFReader's fields, an array as its length (as gguf_metadata gives it)."""
    fields = {}
    for key, field in gguf.GGUFReader(path).fields.items():
        if not key.startswith("GGUF."):  # the reader's own entries for the header (version, counts)
            value = field.contents()
            fields[key] = len(value) if isinstance(value, list) else value
    return fields


def assert_same_metadata(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():  # float32 values come back as Python floats from both, rounded the same way
        assert actual[key] == value, key


def written_file(path, endianess=gguf.GGUFEndian.LITTLE):
    """A file holding every value type, arrays of numbers, strings and arrays, and a tensor after the header."""
    writer = gguf.GGUFWriter(str(path), "qwen3", endianess=endianess)
    writer.add_uint8("test.u8", 200)
    writer.add_int8("test.i8", -7)
    writer.add_uint16("test.u16", 60000)
    writer.add_int16("test.i16", -30000)
    writer.add_uint32("test.u32", 4_000_000_000)
    writer.add_int32("test.i32", -2_000_000_000)
    writer.add_float32("test.f32", 0.1)
    writer.add_bool("test.bool", True)
    writer.add_string("test.string", "Tessa, made by Lumen Labs ✓")
    writer.add_uint64("test.u64", 2**63 + 5)
    writer.add_int64("test.i64", -(2**62))
    writer.add_float64("test.f64", 1e-300)
    writer.add_array("test.ints", [1, 2, 3, 4, 5])
    writer.add_array("test.strings", ["<|im_start|>", "", "Ġhello"] * 1000)
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_uint32("qwen3.attention.key_length", 128)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_every_value_type_reads_as_the_gguf_package_reads_it(tmp_path):
    path = written_file(tmp_path / "all.gguf")
    metadata = gguf_metadata(path)
    expected = reader_metadata(path)
    expected["test.nested"] = 2  # the reader's contents() flattens an array of arrays (3 numbers); it holds 2 arrays
    assert_same_metadata(metadata, expected)
    assert metadata["test.string"] == "Tessa, made by Lumen Labs ✓" and metadata["test.strings"] == 3000
    assert metadata["qwen3.attention.key_length"] == 128 and metadata["general.architecture"] == "qwen3"


def test_a_real_file_reads_as_the_gguf_package_reads_it():
    """The bundled SmolLM2 file: a 49k-token vocabulary, its merges, a chat template."""
    path = bundled_gguf_path()
    metadata = gguf_metadata(path)
    assert_same_metadata(metadata, reader_metadata(path))
    assert metadata["tokenizer.ggml.tokens"] == 49152 and metadata["llama.block_count"] == 30


@pytest.mark.parametrize("cut", [3, 8, 23, 60, -40])
def test_a_file_cut_inside_its_header_is_said_so(tmp_path, cut):
    whole = written_file(tmp_path / "whole.gguf").read_bytes()
    header_end = whole.index(b"qwen3.attention.key_length") + len("qwen3.attention.key_length") + 8
    cut_file = tmp_path / "cut.gguf"
    cut_file.write_bytes(whole[:cut if cut > 0 else header_end + cut])
    with pytest.raises(GGUFHeaderError) as error:
        gguf_metadata(cut_file)
    expected = "not a GGUF file" if 0 < cut < 4 else "the file ends inside its header"
    assert str(error.value).startswith(expected), str(error.value)


def test_other_versions_and_big_endian_files_are_refused_by_name(tmp_path):
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(GGUFHeaderError, match="GGUF version 1; GGUF files of version 2 and 3 are read here"):
        gguf_metadata(old)
    big = written_file(tmp_path / "big.gguf", endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(GGUFHeaderError, match="a big-endian GGUF file .version 3.; only little-endian"):
        gguf_metadata(big)
