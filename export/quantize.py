"""Quantization recipes: named, each a documented mapping onto the backend's own tools.

A recipe name reads left to right:  `fp32`  or  `8da4w[-gN][-emb8|-emb4|-embfp][-vis8]`  or  `8da8w`.

| part      | meaning                                                         | ExecuTorch / torchao tool |
|-----------|-----------------------------------------------------------------|---------------------------|
| `8da4w`   | decoder linears (attention, MLP, output head): int8 dynamic activations, int4 weights per group | `torchao.quantization.quantize_(Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(N)))`, lowered to XNNPACK |
| `-gN`     | group size N of the 4-bit weights: 32, 64 or 128 (default 128)  | `PerGroup(N)` |
| `-emb8` / `-emb4` | token embedding table in 8 / 4 bits, groups of 32 (default `-emb8`) | ExecuTorch's `EmbeddingQuantHandler` -> `quantized_decomposed.embedding_byte / embedding_4bit` |
| `-embfp`  | keep the embedding table in fp32                                 | - |
| `-vis8`   | vision encoder and projector linears: int8 dynamic activations, int8 weights per channel | `Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))` |
| `8da8w`   | every linear of decoder, vision encoder and projector in 8da8w, embeddings in 8 bits | as above |

`8da4w` alone is ExecuTorch's own LLaVA recipe (decoder 8da4w group 128, 8-bit embeddings group 32,
vision in fp32). A layer whose input width the group size does not divide is an error naming the
layer, never a layer silently left in fp32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from mobilevlm.errors import ExportError

GROUP_SIZES = (32, 64, 128)
EMBEDDING_GROUP = 32
RECIPE_GRAMMAR = "fp32 | 8da8w | 8da4w[-g32|-g64|-g128][-emb8|-emb4|-embfp][-vis8]"


@dataclass(frozen=True)
class QuantRecipe:
    name: str
    decoder_bits: int | None  # 4 or 8 (weights of decoder linears), None = fp32
    group_size: int | None  # for 4-bit decoder weights
    embedding_bits: int | None  # 8 or 4, None = fp32
    vision_bits: int | None  # 8 = 8da8w on vision encoder + projector linears, None = fp32

    def describe(self) -> dict:
        return {
            "recipe": self.name,
            "decoder_linears": "fp32" if self.decoder_bits is None else f"8da{self.decoder_bits}w" + (f" group {self.group_size}" if self.group_size else " per-channel"),
            "embedding": "fp32" if self.embedding_bits is None else f"int{self.embedding_bits} weight-only group {EMBEDDING_GROUP}",
            "vision_and_projector": "fp32" if self.vision_bits is None else "8da8w per-channel",
            "activations": "fp32" if self.decoder_bits is None and self.vision_bits is None else "int8 dynamic (per token) where weights are quantized",
        }


def parse_recipe(name: str) -> QuantRecipe:
    """Parse a recipe name; an unknown one is an `ExportError` showing the grammar."""
    if name == "fp32":
        return QuantRecipe("fp32", None, None, None, None)
    if name == "8da8w":
        return QuantRecipe("8da8w", 8, None, 8, 8)
    match = re.fullmatch(r"8da4w(?:-g(\d+))?(?:-(emb8|emb4|embfp))?(-vis8)?", name)
    if not match:
        raise ExportError(f"unknown quantization recipe {name!r}; expected {RECIPE_GRAMMAR}")
    group = int(match.group(1) or 128)
    if group not in GROUP_SIZES:
        raise ExportError(f"quantization recipe {name!r}: group size {group} is not one of {GROUP_SIZES}")
    embedding = {"emb8": 8, "emb4": 4, "embfp": None}[match.group(2) or "emb8"]
    return QuantRecipe(name, 4, group, embedding, 8 if match.group(3) else None)


def _linears(module: nn.Module, prefix: str) -> list[tuple[str, nn.Linear]]:
    return [(f"{prefix}.{n}" if n else prefix, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def check_group_size(decoder: nn.Module, group: int, prefix: str = "text") -> None:
    bad = [f"{name} (in_features {m.in_features})" for name, m in _linears(decoder, prefix) if m.in_features % group and not is_router(name)]
    if bad:
        raise ExportError(f"4-bit group size {group} does not divide the input width of {', '.join(bad[:4])}; choose a group size from {GROUP_SIZES} that divides it")


def quantize_linears(module: nn.Module, bits: int, group_size: int | None) -> None:
    """8da{bits}w on every nn.Linear inside `module`, in place (torchao tensor subclasses), except MoE
    routers (`mlp.gate`): a few quantization steps in a router change which experts a token uses, and
    they are tiny (llama.cpp keeps its `ffn_gate_inp` in f32 for the same reason)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    granularity = PerGroup(group_size) if group_size else PerAxis(0)
    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4 if bits == 4 else torch.int8, weight_granularity=granularity)
    quantize_(module, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not is_router(fqn))


def is_router(name: str) -> bool:
    return name.endswith("mlp.gate")


def quantize_embedding(parent: nn.Module, bits: int) -> nn.Module:
    """Swap every nn.Embedding under `parent` for ExecuTorch's grouped weight-only quantized embedding."""
    from executorch.examples.models.llama.source_transformation.quantize import EmbeddingQuantHandler

    dims = {m.embedding_dim for m in parent.modules() if isinstance(m, nn.Embedding)}
    if any(d % EMBEDDING_GROUP for d in dims) or (bits == 4 and any(d % 2 for d in dims)):
        raise ExportError(f"embedding width {sorted(dims)} is not divisible by the embedding group size {EMBEDDING_GROUP}")
    return EmbeddingQuantHandler(parent, bitwidth=bits, group_size=EMBEDDING_GROUP, packed=bits == 4).quantized_model()


def model_size_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
