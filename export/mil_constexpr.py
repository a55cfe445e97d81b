"""Numpy semantics of MIL's constexpr ops: how compressed weights decompress.

coremltools' `ct.optimize.coreml` stores a compressed weight as a small graph of constants feeding one
constexpr op, which Core ML evaluates when it loads the model. These are the formats our recipes
produce (iOS 18: block-wise shift-scale for int8 / int4, lookup tables for palettization) and the
iOS 16 forms an older converter may emit. Each is written from the op reference, independently of
coremltools' own `value_inference`, so a mistake in either shows up as a parity failure.
"""

from __future__ import annotations

import numpy as np

from .mil_ops import f32, op


def _blockwise(small: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block parameter [n0, n1, ...] to the full shape (block size = shape / n, per axis)."""
    out = np.asarray(small)
    for axis, (n, full) in enumerate(zip(out.shape, shape)):
        if full % n:
            raise ValueError(f"block parameter of shape {out.shape} does not divide the data shape {shape}")
        out = np.repeat(out, full // n, axis=axis)
    return out


@op("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(data, scale, offset=None):
    """output = scale * (data - offset), each of scale / offset covering one block of data."""
    data = np.asarray(data).astype(np.float32)
    shifted = data - _blockwise(np.asarray(offset).astype(np.float32), data.shape) if offset is not None else data
    return shifted * _blockwise(f32(scale), data.shape)


@op("constexpr_lut_to_dense")
def constexpr_lut_to_dense(indices, lut, vector_axis=None):
    """output[i] = lut[block of i][indices[i]]; lut is [*blocks, palette, vector] (vector size 1 only)."""
    indices = np.asarray(indices).astype(np.int64)
    lut = f32(lut)
    if lut.shape[-1] != 1:
        raise ValueError("vector palettization (lut vector size > 1)")
    rank = indices.ndim
    blocks = lut.shape[:rank]
    index = [np.arange(n).reshape([-1 if a == i else 1 for a in range(rank)]) // (n // b) for i, (n, b) in enumerate(zip(indices.shape, blocks))]
    return lut[(*index, indices, 0)]


@op("constexpr_affine_dequantize")
def constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    """iOS 16 per-channel (or per-tensor) form: (q - zero_point) * scale along `axis`."""
    q = np.asarray(quantized_data).astype(np.float32)
    shape = [1] * q.ndim
    shape[int(axis)] = -1
    zp, sc = np.asarray(zero_point).astype(np.float32), f32(scale)
    zp = zp.reshape(shape) if zp.size > 1 else zp
    sc = sc.reshape(shape) if sc.size > 1 else sc
    return (q - zp) * sc


@op("constexpr_cast")
def constexpr_cast(source_val, output_dtype):
    return f32(source_val)
