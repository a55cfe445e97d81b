"""Query-based projectors: a fixed set of learned queries reads the image through cross-attention.

The MLLM survey's "query-based" interface. Unlike the token-level projectors in `projector.py`, the
number of image tokens is `projector.num_queries` whatever the number N of vision features, so a
high-resolution (or tiled) image costs the decoder no more than a small one, and the same weights serve
any N: nothing here is sized by N (no position embedding over the features, no reshape to a grid).

- `qformer` (BLIP-2's Q-Former, without its text branch): learned queries; per layer self-attention
  among the queries, cross-attention from the queries to the image features, and an MLP; a final
  LayerNorm and a Linear (BLIP-2's "language projection").
- `resampler` (Flamingo's Perceiver resampler): learned latents; per layer the latents attend to the
  concatenation of the image features and themselves, then an MLP; a final LayerNorm.

Both stacks run at the decoder's width D_text, so their outputs drop straight into the text sequence.
Everything is written with plain Linear / LayerNorm / `F.scaled_dot_product_attention` on static shapes
(no `nn.MultiheadAttention`, whose fused in-projection weight and fast paths several exporters handle
poorly), so torch.export, XNNPACK and the ONNX dynamo exporter lower it like the rest of the model.

Neither module uses position information over the features: permuting the N features leaves the output
unchanged. The vision encoder's own position embeddings are what tell the queries where a patch was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MobileVLMConfig

QUERY_INIT_STD = 0.02  # BLIP-2 initialises its query tokens with the BERT initializer range


class QueryAttention(nn.Module):
    """Multi-head attention from `x` [B, Q, D] to `context` [B, M, D] (self-attention when they are the same).

    The key projection has no bias even where the others do: a key bias b adds q . b to every score of
    a query, which the softmax cancels, so it would be a parameter that never receives a gradient.
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, q_len, d = x.shape
        m = context.shape[1]
        q = self.q_proj(x).view(b, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: every query sees every feature
        return self.o_proj(y.transpose(1, 2).reshape(b, q_len, d))


def _feed_forward(dim: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 4 * dim, bias=bias), nn.GELU(), nn.Linear(4 * dim, dim, bias=bias))


def _batched(queries: nn.Parameter, batch_size: int) -> torch.Tensor:
    return queries.unsqueeze(0).expand(batch_size, -1, -1)


class QFormerLayer(nn.Module):
    """Self-attention among the queries, cross-attention to the image, MLP; each a pre-norm residual."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = QueryAttention(dim, num_heads)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = QueryAttention(dim, num_heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = _feed_forward(dim, bias=True)

    def forward(self, queries: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.self_norm(queries)
        queries = queries + self.self_attn(h, h)
        queries = queries + self.cross_attn(self.cross_norm(queries), image)
        return queries + self.mlp(self.mlp_norm(queries))


class QFormerProjector(nn.Module):
    """BLIP-2's Q-Former reduced to its query branch: [B, N, D_vision] -> [B, num_queries, D_text].

    Differences from BLIP-2, and why:
    - no text branch and no BERT initialisation: the queries are trained only through the decoder's
      next-token loss (as in BLIP-2's second, generative stage), not with its image-text objectives;
    - cross-attention in every layer (BLIP-2 has it every other layer), at the decoder's width rather
      than BERT's 768, with the image features first mapped to that width (Linear + LayerNorm, the
      LayerNorm standing in for the one that ends BLIP-2's vision encoder);
    - pre-norm residuals (LayerNorm before each sub-block, one final LayerNorm) instead of BERT's
      post-norm: at this size and trained from scratch, pre-norm keeps the residual path an identity at
      initialisation and trains stably without warm-up tricks.
    """

    def __init__(self, d_vision: int, d_text: int, num_queries: int, depth: int, num_heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, d_text) * QUERY_INIT_STD)
        self.in_proj = nn.Linear(d_vision, d_text)
        self.in_norm = nn.LayerNorm(d_text)
        self.layers = nn.ModuleList(QFormerLayer(d_text, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d_text)
        self.out_proj = nn.Linear(d_text, d_text)  # BLIP-2's language projection

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = self.in_norm(self.in_proj(features))
        queries = _batched(self.queries, features.shape[0])
        for layer in self.layers:
            queries = layer(queries, image)
        return self.out_proj(self.norm(queries))


class ResamplerLayer(nn.Module):
    """Flamingo's PerceiverAttention + FeedForward: the latents attend to [image; latents]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.media_norm = nn.LayerNorm(dim)
        self.latent_norm = nn.LayerNorm(dim)
        self.attn = QueryAttention(dim, num_heads, bias=False)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = _feed_forward(dim, bias=False)

    def forward(self, latents: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.latent_norm(latents)
        # Keys and values also come from the latents themselves, so a latent can keep what it holds
        # instead of being forced to average the image (Flamingo's choice).
        latents = latents + self.attn(h, torch.cat([self.media_norm(image), h], dim=1))
        return latents + self.mlp(self.mlp_norm(latents))


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver resampler: [B, N, D_vision] -> [B, num_queries, D_text].

    As Flamingo, the attention and MLP Linears have no biases (its PerceiverAttention and FeedForward
    are bias-free); the MLP is GELU with 4x expansion; pre-norm residuals and a final LayerNorm.
    Flamingo needs no input projection because its features already have the resampler's width; here
    a Linear maps D_vision to D_text. Flamingo's learned media-time embedding (one vector per video
    frame, added to all of a frame's features) is left out: we have a single image, so it would be one
    constant vector, which LayerNorm and the input Linear's bias already cover; a per-feature position
    embedding would tie the module to one N, so there is none.
    """

    def __init__(self, d_vision: int, d_text: int, num_queries: int, depth: int, num_heads: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_queries, d_text) * QUERY_INIT_STD)
        self.in_proj = nn.Linear(d_vision, d_text)
        self.layers = nn.ModuleList(ResamplerLayer(d_text, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d_text)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = self.in_proj(features)
        latents = _batched(self.latents, features.shape[0])
        for layer in self.layers:
            latents = layer(latents, image)
        return self.norm(latents)


def build_query_projector(config: MobileVLMConfig) -> nn.Module:
    """The `qformer` or `resampler` projector that `config.projector.type` names."""
    p = config.projector
    args = (config.vision.hidden_size, config.text.hidden_size, p.num_queries, p.depth, p.num_heads)
    if p.type == "qformer":
        return QFormerProjector(*args)
    if p.type == "resampler":
        return PerceiverResampler(*args)
    raise ValueError(f"projector.type {p.type!r} is not query-based; expected 'qformer' or 'resampler'")
