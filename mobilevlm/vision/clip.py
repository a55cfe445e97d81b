"""CLIP-style ViT vision encoder.

Patch conv (no bias), a class token, learned positions, a LayerNorm before the transformer ("pre-LN",
`pre_layernorm`), pre-norm blocks with quick_gelu MLPs. Parameter names follow Hugging Face's
`CLIPVisionModel` (minus the `vision_model.` prefix and with its `pre_layrnorm` typo spelled out), so
published CLIP weights load by renaming one key.

MobileVLM and LLaVA feed the projector with a chosen hidden state (`select_layer`, -2 = output of the
second-to-last layer) and drop the class token (`select_feature = "patch"`), so the layers after the
selected one are kept (they are in the published weights) but never run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def flip_keep_index(tokens: torch.Tensor, mask_ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """FLIP masking for tokens [B, 1 + N, D] (class token first): indices [B, 1 + keep] of the class
    token and a random `1 - mask_ratio` share of the patches, drawn per image."""
    b, n = tokens.shape[0], tokens.shape[1] - 1
    keep = max(1, int(round(n * (1 - mask_ratio))))
    order = torch.rand(b, n, generator=generator, device=tokens.device).argsort(dim=1)[:, :keep] + 1
    return torch.cat([torch.zeros(b, 1, dtype=order.dtype, device=tokens.device), order], dim=1)


class VisionEmbeddings(nn.Module):
    """Patch conv, a class token, learned positions (CLIP's patch conv has no bias; EVA's has one)."""

    def __init__(self, config: VisionConfig, patch_bias: bool = False):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, config.hidden_size, config.patch_size, stride=config.patch_size, bias=patch_bias)
        self.class_embedding = nn.Parameter(torch.randn(config.hidden_size) * 0.02)
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        heads = [p(x).view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)]
        y = F.scaled_dot_product_attention(*heads)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_layers))
        # Used only for the pooled (class-token) output in contrastive pretraining, never by the VLM.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def hidden_states(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> list[torch.Tensor]:
        """Embeddings (after the pre-LN) and each layer's output, as Hugging Face's `hidden_states`."""
        x = self.pre_layernorm(self.embeddings(pixel_values))
        states = [x]
        for layer in self.layers[: self.config.num_layers if num_layers is None else num_layers]:
            x = layer(x)
            states.append(x)
        return states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] -> selected features [B, N, D_vision]."""
        x = self.hidden_states(pixel_values, self.config.num_layers_used)[-1]
        return x[:, 1:] if self.config.select_feature == "patch" else x

    def pooled(self, pixel_values: torch.Tensor, mask_ratio: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Class-token output after the last layer and the post-LN, as CLIP's image tower gives.

        `mask_ratio` drops that share of patch tokens at random before the transformer (FLIP), which
        makes contrastive pretraining cheaper; positions stay attached to the kept tokens.
        """
        x = self.embeddings(pixel_values)
        if mask_ratio > 0:
            index = flip_keep_index(x, mask_ratio, generator)
            x = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = self.pre_layernorm(x)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])
