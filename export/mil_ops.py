"""Numpy semantics of the MIL operations our Core ML programs use (the interpreter's op table).

Each function takes the op's inputs by their MIL parameter names, already evaluated to numpy values
(floats as float32, integers and booleans in their own dtype, lists of values for variadic inputs),
and returns the output value (or a tuple, for ops with several outputs). Rounding to fp16 is not done
here: the interpreter (`coreml_check.py`) rounds every output whose MIL type is fp16 when it runs in
fp16 mode, which is how the ops compose on a device that stores fp16 activations.

Written from the MIL op reference (coremltools' `mil/ops/defs`, iOS 15 to iOS 18 opsets), not from
coremltools' own `value_inference`: the point of the interpreter is an independent reading of the
saved program. An op missing from `OPS` is an error naming it (see `coreml_check.UnsupportedOpError`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

Value = Any  # np.ndarray, or a list of them for variadic inputs
OPS: dict[str, Callable[..., Value]] = {}


def op(*names: str) -> Callable:
    def register(fn: Callable) -> Callable:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _axis_list(axes: np.ndarray | None, rank: int) -> tuple[int, ...] | None:
    return None if axes is None else tuple(int(a) % rank for a in np.atleast_1d(axes))


# --- elementwise ------------------------------------------------------------------------------


def _binary(fn: Callable) -> Callable:
    return lambda x, y: fn(x, y)


for _name, _fn in {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "pow": np.power, "maximum": np.maximum, "minimum": np.minimum,
    "floor_div": np.floor_divide, "mod": np.mod, "equal": np.equal, "not_equal": np.not_equal, "less": np.less,
    "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}.items():
    OPS[_name] = _binary(_fn)


@op("real_div")
def real_div(x, y):
    # True division even for int32 operands; the interpreter casts to the output type (int32 in the
    # shape arithmetic coremltools emits, where the division is exact).
    return np.true_divide(x, y)


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to within 1.2e-7 (Numerical Recipes' erfc Chebyshev fit): numpy has no erf, and the
    interpreter must not lean on torch for the values it checks torch against."""
    z = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
        0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return (np.sign(x) * (1.0 - erfc)).astype(np.float32)


UNARY = {
    "abs": np.abs, "ceil": np.ceil, "floor": np.floor, "round": np.round, "sign": np.sign, "exp": np.exp, "exp2": np.exp2,
    "sin": np.sin, "cos": np.cos, "tan": np.tan, "tanh": np.tanh, "sqrt": np.sqrt, "square": np.square,
    "erf": _erf, "logical_not": np.logical_not, "relu": lambda x: np.maximum(x, 0),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-f32(x))), "silu": lambda x: f32(x) / (1.0 + np.exp(-f32(x))),
}
for _name, _fn in UNARY.items():
    OPS[_name] = (lambda f: lambda x: f(x))(_fn)


@op("rsqrt")
def rsqrt(x, epsilon=np.float32(1e-12)):
    return 1.0 / np.sqrt(f32(x) + epsilon)


@op("inverse")
def inverse(x, epsilon=np.float32(1e-4)):
    # MIL's reciprocal is 1 / (x + epsilon), default 1e-4: what `1 / theta**x` RoPE code turns into.
    return 1.0 / (f32(x) + epsilon)


@op("log")
def log(x, epsilon=np.float32(1e-45)):
    return np.log(f32(x) + epsilon)


@op("clip")
def clip(x, alpha, beta):
    return np.minimum(np.maximum(x, alpha), beta)


@op("relu6")
def relu6(x):
    return np.minimum(np.maximum(x, 0), 6)


@op("thresholded_relu")
def thresholded_relu(x, alpha=np.float32(1.0)):
    return np.where(x >= alpha, x, 0).astype(np.float32)


@op("sigmoid_hard")
def sigmoid_hard(x, alpha=np.float32(0.2), beta=np.float32(0.5)):
    return np.clip(alpha * f32(x) + beta, 0.0, 1.0)


@op("gelu")
def gelu(x, mode=np.array("EXACT")):
    x = f32(x)
    mode = str(mode)
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    raise ValueError(f"gelu mode {mode!r}")


@op("select")
def select(cond, a, b):
    return np.where(cond, a, b)


@op("cast")
def cast(x, dtype):
    # The interpreter converts to the output var's dtype (and rounds fp16 in fp16 mode).
    return np.asarray(x)


# --- reductions, normalisation, softmax -----------------------------------------------------------


def _reduce(fn: Callable) -> Callable:
    def reduce(x, axes=None, keep_dims=np.bool_(False)):
        return fn(f32(x), axis=_axis_list(axes, np.ndim(x)), keepdims=bool(keep_dims))

    return reduce


for _name, _fn in {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min, "reduce_prod": np.prod}.items():
    OPS[_name] = _reduce(_fn)


@op("reduce_argmax")
def reduce_argmax(x, axis=np.int32(-1), keep_dims=np.bool_(False)):
    out = np.argmax(x, axis=int(axis))
    return np.expand_dims(out, int(axis)) if bool(keep_dims) else out


@op("topk")
def topk(x, k=np.int32(1), axis=np.int32(-1), ascending=np.bool_(False), sort=np.bool_(True), return_indices=np.bool_(True),
         output_indices_dtype=np.array("int32")):
    """Values and int32 indices of the k largest (smallest if ascending) along axis; ties keep the
    lower index first, as a stable sort does (the MoE router's top-k)."""
    axis, k = int(axis), int(k)
    order = np.argsort(x if bool(ascending) else -x, axis=axis, kind="stable")
    indices = np.take(order, np.arange(k), axis=axis)
    values = np.take_along_axis(x, indices, axis=axis)
    return (values, indices.astype(str(output_indices_dtype))) if bool(return_indices) else values


@op("softmax")
def softmax(x, axis=np.int32(-1)):
    x = f32(x)
    e = np.exp(x - np.max(x, axis=int(axis), keepdims=True))
    return e / np.sum(e, axis=int(axis), keepdims=True)


@op("layer_norm")
def layer_norm(x, axes=None, gamma=None, beta=None, epsilon=np.float32(1e-5)):
    x = f32(x)
    axes = _axis_list(axes, x.ndim)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + epsilon)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y


# --- linear algebra -------------------------------------------------------------------------------


@op("linear")
def linear(x, weight, bias=None):
    y = f32(x) @ f32(weight).T
    return y + bias if bias is not None else y


@op("matmul")
def matmul(x, y, transpose_x=np.bool_(False), transpose_y=np.bool_(False)):
    x, y = f32(x), f32(y)
    if bool(transpose_x):
        x = np.swapaxes(x, -1, -2)
    if bool(transpose_y):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op("scaled_dot_product_attention")
def scaled_dot_product_attention(query, key, value, attn_mask=None):
    """softmax(Q K^T / sqrt(E) + mask) V; a bool mask keeps where True. Heads must match exactly
    (batch dims broadcast as numpy does): a converter that tiled KV heads has already done so."""
    q, k, v = f32(query), f32(key), f32(value)
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(math.sqrt(q.shape[-1]))
    if attn_mask is not None:
        scores = np.where(attn_mask, scores, -np.inf) if attn_mask.dtype == np.bool_ else scores + attn_mask
    return np.matmul(softmax(scores, -1), v)


# --- shapes, slicing, copying ---------------------------------------------------------------------


@op("shape")
def shape(x):
    return np.array(np.shape(x), dtype=np.int32)


@op("reshape")
def reshape(x, shape):
    target = [int(s) for s in np.atleast_1d(shape)]
    if len(target) == np.ndim(x):  # 0 copies the input's size on that axis (same rank only)
        target = [np.shape(x)[i] if s == 0 else s for i, s in enumerate(target)]
    return np.reshape(x, target)


@op("transpose")
def transpose(x, perm):
    return np.transpose(x, [int(p) for p in perm])


@op("expand_dims")
def expand_dims(x, axes):
    out = np.asarray(x)
    rank = out.ndim + len(np.atleast_1d(axes))
    for axis in sorted(int(a) % rank for a in np.atleast_1d(axes)):
        out = np.expand_dims(out, axis)
    return out


@op("squeeze")
def squeeze(x, axes=None):
    return np.squeeze(x, axis=_axis_list(axes, np.ndim(x)))


@op("tile")
def tile(x, reps):
    return np.tile(x, [int(r) for r in np.atleast_1d(reps)])


@op("concat")
def concat(values, axis, interleave=np.bool_(False)):
    if bool(interleave):
        stacked = np.stack(values, axis=int(axis) + 1 if int(axis) >= 0 else int(axis))
        shape = list(np.shape(values[0]))
        shape[int(axis)] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate([np.atleast_1d(v) for v in values], axis=int(axis))


@op("stack")
def stack(values, axis):
    return np.stack(values, axis=int(axis))


@op("split")
def split(x, num_splits=None, split_sizes=None, axis=np.int32(0)):
    if split_sizes is not None:
        cuts = np.cumsum([int(s) for s in split_sizes])[:-1]
    else:
        cuts = int(num_splits)
    return tuple(np.split(x, cuts, axis=int(axis)))


@op("gather")
def gather(x, indices, axis=np.int32(0), batch_dims=np.int32(0), validate_indices=np.bool_(False)):
    if int(batch_dims) != 0:
        raise ValueError(f"gather with batch_dims={int(batch_dims)}")
    axis = int(axis) % np.ndim(x)
    idx = np.asarray(indices).astype(np.int64)
    size = np.shape(x)[axis]
    if np.any((idx < -size) | (idx >= size)):
        raise IndexError(f"gather index out of range for axis {axis} of size {size}")
    return np.take(x, np.where(idx < 0, idx + size, idx), axis=axis)


@op("gather_along_axis")
def gather_along_axis(x, indices, axis=np.int32(0), validate_indices=np.bool_(False)):
    return np.take_along_axis(x, np.asarray(indices).astype(np.int64), axis=int(axis))


def _slices(shape: tuple[int, ...], begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None) -> tuple:
    """MIL slice arguments -> a numpy index (an int where the squeeze mask asks for pure indexing)."""
    index = []
    for i in range(len(shape)):
        b, e = int(np.atleast_1d(begin)[i]), int(np.atleast_1d(end)[i])
        s = 1 if stride is None else int(np.atleast_1d(stride)[i])
        if squeeze_mask is not None and bool(squeeze_mask[i]):
            index.append(b)
            continue
        index.append(slice(None if begin_mask is not None and begin_mask[i] else b, None if end_mask is not None and end_mask[i] else e, s))
    return tuple(index)


@op("slice_by_index")
def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    return np.asarray(x)[_slices(np.shape(x), begin, end, stride, begin_mask, end_mask, squeeze_mask)]


@op("slice_by_size")
def slice_by_size(x, begin, size):
    index = tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size))
    return np.asarray(x)[index]


@op("slice_update")
def slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    out = np.array(x, copy=True)
    index = _slices(out.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    target = out[index].shape
    if np.shape(update) != target:
        raise ValueError(f"slice_update: update of shape {np.shape(update)} does not fit the slice {target}")
    out[index] = update
    return out


@op("range_1d")
def range_1d(start, end, step):
    return np.arange(start, end, step)


@op("fill")
def fill(shape, value=np.float32(0.0)):
    return np.full([int(s) for s in shape], value)


@op("identity")
def identity(x):
    return np.asarray(x)


# --- convolution and pooling ----------------------------------------------------------------------


def _padding(pad_type: str, pad, size: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """(before, after) per spatial axis, for MIL's `valid` / `custom` / `same` / `same_lower`."""
    if pad_type == "valid":
        return [(0, 0)] * len(size)
    if pad_type == "custom":
        return [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(len(size))]
    if pad_type in ("same", "same_lower"):
        out = []
        for n, k, s, d in zip(size, kernel, strides, dilations):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            small, large = total // 2, total - total // 2
            out.append((small, large) if pad_type == "same" else (large, small))
        return out
    raise ValueError(f"pad_type {pad_type!r}")


def _windows(x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...]) -> np.ndarray:
    """[N, C, *spatial] -> [N, C, *out, *kernel] views of every (strided, dilated) window."""
    spatial = x.ndim - 2
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    view = np.lib.stride_tricks.sliding_window_view(x, span, axis=tuple(range(2, 2 + spatial)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, d) for d in dilations)
    return view[index]


@op("conv")
def conv(x, weight, bias=None, strides=None, pad_type=np.array("valid"), pad=None, dilations=None, groups=np.int32(1)):
    x, w = f32(x), f32(weight)
    spatial = x.ndim - 2
    kernel = w.shape[2:]
    strides = tuple(int(s) for s in strides) if strides is not None else (1,) * spatial
    dilations = tuple(int(d) for d in dilations) if dilations is not None else (1,) * spatial
    padding = _padding(str(pad_type), pad, x.shape[2:], kernel, strides, dilations)
    x = np.pad(x, [(0, 0), (0, 0)] + padding)
    windows = _windows(x, kernel, strides, dilations)  # [N, C, *out, *k]
    g = int(groups)
    n, c = x.shape[:2]
    out_shape = windows.shape[2 : 2 + spatial]
    windows = windows.reshape(n, g, c // g, *out_shape, *kernel)
    w = w.reshape(g, w.shape[0] // g, *w.shape[1:])  # [G, O/G, C/G, *k]
    letters = "hijk"[:spatial], "pqrs"[:spatial]
    y = np.einsum(f"ngc{letters[0]}{letters[1]},goc{letters[1]}->ngo{letters[0]}", windows, w, optimize=True)
    y = y.reshape(n, -1, *out_shape)
    if bias is not None:
        y = y + bias.reshape(1, -1, *([1] * spatial))
    return y


def _pool(reduce: Callable, x, kernel_sizes, strides, pad_type, pad, exclude_padding: bool, ceil_mode: bool, fill: float) -> np.ndarray:
    x = f32(x)
    spatial = x.ndim - 2
    kernel = tuple(int(k) for k in kernel_sizes)
    strides = tuple(int(s) for s in strides)
    padding = _padding(str(pad_type), pad, x.shape[2:], kernel, strides, (1,) * spatial)
    if ceil_mode:
        raise ValueError("pooling with ceil_mode")
    padded = np.pad(x, [(0, 0), (0, 0)] + padding, constant_values=fill)
    windows = _windows(padded, kernel, strides, (1,) * spatial)
    axes = tuple(range(-spatial, 0))
    if reduce is np.mean and exclude_padding and any(p != (0, 0) for p in padding):
        ones = np.pad(np.ones(x.shape[2:], np.float32), padding)
        counts = _windows(ones[None, None], kernel, strides, (1,) * spatial).sum(axis=axes)
        return windows.sum(axis=axes) / counts
    return reduce(windows, axis=axes)


@op("avg_pool")
def avg_pool(x, kernel_sizes, strides, pad_type=np.array("valid"), pad=None, exclude_padding_from_average=np.bool_(False), ceil_mode=np.bool_(False)):
    return _pool(np.mean, x, kernel_sizes, strides, pad_type, pad, bool(exclude_padding_from_average), bool(ceil_mode), 0.0)


@op("max_pool")
def max_pool(x, kernel_sizes, strides, pad_type=np.array("valid"), pad=None, ceil_mode=np.bool_(False)):
    return _pool(np.max, x, kernel_sizes, strides, pad_type, pad, False, bool(ceil_mode), -np.inf)
