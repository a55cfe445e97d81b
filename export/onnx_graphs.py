"""The three ONNX graphs, lowered from our model's own modules with `torch.onnx.export(..., dynamo=True)`.

- `vision.onnx`: `image` uint8 RGB [B, 3, S, S] -> `image_features` [B, N, D]; scaling to [0, 1] and the
  mean / std normalisation happen inside (the ExecuTorch exporter's `VisionEncoderMethod`, reused).
  A tiled model ("anyres") takes the K views of one image instead, [K, 3, S, S] with K dynamic
  (the global view, then the tiles), and returns one sequence [1, K * (N + 1), D], each view's tokens
  followed by the separator: the prompt then has K * (N + 1) image positions.
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

Feature-level interfaces (`config.interface`) give the decoder one more input (`DECODER_IMAGE_INPUT`):
- "cross_attention": `image_features` float [B, N, D], N fixed: the vision output, passed with every
  call (the cross-attention blocks read it; the prompt holds no image positions, so the embedding
  graph sees no negative id); all zeros for a conversation without an image.
- "visual_expert": `image_mask` float [B, T], 1.0 at image positions. The embedding graph returns it
  as a second output (from the negative ids it already reads), so the two graphs chain by name as
  they do for `inputs_embeds`, and ONNX Runtime GenAI's pipeline passes it on without app code.

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


# The decoder's extra input per interface (none for the token interface).
DECODER_IMAGE_INPUT = {"cross_attention": "image_features", "visual_expert": "image_mask"}


class EmbeddingGraph(nn.Module):
    """(input_ids with negative ids at image positions, image_features) -> inputs_embeds, and for the
    visual expert also image_mask (float [B, T], 1.0 where the id is negative)."""

    def __init__(self, model: MobileVLM):
        super().__init__()
        self.embed_tokens = model.text.embed_tokens
        self.with_mask = model.config.interface == "visual_expert"

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        width = self.embed_tokens.embedding_dim
        is_image = input_ids < 0
        text = self.embed_tokens(input_ids.clamp(min=0))
        # k-th image position -> row k; a zero row is appended so that text-only calls (no image rows)
        # gather from a non-empty table.
        index = (is_image.flatten().to(torch.int64).cumsum(0) - 1).clamp(min=0).view_as(input_ids)
        table = torch.cat([image_features.reshape(-1, width), text.new_zeros(1, width)])
        embeds = torch.where(is_image.unsqueeze(-1), table[index], text)
        return (embeds, is_image.to(embeds.dtype)) if self.with_mask else embeds


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: None, mask: torch.Tensor, expert: tuple | None = None) -> torch.Tensor:
        """`expert`: as in `mobilevlm.text.Attention` (the visual expert's projections at image positions)."""
        b, t, _ = x.shape
        q, k, v = (self.q_proj(x), self.k_proj(x), self.v_proj(x)) if expert is None else expert[0].qkv(self, x, expert[1])
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # cos / sin [B, 1, T, D]
        k = torch.cat([self.past[0], k], dim=2)
        v = torch.cat([self.past[1], v], dim=2)
        self.present = (k, v)
        group = self.num_heads // self.num_kv_heads
        if group > 1:  # explicit repeat, as text.py (exports as Expand / Reshape at opset 18)
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(y) if expert is None else expert[0].out(self, y, expert[1])


def _swapped_layer(layer: nn.Module, attention: type[nn.Module]) -> nn.Module:
    """A shallow copy of a decoder layer (same weight tensors) whose attention is `attention(old)`."""
    new = copy.copy(layer)
    new._modules = dict(layer._modules)  # copy.copy shares the dict: swapping in it would touch `layer`
    new.self_attn = attention(layer.self_attn)
    return new


class DecoderGraph(nn.Module):
    """With `fused`, each attention is one GroupQueryAttention node (`export/onnx_gqa.py`): the graph
    takes the same inputs, but rows must be right-aligned (GQA reads positions from the row length).

    `image_input` is the interface's extra input (`DECODER_IMAGE_INPUT`), None for the token interface."""

    def __init__(self, model: MobileVLM, context_length: int, fused: bool = False):
        super().__init__()
        from .onnx_gqa import FusedGQAAttention

        text = model.text
        self.fused = fused
        self.interface = model.config.interface
        self.layers = nn.ModuleList(_swapped_layer(layer, FusedGQAAttention if fused else ConcatKVAttention) for layer in text.layers)
        self.norm, self.lm_head = text.norm, text.lm_head
        half = text.config.head_dim // 2 if fused else text.config.head_dim  # GQA takes the half tables
        self.register_buffer("rope_cos", text.rope_cos[:context_length, :half].clone(), persistent=False)
        self.register_buffer("rope_sin", text.rope_sin[:context_length, :half].clone(), persistent=False)

    def layer_inputs(self, image_input: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The decoder layers' keyword arguments for the interface's graph input."""
        if self.interface == "cross_attention":
            return {"image_features": image_input}
        if self.interface == "visual_expert":
            return {"image_mask": (image_input > 0.5).unsqueeze(-1)}  # bool [B, T, 1], as the layers route
        return {}

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past: tuple[torch.Tensor, ...], image_input: torch.Tensor | None = None):
        extra = self.layer_inputs(image_input)
        if self.fused:
            return self._forward_fused(inputs_embeds, attention_mask, past, extra)
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
            x = layer(x, cos, sin, None, mask, **extra)
            presents.extend(layer.self_attn.present)
        return (self.lm_head(self.norm(x)), *presents)

    def _forward_fused(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past: tuple[torch.Tensor, ...], extra: dict):
        lengths = ((attention_mask.sum(-1) - 1).to(torch.int32), torch.ones((), dtype=torch.int32) * attention_mask.shape[1])
        x, presents = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            layer.self_attn.past, layer.self_attn.lengths = (past[2 * i], past[2 * i + 1]), lengths
            x = layer(x, self.rope_cos, self.rope_sin, None, None, **extra)
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
    vision_shapes = ({0: "batch_size"},)
    if c.resolution == "anyres":  # the views of one image (global view, then tiles) -> one token sequence
        image = torch.zeros(1 + c.max_tiles, 3, s, s, dtype=torch.uint8)
        vision_shapes = ({0: "views"},)
    ids = torch.tensor([[1, -1, -1, 5], [1, 6, 7, 8]])
    features = torch.zeros(1, 2, width)
    embeds = torch.zeros(2, 5, width)
    mask = torch.ones(2, 7, dtype=torch.int64)
    past = tuple(torch.zeros(2, kv, 2, head) for _ in range(2 * layers))
    decoder_args, decoder_inputs = (embeds, mask, past), ["inputs_embeds", "attention_mask", *cache_names(layers, past=True)]
    decoder_shapes = ({0: "batch_size", 1: "sequence_length"}, {0: "batch_size", 1: "total_sequence_length"},
                      tuple({0: "batch_size", 2: "past_sequence_length"} for _ in range(2 * layers)))
    embedding_outputs = ["inputs_embeds"]
    if c.interface == "cross_attention":  # a fixed number of image features, passed with every call
        decoder_args += (torch.zeros(2, c.num_image_features, width),)
        decoder_shapes += ({0: "batch_size"},)
    elif c.interface == "visual_expert":  # one value per new position, made by the embedding graph
        decoder_args += (torch.zeros(2, 5),)
        decoder_shapes += ({0: "batch_size", 1: "sequence_length"},)
        embedding_outputs.append("image_mask")
    if c.interface in DECODER_IMAGE_INPUT:
        decoder_inputs.append(DECODER_IMAGE_INPUT[c.interface])
    jobs = {
        "vision": (VisionEncoderMethod(model), (image,), ["image"], ["image_features"], vision_shapes),
        "embedding": (EmbeddingGraph(model), (ids, features), ["input_ids", "image_features"], embedding_outputs,
                      ({0: "batch_size", 1: "sequence_length"}, {0: "num_images", 1: "image_tokens"})),
        "decoder": (DecoderGraph(model, context_length, fused_attention), decoder_args, decoder_inputs,
                    ["logits", *cache_names(layers, past=False)], decoder_shapes),
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
