"""Writing llama.cpp's K-quant formats Q4_K and Q6_K in numpy, for GGUF files in the q4_k_m mix.

The `gguf` package reads these formats (`gguf.quants.dequantize`) but cannot write them. The
algorithms are llama.cpp's reference quantizers, the ones `llama-quantize` uses when it has no
importance matrix: `quantize_row_q4_K_ref` (with `make_qkx2_quants`) and `quantize_row_q6_K_ref`
(with `make_qx_quants`) in ggml/src/ggml-quants.c, down to the order of float32 additions. The
bytes are identical to theirs compiled without fused multiply-adds; a -march=native build fuses
some and picks a different, equally good grid for a few percent of blocks. Every step runs on all
super-blocks of a chunk at once; the only Python loops are over a search's candidate grids.

    >>> w = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    >>> q = quantize(w, GGMLQuantizationType.Q4_K)
    >>> q.shape, q.dtype  # per row: 2 super-blocks of 144 bytes
    ((4, 288), dtype('uint8'))
    >>> back = gguf.quants.dequantize(q, GGMLQuantizationType.Q4_K)  # about 7% RMS error

Formats (one super-block of QK_K = 256 values; fp16 numbers little-endian):
    Q4_K, 144 bytes: d, dmin (fp16) | 12 bytes: eight 6-bit scales and eight 6-bit mins |
        128 bytes of 4-bit levels. Sub-block j (32 values) is d*scale_j*level - dmin*min_j.
    Q6_K, 210 bytes: 128 bytes of low 4 bits | 64 bytes of high 2 bits | 16 int8 scales | d (fp16).
        Sub-block j (16 values) is d*scale_j*(level - 32).
d and dmin are fp16, so very small values lose precision, as in llama.cpp: a super-block of RMS
1e-4 reads back with 11% (Q6_K) and 8% (Q4_K) RMS error, against 1.8% and 7% from 1e-2 up; below
about 3e-5 Q6_K stores zeros and Q4_K's error soon passes 100%.
"""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

# Super-blocks per vectorized pass: enough to amortize numpy's per-call cost, few enough that the
# temporaries of a search step (a few MB) stay in cache.
BLOCKS_PER_CHUNK = 2048

# What llama-quantize writes instead when a tensor's rows are not a multiple of 256 (F16 where
# they are not a multiple of 32 either); gguf.quants.quantize writes both.
FALLBACK_TYPES = {
    GGMLQuantizationType.Q4_K: GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q6_K: GGMLQuantizationType.Q8_0,
}

# ggml's threshold below which a sub-block (Q6_K) or a whole super-block counts as all zeros.
GROUP_MAX_EPS = np.float32(1e-15)


def quantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize `data` (any float dtype, any shape) to Q4_K or Q6_K bytes, row by row.

    The last axis is a row of values and must hold a multiple of 256 (QK_K); it becomes the row's
    bytes: shape (..., n) -> (..., n // 256 * type_size), uint8, as `gguf.quants.quantize` returns
    and `gguf.quants.dequantize` reads. Raises ValueError for a row length that is not a multiple
    of 256 (the caller stores that tensor in another type: FALLBACK_TYPES), for a type other than
    Q4_K and Q6_K, and for NaN or infinite values.
    """
    qtype = GGMLQuantizationType(qtype)
    if qtype not in _QUANTIZE_BLOCKS:
        raise ValueError(f"chatft.export.kquants writes Q4_K and Q6_K, not {qtype.name}: "
                         f"use gguf.quants.quantize for {qtype.name}")
    data = np.asarray(data)
    if data.ndim == 0 or data.shape[-1] % QK_K:
        raise ValueError(f"cannot quantize a tensor of shape {data.shape} to {qtype.name}: its rows must hold a "
                         f"multiple of {QK_K} values (one K-quant super-block); llama.cpp stores such a tensor as "
                         f"{FALLBACK_TYPES[qtype].name} instead (chatft.export.kquants.FALLBACK_TYPES)")
    blocks = data.astype(np.float32, copy=False).reshape(-1, QK_K)
    out = np.empty((len(blocks), GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    for start in range(0, len(blocks), BLOCKS_PER_CHUNK):
        chunk = blocks[start:start + BLOCKS_PER_CHUNK]
        _require_finite(chunk, first_block=start, blocks_per_row=data.shape[-1] // QK_K)
        out[start:start + len(chunk)] = _QUANTIZE_BLOCKS[qtype](chunk)
    return out.reshape(gguf.quant_shape_to_byte_shape(data.shape, qtype))


def _require_finite(chunk: np.ndarray, first_block: int, blocks_per_row: int) -> None:
    finite = np.isfinite(chunk).all(axis=1)
    if not finite.all():
        row = (first_block + int(np.argmin(finite))) // blocks_per_row
        raise ValueError(f"cannot quantize: row {row} (counting rows across all leading axes) holds NaN or "
                         f"infinite values")


# ---- Q4_K


def _quantize_q4_k_blocks(x: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 144) uint8, as quantize_row_q4_K_ref."""
    n = len(x)
    values = _columns(x, 32)
    # Weights favour large values, plus a floor (the sub-block's RMS) so small ones still count.
    weights = np.sqrt(_column_sums(values * values) / 32) + np.abs(values)
    scales, mins, levels = _fit_scale_and_min(values, weights)

    # Each sub-block's scale and min become 6-bit multiples of the super-block's fp16 d and dmin.
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = np.maximum(scales.max(axis=1), 0)
    max_min = np.maximum(mins.max(axis=1), 0)
    scale_codes = _six_bit_codes(scales, max_scale)
    min_codes = _six_bit_codes(mins, max_min)
    d = (max_scale / 63).astype(np.float16)
    dmin = (max_min / 63).astype(np.float16)

    # Levels again, against the scales and mins as stored.
    step = (d.astype(np.float32)[:, None] * scale_codes).reshape(-1)
    offset = (dmin.astype(np.float32)[:, None] * min_codes).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        stored = np.clip(np.rint((values + offset) / step), 0, 15)
    levels = np.where(step != 0, stored, levels)  # ggml keeps the search's levels there
    return _pack_q4_k(d, dmin, scale_codes, min_codes, _rows(levels.astype(np.uint8), n))


def _fit_scale_and_min(x: np.ndarray, weights: np.ndarray, top: int = 15, rmin: float = -1.0,
                       rdelta: float = 0.1, nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants down each column: x ~ low + scale*level, level in 0..top, low <= 0.

    Tries nstep+1 grids (inverse steps (top + rmin + rdelta*i)/(max - low)), fits scale and low to
    each grid's levels by weighted least squares, and keeps the one with the least weighted
    squared error. As in ggml, `low` moves to each better fit's low before the next grid.
    Returns scale, min = -low (>= 0) and levels (float32, 0..top).
    """
    low = np.minimum(x.min(axis=0), 0)  # the min is stored without a sign
    high = x.max(axis=0)
    flat = high == low  # constant and <= 0: all levels 0, the value is low
    inv_step = top / np.where(flat, 1, high - low)
    scale = 1 / inv_step
    best_error = _weighted_squared_error(x, weights, _levels(x, low, inv_step, top), scale, low)
    best_inv_step, low_at_best = inv_step, low  # the grid the best levels come from

    sum_w = _column_sums(weights)
    sum_x = _column_sums(weights * x)
    for i in range(nstep + 1):
        inv_step = (np.float32(rmin) + np.float32(rdelta) * i + top) / np.where(flat, 1, high - low)
        levels = _levels(x, low, inv_step, top)
        wl = weights * levels
        sum_l, sum_l2, sum_xl = _column_sums(wl), _column_sums(wl * levels), _column_sums(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):  # where det <= 0, discarded below
            fit_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            fit_low = (sum_l2 * sum_x - sum_l * sum_xl) / det
            above_zero = fit_low > 0  # refit with low pinned at 0
            fit_scale = np.where(above_zero, sum_xl / sum_l2, fit_scale)
            fit_low = np.where(above_zero, 0, fit_low)
            error = _weighted_squared_error(x, weights, levels, fit_scale, fit_low)
        better = (det > 0) & (error < best_error) & ~flat
        best_error = np.where(better, error, best_error)
        best_inv_step = np.where(better, inv_step, best_inv_step)
        low_at_best = np.where(better, low, low_at_best)
        scale = np.where(better, fit_scale, scale)
        low = np.where(better, fit_low, low)

    levels = np.where(flat, 0, _levels(x, low_at_best, best_inv_step, top))
    return np.where(flat, 0, scale), -low, levels


def _levels(x: np.ndarray, low: np.ndarray, inv_step: np.ndarray, top: int) -> np.ndarray:
    levels = x - low
    levels *= inv_step
    np.rint(levels, out=levels)  # half to even, as ggml's nearest_int
    return np.clip(levels, 0, top, out=levels)


def _weighted_squared_error(x: np.ndarray, weights: np.ndarray, levels: np.ndarray, scale: np.ndarray,
                            low: np.ndarray) -> np.ndarray:
    diff = scale * levels + low - x
    return _column_sums(weights * (diff * diff))


def _six_bit_codes(values: np.ndarray, largest: np.ndarray) -> np.ndarray:
    """round(values * 63/largest), clamped to 63; largest == 0 gives 0. A negative value wraps
    through uint8 and clamps to 63, as in ggml (only a degenerate fit gives one)."""
    with np.errstate(divide="ignore"):
        inverse = np.where(largest > 0, 63 / largest, 0).astype(np.float32)
    codes = np.rint(inverse[:, None] * values).astype(np.int64) & 0xFF
    return np.minimum(codes, 63).astype(np.uint8)


def _pack_q4_k(d: np.ndarray, dmin: np.ndarray, scale_codes: np.ndarray, min_codes: np.ndarray,
               levels: np.ndarray) -> np.ndarray:
    n = len(d)
    # 12 bytes: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks
    # 4-7 as low nibbles in bytes 8-11 and their top 2 bits in bits 6-7 of bytes 0-7.
    low_scales, high_scales = scale_codes[:, :4], scale_codes[:, 4:]
    low_mins, high_mins = min_codes[:, :4], min_codes[:, 4:]
    packed_scales = np.concatenate([low_scales | (high_scales >> 4) << 6,
                                    low_mins | (high_mins >> 4) << 6,
                                    (high_scales & 0xF) | (high_mins & 0xF) << 4], axis=1)
    # 32 bytes per pair of sub-blocks: the first in the low nibbles, the second in the high.
    pairs = levels.reshape(n, 4, 2, 32)
    qs = pairs[:, :, 0] | pairs[:, :, 1] << 4
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), packed_scales, qs.reshape(n, -1)], axis=1)


# ---- Q6_K


def _quantize_q6_k_blocks(x: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 210) uint8, as quantize_row_q6_K_ref."""
    n = len(x)
    values = _columns(x, 16)
    scales, levels = _fit_symmetric_scale(values)

    # Scales become int8 multiples of the fp16 d, the largest-magnitude one exactly -128.
    scales = scales.reshape(n, 16)
    widest = _largest_magnitude(scales, axis=1)
    empty = np.abs(widest) < GROUP_MAX_EPS
    inverse = -128 / np.where(empty, 1, widest)
    d = np.where(empty, 0, 1 / inverse).astype(np.float16)
    scale_codes = np.minimum(127, np.rint(inverse[:, None] * scales)).astype(np.int8)

    # Levels again, against the scales as stored.
    step = (d.astype(np.float32)[:, None] * scale_codes).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        stored = np.clip(np.rint(values / step), -32, 31) + 32
    levels = _rows(np.where(step != 0, stored, levels).astype(np.uint8), n)  # ggml keeps the search's levels there
    levels[empty] = 0  # an empty super-block is all zero bytes
    scale_codes[empty] = 0
    return _pack_q6_k(d, scale_codes, levels)


def _fit_symmetric_scale(x: np.ndarray, top: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants with rmse_type 1 down each column: x ~ scale*(level - top), level in 0..2*top-1.

    The first grid puts the largest-magnitude value at exactly -top steps; 18 more stretch it
    (top + 0.1*i steps, i in -9..9). Each grid's levels get the least-squares scale under weights
    x**2, and the grid with the least weighted error wins. Returns scale (0 for an all-zero
    sub-block) and levels (float32).
    """
    peak = _largest_magnitude(x, axis=0)
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, 1, peak)
    weights = x * x
    weighted_x = weights * x

    best_inv_step = -top / peak
    sum_lx, sum_l2 = _symmetric_sums(x, weights, weighted_x, best_inv_step, top)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sum_l2 != 0, sum_lx / sum_l2, 0)
    # A fit's weighted error is sum(w*x*x) - scale*sum_lx: the larger `best`, the smaller the error.
    best = scale * sum_lx
    for i in range(-9, 10):
        if i == 0:
            continue
        inv_step = -(top + np.float32(0.1) * i) / peak
        sum_lx, sum_l2 = _symmetric_sums(x, weights, weighted_x, inv_step, top)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(better, sum_lx / sum_l2, scale)
        best = np.where(better, scale * sum_lx, best)
        best_inv_step = np.where(better, inv_step, best_inv_step)

    levels = _symmetric_levels(x, best_inv_step, top) + top
    return np.where(zero, 0, scale), np.where(zero, 0, levels)


def _symmetric_sums(x: np.ndarray, weights: np.ndarray, weighted_x: np.ndarray, inv_step: np.ndarray,
                    top: int) -> tuple[np.ndarray, np.ndarray]:
    levels = _symmetric_levels(x, inv_step, top)
    return _column_sums(weighted_x * levels), _column_sums(weights * levels * levels)


def _symmetric_levels(x: np.ndarray, inv_step: np.ndarray, top: int) -> np.ndarray:
    levels = x * inv_step
    np.rint(levels, out=levels)
    return np.clip(levels, -top, top - 1, out=levels)


def _largest_magnitude(values: np.ndarray, axis: int) -> np.ndarray:
    """The signed value of largest magnitude along `axis`, the first one on a tie (as ggml)."""
    first = np.expand_dims(np.abs(values).argmax(axis=axis), axis)
    return np.take_along_axis(values, first, axis=axis).squeeze(axis)


def _pack_q6_k(d: np.ndarray, scale_codes: np.ndarray, levels: np.ndarray) -> np.ndarray:
    n = len(d)
    # Each half super-block (128 values) is four runs of 32: the low nibbles of runs 0 and 2 share
    # 32 bytes of ql (run 2 in the high nibble), as do runs 1 and 3; qh holds all four runs' top
    # 2 bits, run k at bits 2k.
    runs = levels.reshape(n, 2, 4, 32)
    low, high = runs & 0xF, runs >> 4
    ql = low[:, :, :2] | low[:, :, 2:] << 4
    qh = high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6
    return np.concatenate([ql.reshape(n, -1), qh.reshape(n, -1), scale_codes.view(np.uint8), _fp16_bytes(d)],
                          axis=1)


# ---- layout helpers


def _columns(x: np.ndarray, sub_block: int) -> np.ndarray:
    """(n, 256) -> (sub_block, n*256/sub_block): one sub-block per column. Sums down axis 0 then
    add the values in order, as ggml's loops do (so the same float32 roundings, and the same
    choices between near-equal grids), while each numpy operation runs across all sub-blocks."""
    return np.ascontiguousarray(x.reshape(-1, sub_block).T)


def _rows(columns: np.ndarray, n: int) -> np.ndarray:
    """The inverse of _columns: (sub_block, n*256/sub_block) -> (n, 256)."""
    return columns.T.reshape(n, QK_K)


def _column_sums(values: np.ndarray) -> np.ndarray:
    return values.sum(axis=0)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype("<f2").view(np.uint8).reshape(len(values), 2)


_QUANTIZE_BLOCKS = {
    GGMLQuantizationType.Q4_K: _quantize_q4_k_blocks,
    GGMLQuantizationType.Q6_K: _quantize_q6_k_blocks,
}
