"""Vision encoders: pixels [B, 3, H, W] -> features [B, N, D_vision] for the projector.

Every family keeps one contract so the projector, the decoder, training and the exporters treat them
alike:
- `forward(pixel_values) -> [B, N, config.hidden_size]` with N = `VisionConfig.num_output_tokens`;
- `pooled(pixel_values, mask_ratio=0.0, generator=None) -> [B, config.hidden_size]`: one vector per
  image for contrastive pretraining (families that cannot drop patches ignore `mask_ratio`).

Families (`VisionConfig.type`): `clip_vit` (clip.py), `eva_vit` (eva.py), `convnext` (convnext.py),
`patch` (patch.py, encoder-free). The "dual" resolution strategy wraps one of them and a small
high-resolution encoder (dual.py).
"""

from __future__ import annotations

from torch import nn

from ..config import MobileVLMConfig, VisionConfig
from .clip import CLIPVisionEncoder, quick_gelu

__all__ = ["CLIPVisionEncoder", "build_encoder", "build_vision_encoder", "quick_gelu"]


def build_encoder(config: VisionConfig) -> nn.Module:
    """One encoder of the family `config.type`."""
    if config.type == "eva_vit":
        from .eva import EVAVisionEncoder

        return EVAVisionEncoder(config)
    if config.type == "convnext":
        from .convnext import ConvNeXtEncoder

        return ConvNeXtEncoder(config)
    if config.type == "patch":
        from .patch import PatchEncoder

        return PatchEncoder(config)
    return CLIPVisionEncoder(config)


def build_vision_encoder(config: MobileVLMConfig) -> nn.Module:
    """The model's vision side: one encoder, or for the "dual" strategy the low- and high-resolution pair."""
    if config.resolution == "dual":
        from .dual import DualResolutionEncoder

        return DualResolutionEncoder(config)
    return build_encoder(config.vision)
