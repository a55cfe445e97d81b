"""Recipe option `-gqa`: each layer's attention (rotary embeddings, cache concat, grouped heads, causal
softmax) as ONE `com.microsoft.GroupQueryAttention` node, ONNX Runtime's fused kernel - the op ORT
GenAI's own model builder emits.

How: the decoder layer's attention is swapped (as `ConcatKVAttention` is) for `FusedGQAAttention`,
which calls the custom op `mobilevlm_onnx::group_query_attention`; `torch.onnx.export` translates that
op to the contrib node through `TRANSLATION_TABLE`. The op's PyTorch implementation exists so the
module runs eagerly and can be tested against the reference; only its contract matters for export.

GroupQueryAttention's contract (onnxruntime contrib ops): query [B, S, H * D], key / value
[B, S, H_kv * D], past [B, H_kv, P, D], `seqlens_k` [B] int32 = tokens so far - 1, a scalar int32
total length, half-width cos / sin tables; the new tokens are the LAST S positions of each row, so
rows must be right-aligned (no left padding) - one row, as apps run it, always is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mobilevlm.text import apply_rope

DOMAIN = "com.microsoft"


@torch.library.custom_op("mobilevlm_onnx::group_query_attention", mutates_args=())
def group_query_attention(query: Tensor, key: Tensor, value: Tensor, past_key: Tensor, past_value: Tensor, seqlens_k: Tensor,
                          total_length: Tensor, cos_cache: Tensor, sin_cache: Tensor, num_heads: int, kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    b, s, _ = query.shape
    d = past_key.shape[-1]
    q = query.view(b, s, num_heads, d).transpose(1, 2)
    k = key.view(b, s, kv_heads, d).transpose(1, 2)
    v = value.view(b, s, kv_heads, d).transpose(1, 2)
    positions = seqlens_k.long().unsqueeze(1) - s + 1 + torch.arange(s).unsqueeze(0)  # [B, S]
    cos = torch.cat([cos_cache[positions]] * 2, -1).unsqueeze(1)  # half tables -> our [.., D] layout
    sin = torch.cat([sin_cache[positions]] * 2, -1).unsqueeze(1)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    present_k, present_v = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
    group, total = num_heads // kv_heads, present_k.shape[2]
    causal = torch.arange(total).view(1, total) <= (total - s + torch.arange(s)).view(s, 1)
    y = F.scaled_dot_product_attention(q, present_k.repeat_interleave(group, 1), present_v.repeat_interleave(group, 1), attn_mask=causal)
    return y.transpose(1, 2).reshape(b, s, -1), present_k, present_v


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, num_heads, kv_heads):
    b, h, p, d = past_key.shape
    s = query.shape[1]
    return query.new_empty(query.shape), past_key.new_empty(b, h, p + s, d), past_value.new_empty(b, h, p + s, d)


class FusedGQAAttention(nn.Module):
    """Our attention's projections around one GroupQueryAttention; `past` / `present` as ConcatKVAttention."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
        self.num_heads, self.num_kv_heads = attention.num_heads, attention.num_kv_heads
        self.past = self.present = None
        self.lengths: tuple[Tensor, Tensor] | None = None  # (seqlens_k, total length), set per call by the decoder

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: None, mask: None, expert: tuple | None = None) -> Tensor:
        """`expert`: as in `mobilevlm.text.Attention` (the visual expert's projections at image positions)."""
        q, k, v = (self.q_proj(x), self.k_proj(x), self.v_proj(x)) if expert is None else expert[0].qkv(self, x, expert[1])
        y, k, v = torch.ops.mobilevlm_onnx.group_query_attention(q, k, v, self.past[0], self.past[1], *self.lengths, cos, sin, self.num_heads, self.num_kv_heads)
        self.present = (k, v)
        return self.o_proj(y) if expert is None else expert[0].out(self, y, expert[1])


def _register_schema() -> None:
    """onnxscript builds nodes from ONNX op schemas; ORT's contrib ops have none in `onnx`, so the
    subset we call is registered (once per process) with the inputs / attributes ORT documents."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("GroupQueryAttention", DOMAIN):
        return
    param = OpSchema.FormalParameter
    inputs = [param(n, "T") for n in ("query", "key", "value", "past_key", "past_value")]
    inputs += [param("seqlens_k", "M"), param("total_sequence_length", "M"), param("cos_cache", "T"), param("sin_cache", "T")]
    outputs = [param(n, "T") for n in ("output", "present_key", "present_value")]
    attributes = [OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in ("num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved")]
    onnx.defs.register_schema(OpSchema("GroupQueryAttention", DOMAIN, 1, inputs=inputs, outputs=outputs, attributes=attributes,
                                       type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")]))


def translation_table() -> dict:
    """`custom_translation_table` for torch.onnx.export: our op -> GroupQueryAttention (rotary inside,
    half-split layout = `rotary_interleaved` 0)."""
    import onnxscript

    _register_schema()
    msft = onnxscript.values.Opset(DOMAIN, 1)

    def to_onnx(query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, num_heads: int, kv_heads: int):
        return msft.GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
                                        num_heads=num_heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0)

    return {torch.ops.mobilevlm_onnx.group_query_attention.default: to_onnx}
