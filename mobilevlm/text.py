"""LLaMA-style decoder with a static KV cache.

Read top to bottom: RMSNorm, rotary embeddings, attention, block, decoder. The feed-forward blocks
(SwiGLU MLP, and the sparse mixture of SwiGLU experts of MoE layers) are in `moe.py`. Names of
parameters follow Hugging Face's Llama (`layers.0.self_attn.q_proj.weight`, ...) so published weights
load by prefix, and rotary embeddings use the same half-split ("rotate_half") convention.

Two paths through attention:
- no `input_pos` (training): causal attention over the given sequence, no cache;
- with `input_pos` (inference and export): keys and values are written into fixed-size cache buffers
  in place at `input_pos`, and queries attend over the whole cache through a causal mask row per
  position. Shapes never change with the position, which is what exporters need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .moe import MLP, SparseMoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables [max_positions, head_dim] in the half-split layout.

    Computed in float64 and written as `theta ** -x` (not `1 / theta ** x`): tables are exact at long
    positions, and converters that turn a reciprocal into an approximate op never see one.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = theta ** (-exponents)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos / sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Keys and values of every past position, [B, kv_heads, max_seq_len, head_dim], updated in place."""

    def __init__(self, batch_size: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch_size, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        d, kv = config.hidden_size, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        # Repeat KV heads explicitly (head h reads kv head h // group); `enable_gqa` is not used
        # because some converters lower it with the wrong head mapping.
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    """Pre-norm block. Layer `index` decides the feed-forward: a SparseMoE where the config makes it
    an MoE layer (`config.is_moe_layer(index)`), the dense MLP otherwise; either is named `mlp`."""

    def __init__(self, config: TextConfig, index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoE(config) if config.is_moe_layer(index) else MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextDecoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the derived buffers: rotary tables, and an empty cache mask. Also called after
        weights are loaded into a model built on the meta device (they are not in checkpoints)."""
        cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        device = self.embed_tokens.weight.device
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        self.register_buffer("causal_mask", torch.empty(0, dtype=torch.bool, device=device), persistent=False)

    @property
    def cache_len(self) -> int:
        """Positions the KV cache holds (0 when there is none)."""
        return self.causal_mask.shape[0]

    def setup_cache(self, batch_size: int = 1, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Allocate a static KV cache for `batch_size` sequences of up to `max_seq_len` positions.

        The cache may be shorter than the model's context (phones rarely want 2048 positions of cache),
        never longer: rotary tables exist only up to `config.max_seq_len`.
        """
        max_seq_len = max_seq_len or self.config.max_seq_len
        if not 0 < max_seq_len <= self.config.max_seq_len:
            raise ValueError(f"cache length {max_seq_len} must be in 1..{self.config.max_seq_len} (the model's context)")
        dtype = dtype or self.embed_tokens.weight.dtype
        device = self.embed_tokens.weight.device
        for layer in self.layers:
            cache = KVCache(batch_size, self.config.num_kv_heads, max_seq_len, self.config.head_dim, dtype)
            layer.self_attn.kv_cache = cache.to(device)
        self.causal_mask = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device).tril()

    def remove_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.causal_mask = torch.empty(0, dtype=torch.bool, device=self.causal_mask.device)

    def forward(self, embeds: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """embeds [B, T, D] -> logits [B, T, vocab]. With `input_pos` [T], read and write the KV cache."""
        return self.lm_head(self.hidden_states(embeds, input_pos))

    def hidden_states(self, embeds: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm hidden states [B, T, D] (what `lm_head` reads)."""
        if input_pos is None:
            t = embeds.shape[1]
            cos, sin, mask = self.rope_cos[:t], self.rope_sin[:t], None
        else:
            if self.cache_len == 0:
                raise RuntimeError("decode() needs a KV cache: call setup_cache() first")
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            mask = self.causal_mask[input_pos]
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        return self.norm(x)
