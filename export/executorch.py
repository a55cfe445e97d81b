"""ExecuTorch exporter: one `.pte` that ExecuTorch's `MultimodalRunner` (the runner in the Android and
iOS apps) runs unchanged.

Methods (the runner's contract, read from executorch 1.4.1's `extension/llm/runner`):
- `vision_encoder(image uint8 [1, 3, S, S]) -> [1, N, D]`: RGB bytes, already padded / resized to S by
  the app; scaling to [0, 1] and the mean / std normalisation happen inside the graph.
- `token_embedding(tokens int64 [1, T]) -> [1, T, D]`, T dynamic.
- `text_decoder(embeds [1, T, D], input_pos int64 [T]) -> logits [1, V]` of the last position, T
  dynamic; the runner passes `arange(start, start + T)` for a prompt chunk and `[pos]` per token.
- constant methods: `get_max_seq_len`, `get_max_context_len` (the KV cache length), `get_eos_ids`,
  `get_bos_id`, `get_vocab_size`, `get_n_layers`, `use_kv_cache`, `enable_dynamic_shape`,
  `use_sdpa_with_kv_cache`.

The decoder's attention is swapped (a module swap on a copy of the model, the model itself is not
touched) for one that keeps its cache in ExecuTorch's [B, S, H_kv, D] layout and uses the runtime's
`llama::update_cache` / `llama::custom_sdpa` kernels, which read only the filled part of the cache and
handle grouped KV heads natively. Linear layers are lowered to XNNPACK.

Feature-level interfaces (`config.interface`) give `text_decoder` a third input, and such programs
cannot run in `MultimodalRunner` (it passes only embeddings and positions); an app drives their
methods itself (ExecuTorch's Module API), as `ExecuTorchSession` does:
- "cross_attention": `text_decoder(embeds, input_pos, image_features [1, N, D])`, N fixed
  (`config.num_image_features`): the vision encoder's output, passed on every call; the prompt's text
  is one sequence with no image positions.
- "visual_expert": `text_decoder(embeds, input_pos, image_mask float [T])`, T dynamic like embeds:
  1.0 at positions holding the vision encoder's output, 0.0 at text positions.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
from torch import nn

from mobilevlm.errors import ExportError
from mobilevlm.model import MobileVLM, encode_views
from mobilevlm.processing import Processor
from mobilevlm.text import apply_rope

from .executorch_session import ExecuTorchSession, load_runtime_kernels
from .pipeline import ExportReport
from .quantize import QuantRecipe, check_group_size, quantize_embedding, quantize_linears

# Kernels an app's ExecuTorch build must register to run our .pte (Android's and iOS's LLM runtime
# libraries include both sets).
CUSTOM_OPS = ("llama::update_cache", "llama::custom_sdpa")
QUANTIZED_EMBEDDING_OPS = ("quantized_decomposed::embedding_byte", "quantized_decomposed::embedding_4bit")


class VisionEncoderMethod(nn.Module):
    """uint8 RGB [1, 3, S, S] -> image tokens, normalisation inside."""

    def __init__(self, model: MobileVLM):
        super().__init__()
        self.vision, self.projector = model.vision, model.projector
        self.separator = getattr(model, "image_separator", None)
        v = model.config.vision
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(v.image_std))).view(1, 3, 1, 1))
        self.register_buffer("shift", (torch.tensor(v.image_mean) / torch.tensor(v.image_std)).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # (x / 255 - mean) / std, as one multiply-add
        pixels = image.to(torch.float32) * self.scale - self.shift
        return encode_views(self.vision, self.projector, self.separator, pixels)


class TokenEmbeddingMethod(nn.Module):
    def __init__(self, model: MobileVLM):
        super().__init__()
        self.embed_tokens = model.text.embed_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)


class CustomOpAttention(nn.Module):
    """Our attention (same weights), with the KV cache in ExecuTorch's layout and its fused kernels."""

    def __init__(self, attention: nn.Module, cache_len: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        shape = (1, cache_len, self.num_kv_heads, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
        self.cache_len = cache_len

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor | None, expert: tuple | None = None
    ) -> torch.Tensor:
        """`expert`: as in `mobilevlm.text.Attention` (the visual expert's projections at image positions)."""
        b, t, _ = x.shape
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, D]: broadcast over heads in [B, T, H, D]
        q, k, v = (self.q_proj(x), self.k_proj(x), self.v_proj(x)) if expert is None else expert[0].qkv(self, x, expert[1])
        q = apply_rope(q.view(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + t <= self.cache_len)
        torch.ops.llama.update_cache(k, self.k_cache, start)
        torch.ops.llama.update_cache(v, self.v_cache, start)
        y = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0.0, True)
        y = y.reshape(b, t, -1)
        return self.o_proj(y) if expert is None else expert[0].out(self, y, expert[1])


class TextDecoderMethod(nn.Module):
    """(embeds [1, T, D], input_pos [T]) -> logits [1, V] of the last position."""

    def __init__(self, model: MobileVLM, cache_len: int):
        super().__init__()
        self.text = model.text
        for layer in self.text.layers:
            layer.self_attn = CustomOpAttention(layer.self_attn, cache_len)

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.logits(embeds, input_pos)

    def logits(self, embeds: torch.Tensor, input_pos: torch.Tensor, **image_input: torch.Tensor) -> torch.Tensor:
        cos, sin = self.text.rope_cos[input_pos], self.text.rope_sin[input_pos]
        x = embeds
        for layer in self.text.layers:
            x = layer(x, cos, sin, input_pos, None, **image_input)
        return self.text.lm_head(self.text.norm(x[:, -1, :]))


class CrossAttentionDecoderMethod(TextDecoderMethod):
    """(embeds [1, T, D], input_pos [T], image_features [1, N, D]) -> logits [1, V]."""

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return self.logits(embeds, input_pos, image_features=image_features)


class VisualExpertDecoderMethod(TextDecoderMethod):
    """(embeds [1, T, D], input_pos [T], image_mask float [T]) -> logits [1, V]."""

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        return self.logits(embeds, input_pos, image_mask=(image_mask > 0.5).view(1, -1, 1))


DECODER_METHODS = {"token": TextDecoderMethod, "cross_attention": CrossAttentionDecoderMethod, "visual_expert": VisualExpertDecoderMethod}


def quantized_copy(model: MobileVLM, recipe: QuantRecipe, vision: bool = True) -> MobileVLM:
    """A copy of `model` ready to lower: fp32, eval mode, no cache, the recipe's quantization applied
    (the decoder, the embedding, and with `vision` the image path). The caller's model is untouched."""
    if recipe.decoder_bits == 4:
        check_group_size(model.text, recipe.group_size)
    model = copy.deepcopy(model).eval().float()
    model.text.remove_cache()
    if recipe.embedding_bits:
        model.text = quantize_embedding(model.text, recipe.embedding_bits)
    if recipe.decoder_bits:
        quantize_linears(model.text, recipe.decoder_bits, recipe.group_size)
    if vision and recipe.vision_bits:
        quantize_linears(model.vision, recipe.vision_bits, None)
        quantize_linears(model.projector, recipe.vision_bits, None)
    return model


def method_specs(model: MobileVLM, cache_len: int, recipe: QuantRecipe) -> dict:
    """What each method takes and returns, for the manifest (an app's whole contract)."""
    c = model.config
    s = c.input_image_size
    image = {"name": "image", "dtype": "uint8", "shape": [1, 3, s, s], "layout": "NCHW", "channels": "RGB", "range": [0, 255],
             "resized_inside": False, "normalized_inside": True}
    embeddings = {"name": "image_embeddings", "dtype": "float32", "shape": [1, c.num_image_features, c.text.hidden_size]}
    if c.resolution == "anyres":
        image.update(name="views", shape=["K", 3, s, s], dynamic={"K": [2, 1 + c.max_tiles]},
                     meaning="the global view, then the tiles of the chosen layout row-major (preprocessing.tiling)")
        embeddings.update(shape=[1, f"K * {c.tokens_per_view + 1}", c.text.hidden_size], meaning="each view's tokens followed by a separator token")
    decoder = {
        "inputs": [
            {"name": "embeddings", "dtype": "float32", "shape": [1, "T", c.text.hidden_size], "dynamic": {"T": [1, cache_len - 1]}},
            {"name": "input_pos", "dtype": "int64", "shape": ["T"], "meaning": "positions start..start+T-1 of these embeddings"},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, c.text.vocab_size], "meaning": "next-token logits after the last position"}],
        "kv_cache": {"positions": cache_len, "layout": "[1, positions, kv_heads, head_dim] per layer, held inside the program"},
    }
    if c.interface == "cross_attention":
        embeddings["meaning"] = "image features for text_decoder's image_features input (not sequence positions)"
        decoder["inputs"].append({"name": "image_features", "dtype": "float32", "shape": [1, c.num_image_features, c.text.hidden_size],
                                  "meaning": "vision_encoder's output for the conversation's image, the same tensor on every call; all zeros when there is no image"})
        decoder.update(interface="cross_attention", multimodal_runner=False, how_to_run=(
            "the image takes no positions: run token_embedding on the ids of before_image followed by those of after_image (one sequence, "
            "positions from 0) and call text_decoder with vision_encoder's output as image_features; pass the same image_features with every "
            "generated token. MultimodalRunner cannot drive this program (it passes only embeddings and positions): call the methods."))
    elif c.interface == "visual_expert":
        decoder["inputs"].append({"name": "image_mask", "dtype": "float32", "shape": ["T"], "dynamic": {"T": [1, cache_len - 1]},
                                  "meaning": "one value per position of embeddings (the same T): 1.0 where the embeddings are vision_encoder's output, 0.0 at text positions"})
        decoder.update(interface="visual_expert", multimodal_runner=False, how_to_run=(
            "as the token interface (before_image embeddings, vision_encoder's output, after_image embeddings, then each generated token), "
            "with image_mask all 1.0 for the image chunk and all 0.0 for text chunks and generated tokens. MultimodalRunner cannot drive "
            "this program (it passes only embeddings and positions): call the methods."))
    return {
        "vision_encoder": {"inputs": [image], "outputs": [embeddings]},
        "token_embedding": {
            "inputs": [{"name": "tokens", "dtype": "int64", "shape": [1, "T"], "dynamic": {"T": [1, cache_len]}}],
            "outputs": [{"name": "embeddings", "dtype": "float32", "shape": [1, "T", c.text.hidden_size]}],
        },
        "text_decoder": decoder,
    }


def export_executorch(model: MobileVLM, processor: Processor, recipe: QuantRecipe, path: Path, cache_len: int | None = None) -> ExportReport:
    """Lower `model` to a .pte at `path` (the caller puts it in a bundle)."""
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.quant_fusion_pass import QuantFusionPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from torch.export import Dim

    load_runtime_kernels()  # registers the llama:: ops' export-time implementations too
    started = time.time()
    config = model.config
    cache_len = cache_len or config.text.max_seq_len
    if not config.num_image_tokens + 2 <= cache_len <= config.text.max_seq_len:
        raise ExportError(f"context length {cache_len} must hold the {config.num_image_tokens} image tokens plus text, and be at most the model's {config.text.max_seq_len}")
    model = quantized_copy(model, recipe)

    vision, embedding = VisionEncoderMethod(model), TokenEmbeddingMethod(model)
    decoder = DECODER_METHODS[config.interface](model, cache_len)
    s = config.input_image_size
    image = torch.zeros(1, 3, s, s, dtype=torch.uint8)
    image_shapes = None
    if config.resolution == "anyres":
        # one program for every tile layout: the number of views is dynamic, up to the largest layout
        image = torch.zeros(1 + config.max_tiles, 3, s, s, dtype=torch.uint8)
        image_shapes = ({0: Dim("views", min=2, max=1 + config.max_tiles)},)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    embeds = torch.zeros(1, 4, config.text.hidden_size)
    positions = torch.arange(4)
    seq = Dim("seq", min=1, max=cache_len - 1)
    decoder_inputs, decoder_shapes = (embeds, positions), ({1: seq}, {0: seq})
    if config.interface == "cross_attention":  # a fixed number of image features
        decoder_inputs += (torch.zeros(1, config.num_image_features, config.text.hidden_size),)
        decoder_shapes += (None,)
    elif config.interface == "visual_expert":  # one mask value per position
        decoder_inputs += (torch.zeros(4),)
        decoder_shapes += ({0: seq},)
    with torch.no_grad(), torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        programs = {
            "vision_encoder": torch.export.export(vision, (image,), dynamic_shapes=image_shapes, strict=False),
            "token_embedding": torch.export.export(embedding, (tokens,), dynamic_shapes=({1: Dim("tokens", min=1, max=cache_len)},), strict=False),
            "text_decoder": torch.export.export(decoder, decoder_inputs, dynamic_shapes=decoder_shapes, strict=False),
        }
    metadata = {
        "get_max_seq_len": cache_len,
        "get_max_context_len": cache_len,
        "get_eos_ids": [processor.tokenizer.eos_id],
        "get_bos_id": processor.tokenizer.bos_id,
        "get_vocab_size": config.text.vocab_size,
        "get_n_layers": config.text.num_layers,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "use_sdpa_with_kv_cache": True,
    }
    dynamic_quant = XnnpackPartitioner(config_precisions=ConfigPrecisionType.DYNAMIC_QUANT, per_op_mode=True)
    edge = to_edge_transform_and_lower(
        programs,
        partitioner={
            "vision_encoder": [XnnpackPartitioner(config_precisions=ConfigPrecisionType.DYNAMIC_QUANT, per_op_mode=True), XnnpackPartitioner()],
            "token_embedding": [],
            "text_decoder": [dynamic_quant, XnnpackPartitioner()],
        },
        constant_methods=metadata,
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    program = edge.to_executorch(
        ExecutorchBackendConfig(
            extract_delegate_segments=True,
            passes=[QuantFusionPass()],
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            # Plan memory for the largest shape each dynamic dimension allows (a hint-based plan
            # would cap prompts at the example's length).
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )
    )
    with open(path, "wb") as handle:
        program.write_to_file(handle)
    logging.info("wrote %s", path)
    return ExportReport(Path(path), time.time() - started, Path(path).stat().st_size, method_specs(model, cache_len, recipe), metadata)


def backend():
    from .pipeline import Backend
    from .quantize import parse_recipe

    return Backend("executorch", ".pte", parse_recipe, export_executorch, ExecuTorchSession, "executorch.extension.llm.runner.MultimodalRunner (C++), XNNPACK")
