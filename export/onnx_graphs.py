"""The three ONNX graphs, lowered from our model's own modules with `torch.onnx.export(..., dynamo=True)`.

- `vision.onnx`: `image` uint8 RGB [B, 3, S, S] -> `image_features` [B, N, D]; scaling to [0, 1] and the
  mean / std normalisation happen inside (the ExecuTorch exporter's `VisionEncoderMethod`, reused).
- `embedding.onnx`: `input_ids` int64 [B, T], `image_features` [I, N, D] -> `inputs_embeds` [B, T, D].
  A negative id marks an image position: the k-th negative id (in reading order over the batch) takes
  row k of the flattened image features, every other id its row of the token table. This is the layout
  of Phi-3-vision's embedding graph; it lets ONNX Runtime GenAI run a whole image prompt through its
  `decoder-pipeline` (an app passes the vision output with `Generator.set_model_input`). Text-only
  calls pass `image_features` with I = 0.
- `decoder.onnx`: `inputs_embeds` [B, T, D], `attention_mask` int64 [B, P + T],
  `past_key_values.{i}.key/value` [B, kv_heads, P, head_dim] -> `logits` [B, T, V],
  `present.{i}.key/value` [B, kv_heads, P + T, head_dim]: the names, layout and concat-style cache of
  ONNX Runtime GenAI's decoders. Positions come from the mask (`cumsum - 1`), so left-padded batches
  work; rotary tables are cut at the exported context length, so a position past it is an error in the
  runtime rather than a silently extrapolated answer.

The decoder is our `TextDecoder` with one module swap: each layer is shallow-copied (sharing every
weight, the caller's model untouched, no weight duplicated - a 1.7B model would otherwise need its
memory twice) and its attention replaced by `ConcatKVAttention`, which takes the past keys / values as
tensors and returns the concatenated present ones, as `export/executorch.py` swaps in its custom ops.
With recipe option `-gqa` the swap is `FusedGQAAttention` instead (`export/onnx_gqa.py`): one
`com.microsoft.GroupQueryAttention` node per layer, same graph inputs and outputs.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mobilevlm.model import MobileVLM
from mobilevlm.text import apply_rope

from .executorch import VisionEncoderMethod

# ONNX Runtime GenAI's names for a decoder's cache inputs and outputs.
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


def cache_names(num_layers: int, past: bool) -> list[str]:
    key, value = (PAST_KEY, PAST_VALUE) if past else (PRESENT_KEY, PRESENT_VALUE)
    return [name % i for i in range(num_layers) for name in (key, value)]


class EmbeddingGraph(nn.Module):
    """(input_ids with negative ids at image positions, image_features) -> inputs_embeds."""

    def __init__(self, model: MobileVLM):
        super().__init__()
        self.embed_tokens = model.text.embed_tokens

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        width = self.embed_tokens.embedding_dim
        is_image = input_ids < 0
        text = self.embed_tokens(input_ids.clamp(min=0))
        # k-th image position -> row k; a zero row is appended so that text-only calls (no image rows)
        # gather from a non-empty table.
        index = (is_image.flatten().to(torch.int64).cumsum(0) - 1).clamp(min=0).view_as(input_ids)
        table = torch.cat([image_features.reshape(-1, width), text.new_zeros(1, width)])
        return torch.where(is_image.unsqueeze(-1), table[index], text)


class ConcatKVAttention(nn.Module):
    """Our attention's projections; past keys / values in as tensors, present = past ++ new out.

    `DecoderGraph` sets `past` before the layer runs and reads `present` after it: the layer's own
    forward (norms, residuals, MLP) is reused unchanged, and it only passes (x, cos, sin, pos, mask).
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        self.past: tuple[torch.Tensor, torch.Tensor] | None = None
        self.present: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: None, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # cos / sin [B, 1, T, D]
        k = torch.cat([self.past[0], k], dim=2)
        v = torch.cat([self.past[1], v], dim=2)
        self.present = (k, v)
        group = self.num_heads // self.num_kv_heads
        if group > 1:  # explicit repeat, as text.py (exports as Expand / Reshape at opset 18)
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


def _swapped_layer(layer: nn.Module, attention: type[nn.Module]) -> nn.Module:
    """A shallow copy of a decoder layer (same weight tensors) whose attention is `attention(old)`."""
    new = copy.copy(layer)
    new._modules = dict(layer._modules)  # copy.copy shares the dict: swapping in it would touch `layer`
    new.self_attn = attention(layer.self_attn)
    return new


class DecoderGraph(nn.Module):
    """With `fused`, each attention is one GroupQueryAttention node (`export/onnx_gqa.py`): the graph
    takes the same inputs, but rows must be right-aligned (GQA reads positions from the row length)."""

    def __init__(self, model: MobileVLM, context_length: int, fused: bool = False):
        super().__init__()
        from .onnx_gqa import FusedGQAAttention

        text = model.text
        self.fused = fused
        self.layers = nn.ModuleList(_swapped_layer(layer, FusedGQAAttention if fused else ConcatKVAttention) for layer in text.layers)
        self.norm, self.lm_head = text.norm, text.lm_head
        half = text.config.head_dim // 2 if fused else text.config.head_dim  # GQA takes the half tables
        self.register_buffer("rope_cos", text.rope_cos[:context_length, :half].clone(), persistent=False)
        self.register_buffer("rope_sin", text.rope_sin[:context_length, :half].clone(), persistent=False)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past: tuple[torch.Tensor, ...]):
        if self.fused:
            return self._forward_fused(inputs_embeds, attention_mask, past)
        t, total = inputs_embeds.shape[1], attention_mask.shape[1]
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, total - t :]  # [B, T]
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        # query i (absolute total - t + i) sees key j when j <= its position and the mask keeps j;
        # an additive mask with the dtype's minimum keeps fully padded rows finite (no NaN).
        causal = torch.arange(total).unsqueeze(0) <= (torch.arange(t) + (total - t)).unsqueeze(1)
        allowed = causal.unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(2)
        mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype).masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)
        x, presents = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            layer.self_attn.past = (past[2 * i], past[2 * i + 1])
            x = layer(x, cos, sin, None, mask)
            presents.extend(layer.self_attn.present)
        return (self.lm_head(self.norm(x)), *presents)

    def _forward_fused(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past: tuple[torch.Tensor, ...]):
        lengths = ((attention_mask.sum(-1) - 1).to(torch.int32), torch.ones((), dtype=torch.int32) * attention_mask.shape[1])
        x, presents = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            layer.self_attn.past, layer.self_attn.lengths = (past[2 * i], past[2 * i + 1]), lengths
            x = layer(x, self.rope_cos, self.rope_sin, None, None)
            presents.extend(layer.self_attn.present)
        return (self.lm_head(self.norm(x)), *presents)


def _save(program, path: Path) -> None:
    """Weights over ~1.8 GB go to `<name>.data` beside the graph (protobuf's 2 GB limit)."""
    size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    program.save(str(path), external_data=size > 1_800_000_000)


def export_graphs(model: MobileVLM, folder: Path, context_length: int, opset: int, fused_attention: bool = False) -> dict[str, Path]:
    """Write vision.onnx, embedding.onnx and decoder.onnx (fp32) into `folder`."""
    from .onnx_gqa import translation_table

    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()
    model = model.eval()
    c = model.config
    s, width = c.input_image_size, c.text.hidden_size
    layers, kv, head = c.text.num_layers, c.text.num_kv_heads, c.text.head_dim
    # Example inputs use batch 2 and non-trivial lengths: a 1 would be specialised (0/1 rule).
    image = torch.zeros(2, 3, s, s, dtype=torch.uint8)
    ids = torch.tensor([[1, -1, -1, 5], [1, 6, 7, 8]])
    features = torch.zeros(1, 2, width)
    embeds = torch.zeros(2, 5, width)
    mask = torch.ones(2, 7, dtype=torch.int64)
    past = tuple(torch.zeros(2, kv, 2, head) for _ in range(2 * layers))
    batch = {0: "batch_size"}
    jobs = {
        "vision": (VisionEncoderMethod(model), (image,), ["image"], ["image_features"], (batch,)),
        "embedding": (EmbeddingGraph(model), (ids, features), ["input_ids", "image_features"], ["inputs_embeds"],
                      ({0: "batch_size", 1: "sequence_length"}, {0: "num_images", 1: "image_tokens"})),
        "decoder": (DecoderGraph(model, context_length, fused_attention), (embeds, mask, past),
                    ["inputs_embeds", "attention_mask", *cache_names(layers, past=True)], ["logits", *cache_names(layers, past=False)],
                    ({0: "batch_size", 1: "sequence_length"}, {0: "batch_size", 1: "total_sequence_length"},
                     tuple({0: "batch_size", 2: "past_sequence_length"} for _ in range(2 * layers)))),
    }
    translations = translation_table() if fused_attention else None
    paths = {}
    for name, (module, args, inputs, outputs, dynamic) in jobs.items():
        module.eval()  # the wrappers are new modules (training mode by default); nothing in them differs, but say so
        logging.info("exporting %s.onnx (opset %d)", name, opset)
        with torch.no_grad(), torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            program = torch.onnx.export(module, args, input_names=inputs, output_names=outputs, dynamic_shapes=dynamic,
                                        dynamo=True, opset_version=opset, optimize=True, verbose=False, custom_translation_table=translations)
        paths[name] = folder / f"{name}.onnx"
        _save(program, paths[name])
        del program
    return paths
