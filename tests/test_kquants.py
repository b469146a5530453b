"""chatft.export.kquants: Q4_K and Q6_K bytes that gguf's own dequantizer reads back within the format's
rounding error; the scale search beats plain min/max rounding; sizes as gguf expects; clear errors.
Seeded data, a few hundred super-blocks, no models."""

from __future__ import annotations

import ctypes
import hashlib
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

from chatft.export import kquants
from chatft.export.kquants import quantize
from support import kquant_rounding_error_bound, require_llama_cpp

Q4_K, Q6_K = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K
KQUANTS = [Q4_K, Q6_K]


def gaussian(rows: int = 96, cols: int = 1024, seed: int = 0, sigma: float = 1.0) -> np.ndarray:
    return (sigma * np.random.default_rng(seed).standard_normal((rows, cols))).astype(np.float32)


def relative_rms_error(x: np.ndarray, quantized: np.ndarray, qtype: GGMLQuantizationType) -> float:
    back = gguf.quants.dequantize(quantized, qtype)
    return float(np.sqrt(np.mean((back - x) ** 2) / np.mean(x ** 2)))


def round_to_nearest_baseline(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """No search, and float32 steps (kept exactly, unlike the format's): Q4_K, 16 levels from the
    sub-block's min to its max; Q6_K, 63 levels symmetric about zero, +-max|x| at the ends."""
    if qtype == Q4_K:
        sub = x.reshape(-1, 32)
        low, high = sub.min(axis=1, keepdims=True), sub.max(axis=1, keepdims=True)
        step = np.where(high > low, (high - low) / 15, 1)
        back = low + step * np.clip(np.rint((sub - low) / step), 0, 15)
    else:
        sub = x.reshape(-1, 16)
        peak = np.abs(sub).max(axis=1, keepdims=True)
        step = np.where(peak > 0, peak / 31, 1)
        back = step * np.clip(np.rint(sub / step), -31, 31)
    return back.reshape(x.shape)


# ---- reading back


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_gguf_reads_gaussian_data_back_within_the_rounding_error_of_the_format(qtype):
    x = gaussian()
    error = relative_rms_error(x, quantize(x, qtype), qtype)
    # measured: Q4_K 0.072 (bound 0.085), Q6_K 0.018 (bound 0.020)
    assert error < kquant_rounding_error_bound(x, qtype)
    assert error < {Q4_K: 0.085, Q6_K: 0.021}[qtype]


def swap_nibbles(b: np.ndarray) -> np.ndarray:
    return (b >> 4) | (b << 4)


def swap_q4_k_d_and_dmin(block: np.ndarray) -> None:
    block[:, 0:4] = block[:, [2, 3, 0, 1]]


def swap_q4_k_level_nibbles(block: np.ndarray) -> None:
    block[:, 16:] = swap_nibbles(block[:, 16:])


def swap_q6_k_low_nibbles(block: np.ndarray) -> None:
    block[:, :128] = swap_nibbles(block[:, :128])


def rotate_q6_k_high_bits(block: np.ndarray) -> None:
    qh = block[:, 128:192]
    block[:, 128:192] = (qh >> 2) | (qh << 6)  # each run reads the next run's top 2 bits


@pytest.mark.parametrize("qtype, break_layout", [
    (Q4_K, swap_q4_k_level_nibbles), (Q4_K, swap_q4_k_d_and_dmin),
    (Q6_K, swap_q6_k_low_nibbles), (Q6_K, rotate_q6_k_high_bits),
], ids=lambda v: getattr(v, "__name__", getattr(v, "name", None)))
def test_the_bound_fails_a_wrong_byte_layout(qtype, break_layout):
    """The read-back check above can fail: the same bytes with one field misplaced decode far outside the bound."""
    x = gaussian()
    type_size = GGML_QUANT_SIZES[qtype][1]
    broken = quantize(x, qtype).reshape(-1, type_size).copy()
    break_layout(broken)
    assert relative_rms_error(x, broken.reshape(x.shape[0], -1), qtype) > 2 * kquant_rounding_error_bound(x, qtype)


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_the_scale_search_beats_plain_round_to_nearest(qtype):
    x = gaussian(seed=1)
    baseline = np.sqrt(np.mean((round_to_nearest_baseline(x, qtype) - x) ** 2) / np.mean(x ** 2))
    # measured: 0.91 (Q4_K) and 0.92 (Q6_K) of the baseline's error, in spite of its exact steps
    assert relative_rms_error(x, quantize(x, qtype), qtype) < 0.95 * baseline


# ---- edge cases


def edge_rows() -> dict[str, np.ndarray]:
    """Rows of 1024 values (4 super-blocks) that stress the grid's placement."""
    g = gaussian(rows=8, seed=2)
    outliers = g[2].copy()
    outliers[::97] = 60.0  # 11 values 60 standard deviations out
    loud_sub_block = g[3].copy()
    loud_sub_block[:32] *= 1000  # its scale makes the others' 6-bit scale codes small
    magnitudes = np.repeat(10.0 ** np.random.default_rng(3).uniform(-2, 2, 32), 32)
    return {
        "negative only": -np.abs(g[0]),
        "positive only": np.abs(g[1]),
        "outliers": outliers,
        "one loud sub-block": loud_sub_block,
        "sub-blocks 1e-2 to 1e2": (g[4] * magnitudes).astype(np.float32),
        "float16 values": g[5].astype(np.float16).astype(np.float32),
        "bfloat16 values": (g[6].view(np.uint32) & 0xFFFF0000).view(np.float32),
        "weight scale 0.02": 0.02 * g[7],
    }


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("name", list(edge_rows()))
def test_edge_rows_read_back_within_the_rounding_error_of_the_format(qtype, name):
    x = edge_rows()[name][None, :]
    assert relative_rms_error(x, quantize(x, qtype), qtype) < kquant_rounding_error_bound(x, qtype)


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_outliers_keep_their_value(qtype):
    x = edge_rows()["outliers"][None, :]
    back = gguf.quants.dequantize(quantize(x, qtype), qtype)
    np.testing.assert_allclose(back[0, ::97], 60.0, rtol=0.02)


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_an_all_zero_block_is_zero_bytes(qtype):
    x = np.zeros((2, 256), dtype=np.float32)
    x[1] = gaussian(rows=1, cols=256)[0]
    quantized = quantize(x, qtype)
    assert not quantized[0].any()
    assert not gguf.quants.dequantize(quantized, qtype)[0].any()


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("value", [0.5, -0.5, 3.0, -40.0])
def test_constant_blocks_read_back_as_the_constant(qtype, value):
    x = np.full((1, 512), value, dtype=np.float32)
    # exact but for rounding a scale to fp16 (relative 2**-11; these values keep it a normal fp16 number)
    np.testing.assert_allclose(gguf.quants.dequantize(quantize(x, qtype), qtype), x, rtol=1e-3)


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_any_float_dtype_quantizes_as_its_float32_values(qtype):
    x16 = gaussian(rows=4).astype(np.float16)
    expected = quantize(x16.astype(np.float32), qtype)
    np.testing.assert_array_equal(quantize(x16, qtype), expected)
    np.testing.assert_array_equal(quantize(x16.astype(np.float64), qtype), expected)


def test_chunks_give_the_same_bytes_as_one_pass(monkeypatch):
    x = gaussian(rows=23, cols=256)
    whole = {qtype: quantize(x, qtype) for qtype in KQUANTS}
    monkeypatch.setattr(kquants, "BLOCKS_PER_CHUNK", 5)
    for qtype in KQUANTS:
        np.testing.assert_array_equal(quantize(x, qtype), whole[qtype])


# ---- shapes and errors


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(256,), (3, 512), (2, 3, 768), (0, 256)])
def test_bytes_have_the_size_gguf_expects(qtype, shape):
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    quantized = quantize(x, qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    assert quantized.dtype == np.uint8
    assert quantized.shape == gguf.quant_shape_to_byte_shape(shape, qtype)
    assert quantized.nbytes == x.size // block_size * type_size
    assert type_size == {Q4_K: 144, Q6_K: 210}[qtype]


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(4, 576), (100,), (256, 64)])
def test_a_row_not_a_multiple_of_256_is_a_value_error(qtype, shape):
    fallback = {Q4_K: "Q5_0", Q6_K: "Q8_0"}[qtype]  # as llama-quantize
    assert kquants.FALLBACK_TYPES[qtype].name == fallback
    with pytest.raises(ValueError, match=re.escape(f"shape {shape}") + f".*multiple of 256.*as {fallback} instead"):
        quantize(np.zeros(shape, dtype=np.float32), qtype)


def test_other_types_are_a_value_error():
    with pytest.raises(ValueError, match="Q4_K and Q6_K, not Q8_0: use gguf.quants.quantize"):
        quantize(np.zeros((1, 256), dtype=np.float32), GGMLQuantizationType.Q8_0)


def test_nan_is_a_value_error_naming_the_row():
    x = gaussian(rows=3, cols=512)
    x[2, 300] = np.nan
    with pytest.raises(ValueError, match="row 2 .* NaN or infinite"):
        quantize(x, Q4_K)


# ---- byte for byte as llama.cpp


def fixed_input() -> np.ndarray:
    """64 super-blocks made by exact arithmetic (no RNG, no libm), the same float32 values on every
    machine: uniform, heavy-tailed and mostly positive shapes, each 16 values scaled by a power of
    two from 2**-12 to 2**4 (so sub-block scales that round to 0, and fp16 subnormals), plus zero,
    constant, negative-only and outlier blocks."""
    i = np.arange(64 * QK_K, dtype=np.int64)
    u = (i * 2654435761 % 2**32) / 2**32 - 0.5
    block_kind = i // QK_K % 3
    shaped = np.where(block_kind == 0, u, np.where(block_kind == 1, 8 * u**3, u + 0.25))
    magnitude = np.repeat(2.0 ** (np.arange(64 * 16) % 17 - 12), 16)
    x = (shaped * magnitude).astype(np.float32).reshape(64, QK_K)
    x[0], x[1], x[2], x[3], x[4, 100] = 0, 0.75, -0.75, -np.abs(x[3]), 300
    return x


# SHA-256 of the bytes llama.cpp's quantize_row_q4_K_ref and quantize_row_q6_K_ref write for
# fixed_input(): the two functions and their helpers from ggml/src/ggml-quants.c, compiled with
# gcc 12 -O2 -ffp-contract=off on x86-64 (no fused multiply-adds, so plain IEEE float32).
REFERENCE_SHA256 = {
    Q4_K: "5b8118e06c84528774d0b924fc6a521a9d516a07549c4d2bdc997ad7d4143891",
    Q6_K: "8cb4b846ee9fcac25af61d4b3ef2a951f5f7fe3448bfbf36d6746dc6918fd96b",
}


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_bytes_are_llama_cpp_reference_bytes(qtype):
    digest = hashlib.sha256(quantize(fixed_input(), qtype).tobytes()).hexdigest()
    assert digest == REFERENCE_SHA256[qtype], "not the bytes llama.cpp's reference quantizer writes"


# ---- llama.cpp's own quantizer, where llama-cpp-python is installed


def llama_cpp_reference_library() -> ctypes.CDLL:
    llama_cpp = require_llama_cpp()
    package_dir = Path(llama_cpp.__file__).parent
    for path in sorted(package_dir.rglob("*")):
        if not (".so" in path.suffixes or path.suffix in (".dylib", ".dll")) or "ggml" not in path.name:
            continue
        try:
            library = ctypes.CDLL(str(path))
        except OSError:
            continue
        if hasattr(library, "quantize_row_q4_K_ref") and hasattr(library, "quantize_row_q6_K_ref"):
            return library
    pytest.skip(f"no ggml library under {package_dir} exports quantize_row_q4_K_ref")


def reference_bytes(library: ctypes.CDLL, x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    quantize_row = library.quantize_row_q4_K_ref if qtype == Q4_K else library.quantize_row_q6_K_ref
    quantize_row.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    quantize_row.restype = None
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(gguf.quant_shape_to_byte_shape(x.shape, qtype), dtype=np.uint8)
    quantize_row(x.ctypes.data, out.ctypes.data, x.size)
    return out


def assert_matches_reference(library: ctypes.CDLL, qtype: GGMLQuantizationType) -> None:
    x = np.concatenate([gaussian(rows=64), *[row[None] for row in edge_rows().values()]])
    block_size = GGML_QUANT_SIZES[qtype][1]
    ours, theirs = quantize(x, qtype), reference_bytes(library, x, qtype)
    identical = (ours.reshape(-1, block_size) == theirs.reshape(-1, block_size)).all(axis=1).mean()
    # All blocks are identical against a build without fused multiply-adds; a build with them
    # (-march=native) rounds some sums differently and a near-tie between two candidate grids can
    # then go the other way: about 5% of blocks, each an equally good fit.
    assert identical > 0.85
    assert relative_rms_error(x, ours, qtype) < 1.01 * relative_rms_error(x, theirs, qtype)


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_bytes_match_llama_cpp_reference_quantizer(qtype):
    assert_matches_reference(llama_cpp_reference_library(), qtype)


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K])
def test_a_stack_of_experts_quantizes_as_each_expert_s_matrix(qtype):
    """A MoE model's [experts, out, in] tensor (export_gguf.py's ffn_*_exps) is quantized row by row over its last
    axis: the bytes of each expert's matrix, stacked, as llama-quantize writes the 3-D tensor."""
    experts = np.random.default_rng(3).standard_normal((3, 4, 512)).astype(np.float32)
    stacked = kquants.quantize(experts, qtype)
    assert stacked.shape == (3, 4, 2 * GGML_QUANT_SIZES[qtype][1])
    assert np.array_equal(stacked, np.stack([kquants.quantize(matrix, qtype) for matrix in experts]))
    assert gguf.quants.dequantize(stacked, qtype).shape == experts.shape
