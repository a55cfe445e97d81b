"""ConvNeXt vision encoder (the convolutional tower Osprey feeds its projector with).

Stem: 4x4 stride-4 conv + channel LayerNorm. Stages of blocks; between stages a channel LayerNorm and
a 2x2 stride-2 conv halve the grid. A block is depthwise 7x7 conv -> LayerNorm (channels-last) ->
Linear 4x -> GELU -> Linear -> per-channel layer scale `gamma` -> residual (no drop path: the toolkit
trains small models on few images, and stochastic depth would make the eager reference random).

The last stage's map [B, C, g, g] is the image grid, so `forward` returns its cells as tokens
[B, g*g, C] with no extra norm: Osprey hands the trunk's stage output to its projector as it is, and
a norm that the published trunk lacks would make an imported tower compute something else. `pooled`
is ConvNeXt's classification path (global average pool + the head LayerNorm), used only for
contrastive pretraining.

Parameter names follow timm's `convnext` layout (`stem.0/1`, `stages.N.downsample.0/1`,
`stages.N.blocks.M.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}`, `head.norm`), so published weights load by
renaming a prefix. Every norm uses `config.layer_norm_eps` (set it to 1e-6 to match ConvNeXt); the MLP
is always 4x wide with exact GELU, as ConvNeXt (`intermediate_size` and `hidden_act` are ViT fields).

`gamma` is a plain Parameter initialised to 1e-6 (ConvNeXt's layer-scale init): `MobileVLM.
reset_parameters` re-initialises Linear / Conv2d weights but leaves it, so a fresh model starts with
nearly identity blocks. LayerNorms are permute + `F.layer_norm`, which ExecuTorch (XNNPACK), ONNX and
Core ML all lower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..projector import ChannelLayerNorm

LAYER_SCALE_INIT = 1e-6
MLP_RATIO = 4


class ConvNeXtMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = ConvNeXtMLP(dim)
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # channels-last: the norm and the MLP act per pixel
        y = self.mlp(self.norm(y)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, eps: float, downsample: bool):
        super().__init__()
        self.downsample = nn.Sequential(ChannelLayerNorm(in_dim, eps), nn.Conv2d(in_dim, dim, 2, stride=2)) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*(ConvNeXtBlock(dim, eps) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtHead(nn.Module):
    """Only the head's norm: the classifier is replaced by the contrastive projection in training."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)


class ConvNeXtEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.type != "convnext":
            raise ValueError(f"ConvNeXtEncoder needs vision.type 'convnext', got {config.type!r}")
        self.config = config
        eps, dims = config.layer_norm_eps, config.stage_dims
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), ChannelLayerNorm(dims[0], eps))
        self.stages = nn.Sequential(
            *(ConvNeXtStage(dims[max(i - 1, 0)], dim, depth, eps, downsample=i > 0) for i, (depth, dim) in enumerate(zip(config.stage_depths, dims)))
        )
        self.head = ConvNeXtHead(dims[-1], eps)

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] -> the last stage's map [B, C, S / patch_size, S / patch_size]."""
        return self.stages(self.stem(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, S, S] -> grid tokens [B, g*g, C], row-major over the grid."""
        return self.feature_map(pixel_values).flatten(2).transpose(1, 2)

    def pooled(self, pixel_values: torch.Tensor, mask_ratio: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Global average of the last map + the head LayerNorm. A convolution needs the whole grid,
        so `mask_ratio` (FLIP's patch dropping) does not apply and is ignored."""
        return self.head.norm(self.feature_map(pixel_values).mean(dim=(2, 3)))
