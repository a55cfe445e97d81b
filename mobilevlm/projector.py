"""Projectors: vision features [B, N, D_vision] -> image tokens in the decoder's width [B, N', D_text].

- `mlp2x_gelu` (LLaVA-1.5): Linear - GELU - Linear; every patch becomes a token.
- `ldp` (MobileVLM): the same MLP, then two MobileNetV3 inverted-residual blocks on the token grid
  (depthwise 3x3 conv - LayerNorm - Hardswish, squeeze-excitation, pointwise 1x1 conv - LayerNorm); the
  first keeps the grid and adds a residual, the second has stride 2: 24x24 patches -> 12x12 tokens.
- `linear` (Fuyu): one Linear, patches straight into the decoder's width.
- `qformer`, `resampler`: learned queries (projector_query.py).
- `ldpv2` (MobileVLM V2): the MLP, average pooling of the grid to `pool_size` squared, then a positional
  residual (depthwise 3x3 conv with bias, added to its input).

GELU is the exact (erf) form, as `nn.GELU()` in the published code. Pooling is written as a plain
average pool with kernel = stride (equal to adaptive pooling when the grid divides, which the config
checks) because every backend lowers that directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MobileVLMConfig


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


def _to_grid(x: torch.Tensor) -> torch.Tensor:
    """[B, N, C] tokens of a square grid -> [B, C, side, side]."""
    b, n, c = x.shape
    side = int(round(n**0.5))
    return x.transpose(1, 2).reshape(b, c, side, side)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map (timm's LayerNorm2d, eps 1e-5 as MobileVLM builds it)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        squeeze = _make_divisible(channels // 4, 8)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale


def _make_divisible(value: int, divisor: int) -> int:
    """MobileNet's channel rounding: nearest multiple of `divisor`, never more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """MobileNetV3 block without expansion (expanded channels = input channels), with SE, Hardswish."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.dw_conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)
        self.dw_norm = ChannelLayerNorm(channels)
        self.se = SqueezeExcitation(channels)
        self.pw_conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.pw_norm = ChannelLayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.hardswish(self.dw_norm(self.dw_conv(x)))
        y = self.pw_norm(self.pw_conv(self.se(y)))
        return x + y if self.stride == 1 else y


class MLPProjector(nn.Module):
    def __init__(self, d_vision: int, d_text: int):
        super().__init__()
        self.mlp = _mlp(d_vision, d_text)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class LinearProjector(nn.Module):
    def __init__(self, d_vision: int, d_text: int):
        super().__init__()
        self.linear = nn.Linear(d_vision, d_text)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class LDPProjector(nn.Module):
    def __init__(self, d_vision: int, d_text: int):
        super().__init__()
        self.mlp = _mlp(d_vision, d_text)
        self.blocks = nn.ModuleList([InvertedResidual(d_text, stride=1), InvertedResidual(d_text, stride=2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_grid(self.mlp(x))
        for block in self.blocks:
            x = block(x)
        return _to_tokens(x)


class LDPv2Projector(nn.Module):
    def __init__(self, d_vision: int, d_text: int, pool_size: int):
        super().__init__()
        self.pool_size = pool_size
        self.mlp = _mlp(d_vision, d_text)
        self.peg = nn.Conv2d(d_text, d_text, 3, padding=1, groups=d_text, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_grid(self.mlp(x))
        kernel = x.shape[-1] // self.pool_size
        x = F.avg_pool2d(x, kernel, kernel)
        return _to_tokens(self.peg(x) + x)


def build_projector(config: MobileVLMConfig) -> nn.Module:
    d_vision, d_text, kind = config.vision.hidden_size, config.text.hidden_size, config.projector.type
    if kind == "mlp2x_gelu":
        return MLPProjector(d_vision, d_text)
    if kind == "ldp":
        return LDPProjector(d_vision, d_text)
    if kind == "ldpv2":
        return LDPv2Projector(d_vision, d_text, config.projector.pool_size)
    if kind == "linear":
        return LinearProjector(d_vision, d_text)
    if kind in ("qformer", "resampler"):
        from .projector_query import build_query_projector

        return build_query_projector(config)
    raise ValueError(f"unknown projector type {kind!r}")  # config validation names the choices
