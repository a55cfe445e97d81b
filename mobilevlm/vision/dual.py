"""Dual-resolution vision path (CogAgent-style), placed before the projector.

The processor prepares the image at the high resolution H = `high_res_vision.image_size`. The main
encoder (`low`, built from `config.vision`) sees it average-pooled to `vision.image_size`, so it runs at
the cost it was designed for; a small encoder (`high`, typically a ConvNeXt) reads the full-size image.
Each low-resolution token then cross-attends to the high-resolution features in `CROSS_ATTENTION_DEPTH`
gated blocks, so fine detail (small text, thin lines) reaches the low-resolution tokens without
multiplying their number. The output keeps the low encoder's shape [B, N, vision.hidden_size], so the
projector and the decoder are those of the single-resolution model.

CogAgent adds its cross-attention inside every decoder layer; here it sits in the vision path, which
keeps the decoder and the three exported methods unchanged. Each block is Flamingo's gated form:
pre-norm on the queries and on the high-resolution features, multi-head attention (keys and values
projected from the high width to the low width), the result added through tanh(gate), then a 4x MLP
added through its own tanh(gate). Gates are plain Parameters initialised to 0 (not touched by
`MobileVLM.reset_parameters`), so an untrained model is exactly the low-resolution model and training
opens the high-resolution path gradually. Two blocks: the second attends with queries already updated
by the first, at a cost that stays small next to the encoders (N x M attention at the low width).

Average pooling with kernel = stride = H / S is a fixed-size op every backend lowers; pooling
normalised pixels equals normalising pooled pixels (normalisation is per-channel affine). The input is
normalised with `vision`'s mean / std; when `high_res_vision` names other statistics, the high encoder's
input is re-normalised with one fixed affine map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MobileVLMConfig
from . import build_encoder

CROSS_ATTENTION_DEPTH = 2
MLP_RATIO = 4


class GatedCrossAttentionBlock(nn.Module):
    """Low-resolution queries [B, N, D] attend to high-resolution features [B, M, E]; gated residuals."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, eps: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(kv_dim, eps=eps)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.norm_mlp = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        kv = self.norm_kv(high)
        q, k, v = self._heads(self.q_proj(self.norm_q(x))), self._heads(self.k_proj(kv)), self._heads(self.v_proj(kv))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + torch.tanh(self.attn_gate) * self.out_proj(attn)
        return x + torch.tanh(self.mlp_gate) * self.fc2(F.gelu(self.fc1(self.norm_mlp(x))))


class DualResolutionEncoder(nn.Module):
    def __init__(self, config: MobileVLMConfig):
        super().__init__()
        if config.resolution != "dual" or config.high_res_vision is None:
            raise ValueError("DualResolutionEncoder needs resolution 'dual' and a high_res_vision config")
        low, high = config.vision, config.high_res_vision
        self.config = low  # the output is the low encoder's: same tokens, same width
        self.high_config = high
        self.pool = high.image_size // low.image_size
        self.low = build_encoder(low)
        self.high = build_encoder(high)
        self.cross = nn.ModuleList(
            GatedCrossAttentionBlock(low.hidden_size, high.hidden_size, low.num_heads, low.layer_norm_eps) for _ in range(CROSS_ATTENTION_DEPTH)
        )
        self.renormalize = tuple(high.image_mean) != tuple(low.image_mean) or tuple(high.image_std) != tuple(low.image_std)
        if self.renormalize:
            # x_high = (x * std_low + mean_low - mean_high) / std_high, per channel
            std_low, mean_low = torch.tensor(low.image_std), torch.tensor(low.image_mean)
            std_high, mean_high = torch.tensor(high.image_std), torch.tensor(high.image_mean)
            self.register_buffer("high_scale", (std_low / std_high).reshape(1, 3, 1, 1), persistent=False)
            self.register_buffer("high_shift", ((mean_low - mean_high) / std_high).reshape(1, 3, 1, 1), persistent=False)

    def low_resolution(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, H] -> [B, 3, S, S]: the main encoder's view."""
        return F.avg_pool2d(pixel_values, self.pool, self.pool)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, H] (H = high_res_vision.image_size) -> [B, N, vision.hidden_size]."""
        x = self.low(self.low_resolution(pixel_values))
        high_in = pixel_values * self.high_scale + self.high_shift if self.renormalize else pixel_values
        high = self.high(high_in)
        for block in self.cross:
            x = block(x, high)
        return x

    def pooled(self, pixel_values: torch.Tensor, mask_ratio: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """The low encoder's pooled vector of the pooled-down image (contrastive pretraining trains the
        main encoder; the high-resolution path learns during the VLM stages)."""
        return self.low.pooled(self.low_resolution(pixel_values), mask_ratio, generator)
