"""The numpy MIL interpreter: each op against a numpy / torch formula, state carried across calls, fp16
rounding, clear errors; and the two conversion traps it exists to catch (tiled GQA heads, reciprocal
RoPE), reproduced on toys converted by coremltools."""

from __future__ import annotations

import coremltools as ct
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from torch import nn

from mobilevlm.export.coreml_check import MILProgram, UnsupportedOpError
from mobilevlm.export.mil_ops import OPS

IOS18 = ct.target.iOS18


def run(fn, specs, inputs, precision="fp32"):
    """Build a MIL program from `fn` (its parameters are the inputs), interpret it, return its outputs."""
    program = mb.program(input_specs=specs, opset_version=IOS18)(fn)
    outputs = MILProgram(program, precision).predict(inputs)
    return list(outputs.values())


def spec(*shape, dtype=types.fp32):
    return mb.TensorSpec(shape, dtype=dtype)


rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_linear_and_matmul():
    x, w, b, y, z = randn(2, 3, 4), randn(5, 4), randn(5), randn(2, 5, 4), randn(2, 3, 6)

    def fn(x, y, z):
        return mb.linear(x=x, weight=w, bias=b), mb.matmul(x=x, y=y, transpose_y=True), mb.matmul(x=x, y=z, transpose_x=True)

    lin, mm, mmx = run(fn, [spec(2, 3, 4), spec(2, 5, 4), spec(2, 3, 6)], {"x": x, "y": y, "z": z})
    np.testing.assert_allclose(lin, x @ w.T + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mm, x @ np.swapaxes(y, 1, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mmx, np.swapaxes(x, 1, 2) @ z, rtol=1e-5, atol=1e-5)


def test_rmsnorm_from_pow_reduce_mean_rsqrt_and_softmax():
    x = randn(2, 5, 8)

    def fn(x):
        mean = mb.reduce_mean(x=mb.pow(x=x, y=2.0), axes=[-1], keep_dims=True)
        return mb.mul(x=x, y=mb.rsqrt(x=mb.add(x=mean, y=1e-6))), mb.softmax(x=x, axis=1), mb.reduce_sum(x=x, axes=[0, 2])

    norm, soft, total = run(fn, [spec(2, 5, 8)], {"x": x})
    t = torch.from_numpy(x)
    np.testing.assert_allclose(norm, (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(soft, torch.softmax(t, 1).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(total, x.sum(axis=(0, 2)), rtol=1e-5, atol=1e-5)


def test_slicing_with_masks_strides_negative_indices_and_squeeze():
    x = randn(4, 6, 5)

    def fn(x):
        a = mb.slice_by_index(x=x, begin=[1, 0, -1], end=[0, 0, 0], stride=[1, 2, 1], end_mask=[True, True, False], squeeze_mask=[False, False, True])
        b = mb.slice_by_index(x=x, begin=[0, 2, 1], end=[3, -1, 4], begin_mask=[True, False, False])
        c = mb.slice_by_size(x=x, begin=[1, 2, 0], size=[2, -1, 3])
        return a, b, c

    a, b, c = run(fn, [spec(4, 6, 5)], {"x": x})
    np.testing.assert_array_equal(a, x[1:, ::2, -1])
    np.testing.assert_array_equal(b, x[:3, 2:-1, 1:4])
    np.testing.assert_array_equal(c, x[1:3, 2:, 0:3])


def test_concat_gather_reshape_transpose_tile_expand_squeeze_select():
    x = randn(2, 3, 4)

    def fn(x):
        cat = mb.concat(values=[x, mb.mul(x=x, y=2.0)], axis=1)
        gathered = mb.gather(x=x, indices=np.array([2, 0, -1], np.int32), axis=1)
        shaped = mb.reshape(x=x, shape=[0, -1, 2])  # 0 keeps the size of axis 0 (when the rank is kept)
        moved = mb.transpose(x=x, perm=[2, 0, 1])
        tiled = mb.tile(x=x, reps=[1, 2, 1])
        squeezed = mb.squeeze(x=mb.expand_dims(x=x, axes=[0, -1]), axes=[0])
        chosen = mb.select(cond=mb.greater(x=x, y=0.0), a=x, b=mb.mul(x=x, y=0.5))
        return cat, gathered, shaped, moved, tiled, squeezed, chosen

    cat, gathered, shaped, moved, tiled, squeezed, chosen = run(fn, [spec(2, 3, 4)], {"x": x})
    np.testing.assert_array_equal(cat, np.concatenate([x, 2 * x], axis=1))
    np.testing.assert_array_equal(gathered, x[:, [2, 0, 2]])
    np.testing.assert_array_equal(shaped, x.reshape(2, 6, 2))
    np.testing.assert_array_equal(moved, x.transpose(2, 0, 1))
    np.testing.assert_array_equal(tiled, np.tile(x, (1, 2, 1)))
    np.testing.assert_array_equal(squeezed, x[..., None])
    np.testing.assert_array_equal(chosen, np.where(x > 0, x, 0.5 * x))


def test_activations_match_torch():
    x = randn(3, 7) * 3

    def fn(x):
        kept = mb.thresholded_relu(x=x, alpha=-3.0)  # hardswish as coremltools lowers it
        return (mb.sin(x=x), mb.cos(x=x), mb.silu(x=x), mb.gelu(x=x, mode="EXACT"), mb.gelu(x=x, mode="TANH_APPROXIMATION"),
                mb.sigmoid(x=x), mb.mul(x=kept, y=mb.sigmoid_hard(x=kept, alpha=1 / 6, beta=0.5)))

    sin, cos, silu, gelu, gelu_tanh, sigmoid, hardswish = run(fn, [spec(3, 7)], {"x": x})
    t = torch.from_numpy(x)
    for got, want in [(sin, t.sin()), (cos, t.cos()), (silu, F.silu(t)), (gelu, F.gelu(t)), (gelu_tanh, F.gelu(t, approximate="tanh")),
                      (sigmoid, t.sigmoid()), (hardswish, F.hardswish(t))]:
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride,pad_type,groups", [(2, "custom", 1), (1, "same", 4), (1, "valid", 2)])
def test_conv_matches_torch(stride, pad_type, groups):
    x, w, b = randn(1, 4, 7, 7), randn(6 if groups != 4 else 4, 4 // groups, 3, 3), randn(6 if groups != 4 else 4)

    def fn(x):
        kwargs = {"pad": [1, 1, 1, 1]} if pad_type == "custom" else {}
        return mb.conv(x=x, weight=w, bias=b, strides=[stride, stride], pad_type=pad_type, dilations=[1, 1], groups=groups, **kwargs)

    (got,) = run(fn, [spec(1, 4, 7, 7)], {"x": x})
    padding = {"custom": 1, "same": "same", "valid": 0}[pad_type]
    want = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), stride=stride, padding=padding, groups=groups)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_avg_pool_and_layer_norm_match_torch():
    x, gamma, beta = randn(1, 3, 6, 6), randn(6), randn(6)

    def fn(x):
        return mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[3, 3], pad_type="valid"), mb.layer_norm(x=x, axes=[-1], gamma=gamma, beta=beta, epsilon=1e-5)

    pooled, normed = run(fn, [spec(1, 3, 6, 6)], {"x": x})
    t = torch.from_numpy(x)
    np.testing.assert_allclose(pooled, F.avg_pool2d(t, 3, 3).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(normed, F.layer_norm(t, (6,), torch.from_numpy(gamma), torch.from_numpy(beta)).numpy(), rtol=1e-4, atol=1e-5)


def test_scaled_dot_product_attention_matches_torch():
    q, k, v = randn(1, 2, 3, 4), randn(1, 2, 5, 4), randn(1, 2, 5, 4)
    additive = np.where(np.arange(5)[None] <= np.arange(2, 5)[:, None], 0.0, -np.inf).astype(np.float32)[None, None]

    def fn(q, k, v, mask):
        return (mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask),
                mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mb.equal(x=mask, y=0.0)))

    added, boolean = run(fn, [spec(1, 2, 3, 4), spec(1, 2, 5, 4), spec(1, 2, 5, 4), spec(1, 1, 3, 5)], {"q": q, "k": k, "v": v, "mask": additive})
    want = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)), attn_mask=torch.from_numpy(additive))
    np.testing.assert_allclose(added, want.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(boolean, want.numpy(), rtol=1e-5, atol=1e-6)


def test_state_slice_update_carries_across_calls_and_resets():
    """A KV-cache-like state: each call writes its rows at [start, start + 2) and returns the state."""

    def fn(x, start, cache):
        old = mb.read_state(input=cache)
        end = mb.add(x=start, y=2)
        begin = mb.concat(values=[start, np.array([0], np.int32)], axis=0)
        stop = mb.concat(values=[end, np.array([3], np.int32)], axis=0)
        new = mb.slice_update(x=old, update=mb.cast(x=x, dtype="fp16"), begin=begin, end=stop)
        mb.coreml_update_state(state=cache, value=new)
        return mb.cast(x=new, dtype="fp32")

    program = mb.program(input_specs=[spec(2, 3), spec(1, dtype=types.int32), mb.StateTensorSpec((6, 3), dtype=types.fp16)], opset_version=IOS18)(fn)
    interpreter = MILProgram(program, "fp32")
    first = interpreter.predict({"x": np.ones((2, 3)), "start": np.array([0])})
    second = interpreter.predict({"x": 2 * np.ones((2, 3)), "start": np.array([2])})
    np.testing.assert_array_equal(list(first.values())[0][:, 0], [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(list(second.values())[0][:, 0], [1, 1, 2, 2, 0, 0])
    interpreter.reset_state()
    again = interpreter.predict({"x": 3 * np.ones((2, 3)), "start": np.array([4])})
    np.testing.assert_array_equal(list(again.values())[0][:, 0], [0, 0, 0, 0, 3, 3])


def test_blockwise_shift_scale_dequantizes_per_block():
    data = rng.integers(-8, 8, size=(4, 8)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, size=(4, 2)).astype(np.float16)
    offset = rng.integers(-2, 3, size=(4, 2)).astype(np.int8)

    def fn(x):
        weight = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset)
        return mb.linear(x=x, weight=weight)

    x = randn(1, 8)
    (got,) = run(fn, [spec(1, 8)], {"x": x})
    dense = (data.astype(np.float32) - np.repeat(offset, 4, axis=1)) * np.repeat(scale.astype(np.float32), 4, axis=1)
    np.testing.assert_allclose(got, x @ dense.T, rtol=1e-5, atol=1e-6)


def test_lut_to_dense_matches_the_op_reference_example():
    # MIL's own example: a 2-group 2-bit scalar palettization of a [6, 2] tensor.
    indices = np.array([2, 3, 3, 0, 1, 0, 3, 0, 2, 1, 0, 3]).reshape(6, 2).astype(types.np_uint2_dtype)
    lut = np.array([1.0, 5.0, 9.0, 13.0, 2.0, 10.0, 18.0, 26.0], np.float16).reshape(2, 1, 4, 1)

    def fn(x):
        return mb.mul(x=x, y=mb.constexpr_lut_to_dense(indices=indices, lut=lut))

    (got,) = run(fn, [spec(6, 2, dtype=types.fp16)], {"x": np.ones((6, 2))})
    np.testing.assert_array_equal(got, [[9, 13], [13, 1], [5, 1], [26, 2], [18, 10], [2, 26]])


def test_fp16_mode_rounds_every_fp16_value():
    def fn(x):
        return mb.cast(x=mb.add(x=mb.cast(x=x, dtype="fp16"), y=np.float16(2**-11)), dtype="fp32")

    x = {"x": np.ones((1,), np.float32)}
    assert run(fn, [spec(1)], x, "fp32")[0][0] == np.float32(1 + 2**-11)
    assert run(fn, [spec(1)], x, "fp16")[0][0] == 1.0  # 1 + 2^-11 is halfway between fp16 neighbours: ties to even


def test_unknown_op_and_bad_inputs_are_clear_errors():
    assert "argsort" not in OPS

    def fn(x):
        return mb.argsort(x=x)

    program = mb.program(input_specs=[spec(2, 5)], opset_version=IOS18)(fn)
    with pytest.raises(UnsupportedOpError, match="does not implement MIL op.* argsort"):
        MILProgram(program)
    interpreter = MILProgram(mb.program(input_specs=[spec(2, 5)], opset_version=IOS18)(lambda x: mb.relu(x=x)))
    with pytest.raises(Exception, match="missing input 'x'"):
        interpreter.predict({})
    with pytest.raises(Exception, match=r"input 'x' has shape \[5, 2\], expected \[2, 5\]"):
        interpreter.predict({"x": np.zeros((5, 2))})
    with pytest.raises(Exception, match="interpreter precision 'bf16'"):
        MILProgram(program, "bf16")


# --- the traps ---------------------------------------------------------------------------------------


class CachedGQA(nn.Module):
    """Two KV heads shared by four query heads, the cache as fp16 state, attention over the filled part."""

    def __init__(self, enable_gqa: bool, cache_len: int = 8):
        super().__init__()
        self.enable_gqa = enable_gqa
        self.register_buffer("k_cache", torch.zeros(1, 2, cache_len, 4, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(1, 2, cache_len, 4, dtype=torch.float16))

    def forward(self, q, k, v, mask):
        t, end = q.shape[2], mask.shape[-1]
        start = end - t
        self.k_cache[:, :, start:end] = k.half()
        self.v_cache[:, :, start:end] = v.half()
        keys, values = self.k_cache[:, :, :end].float(), self.v_cache[:, :, :end].float()
        if self.enable_gqa:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return F.scaled_dot_product_attention(q, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), attn_mask=mask)


def convert_gqa(enable_gqa: bool, tmp_path):
    from torch.export import Dim

    from mobilevlm.export.coreml import convert

    seq, width = Dim("seq", min=1, max=7), Dim("width", min=1, max=7)
    example = (torch.zeros(1, 4, 3, 4), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), torch.zeros(1, 1, 3, 5))
    flexible = ct.RangeDim(1, 7, default=1)
    inputs = [ct.TensorType("q", shape=(1, 4, flexible, 4)), ct.TensorType("k", shape=(1, 2, flexible, 4)), ct.TensorType("v", shape=(1, 2, flexible, 4)),
              ct.TensorType("mask", shape=(1, 1, flexible, ct.RangeDim(1, 7, default=1)))]
    states = [ct.StateType(ct.TensorType(shape=(1, 2, 8, 4), dtype=np.float16), name=n) for n in ("k_cache", "v_cache")]
    model = convert(CachedGQA(enable_gqa), example, ({2: seq}, {2: seq}, {2: seq}, {2: seq, 3: width}), inputs, [ct.TensorType("out")], states=states)
    path = tmp_path / f"gqa-{enable_gqa}.mlpackage"
    model.save(str(path))
    return MILProgram(path, "fp32")


@pytest.mark.parametrize("enable_gqa", [True, False])
def test_enable_gqa_converts_silently_wrong_and_the_interpreter_catches_it(enable_gqa, tmp_path):
    """coremltools broadcasts the cache's (symbolic) head axis by tiling: with enable_gqa the program makes
    query head h read kv head h % 2 instead of h // 2. Repeating KV heads explicitly converts right."""
    interpreter = convert_gqa(enable_gqa, tmp_path)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    mask = torch.zeros(1, 1, 3, 3)
    got = interpreter.predict({"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "mask": mask.numpy()})["out"]
    k16, v16 = k.half().float(), v.half().float()
    right = F.scaled_dot_product_attention(q, k16.repeat_interleave(2, 1), v16.repeat_interleave(2, 1), attn_mask=mask).numpy()
    tiled = F.scaled_dot_product_attention(q, k16.repeat(1, 2, 1, 1), v16.repeat(1, 2, 1, 1), attn_mask=mask).numpy()
    if enable_gqa:
        assert np.abs(got - right).max() > 0.1  # the interpreter exposes the wrong program ...
        np.testing.assert_allclose(got, tiled, atol=2e-3)  # ... and it is exactly the tiled head mapping
    else:
        np.testing.assert_allclose(got, right, atol=2e-3)


class Rope(nn.Module):
    def __init__(self, reciprocal: bool):
        super().__init__()
        self.reciprocal = reciprocal

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        exponents = torch.arange(0, 16, 2, dtype=torch.float32) / 16
        inv_freq = 1.0 / (10000.0**exponents) if self.reciprocal else 10000.0 ** (-exponents)
        return torch.cos(positions[:, None].float() * inv_freq)


@pytest.mark.parametrize("reciprocal,fp16", [(True, False), (False, False), (False, True)])
def test_reciprocal_rope_becomes_inverse_with_epsilon_and_fp16_angles_drift(reciprocal, fp16, tmp_path):
    """`1 / theta**x` converts to MIL `inverse`, 1 / (x + 1e-4): every angle is off by position * 1e-4.
    `theta**-x` converts exactly, but angles computed in fp16 drift at long positions too; our decoder
    therefore passes float64-computed cos / sin tables (see test_coreml's rope test)."""
    from mobilevlm.export.coreml import convert

    inputs = [ct.TensorType("positions", shape=(5,), dtype=np.int32)]
    model = convert(Rope(reciprocal), (torch.arange(5, dtype=torch.int32),), None, inputs, [ct.TensorType("out", dtype=np.float32)], fp16=fp16)
    model.save(str(tmp_path / "rope.mlpackage"))
    positions = np.array([1, 10, 100, 1000, 2000], np.int32)
    got = MILProgram(tmp_path / "rope.mlpackage", "fp16").predict({"positions": positions})["out"]
    exact = np.cos(positions[:, None].astype(np.float64) * 10000.0 ** (-np.arange(0, 16, 2) / 16))
    error = np.abs(got - exact).max(axis=1)
    if reciprocal:
        assert error[0] < 1e-3 and error[-1] > 0.05 and list(error) == sorted(error)
    elif fp16:
        assert error[0] < 5e-3 and error[-1] > 0.01
    else:
        assert error.max() < 1e-3


def test_topk_matches_torch():
    x = np.random.default_rng(0).standard_normal((2, 5, 7)).astype(np.float32)
    values, indices = OPS["topk"](x, k=np.int32(3), axis=np.int32(-1))
    expected = torch.topk(torch.from_numpy(x), 3, dim=-1)
    np.testing.assert_array_equal(values, expected.values.numpy())
    np.testing.assert_array_equal(indices, expected.indices.numpy())
    assert indices.dtype == np.int32
    smallest = OPS["topk"](x, k=np.int32(2), axis=np.int32(1), ascending=np.bool_(True), output_indices_dtype=np.array("int16"))[1]
    np.testing.assert_array_equal(smallest, torch.topk(torch.from_numpy(x), 2, dim=1, largest=False).indices.numpy())
    assert smallest.dtype == np.int16
