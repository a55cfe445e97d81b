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

Interfaces other than "token" (`mobilevlm.interfaces`) add modules to the layers: a gated
cross-attention block before some layers (`layers.{i}.cross_attn`, fed `image_features`), or a visual
expert in every layer (`layers.{i}.image_expert`, routed by `image_mask`). A token-interface decoder
has neither, and its parameters and computation are those of the plain LLaMA decoder.
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

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor | None, mask: torch.Tensor | None, expert: tuple | None = None
    ) -> torch.Tensor:
        """`expert` (visual-expert interface only): (VisualExpert, bool mask [B or 1, T, 1]); image
        positions take their q / k / v / o projections from the expert."""
        b, t, _ = x.shape
        q, k, v = (self.q_proj(x), self.k_proj(x), self.v_proj(x)) if expert is None else expert[0].qkv(self, x, expert[1])
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
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
        y = y.transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(y) if expert is None else expert[0].out(self, y, expert[1])


class DecoderLayer(nn.Module):
    """Pre-norm block. Layer `index` decides the feed-forward: a SparseMoE where the config makes it
    an MoE layer (`config.is_moe_layer(index)`), the dense MLP otherwise; either is named `mlp`.

    `cross_attn` (a GatedCrossAttention, run first) and `image_expert` (a VisualExpert) come from the
    model's interface; both are None for the token interface."""

    def __init__(self, config: TextConfig, index: int = 0, cross_attn: nn.Module | None = None, image_expert: nn.Module | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoE(config) if config.is_moe_layer(index) else MLP(config)
        self.cross_attn = cross_attn
        self.image_expert = image_expert

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor | None,
        mask: torch.Tensor | None,
        image_features: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`image_features` [B, N, D] feed `cross_attn`; `image_mask` (bool [B or 1, T, 1]) routes
        image positions through `image_expert`. Without them the layer is the text-only layer."""
        if self.cross_attn is not None:
            x = self.cross_attn(x, image_features)
        if self.image_expert is None or image_mask is None:
            # the exporters' attention swaps (ExecuTorch, ONNX, Core ML) take exactly these five inputs
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, (self.image_expert, image_mask))
        return x + self.image_expert.feed_forward(self.mlp, self.post_attention_layernorm(x), image_mask)


class TextDecoder(nn.Module):
    """The decoder. `interface` (MobileVLMConfig.interface) adds the modules of a feature-level
    interface: "cross_attention" puts a gated cross-attention block before layers
    `cross_attention_every - 1`, `2 * cross_attention_every - 1`, ...; "visual_expert" gives every
    layer an image expert."""

    def __init__(self, config: TextConfig, interface: str = "token", cross_attention_every: int = 0):
        super().__init__()
        self.config = config
        self.interface = interface
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, *_interface_modules(config, interface, cross_attention_every, i)) for i in range(config.num_layers))
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

    def copy_text_weights_to_image_experts(self) -> None:
        """Visual expert: start every layer's image expert as a copy of its text weights (CogVLM)."""
        for layer in self.layers:
            if layer.image_expert is not None:
                layer.image_expert.copy_from(layer.self_attn, layer.mlp)

    def forward(
        self, embeds: torch.Tensor, input_pos: torch.Tensor | None = None, image_features: torch.Tensor | None = None, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """embeds [B, T, D] -> logits [B, T, vocab]. With `input_pos` [T], read and write the KV cache.

        `image_features` [B, N, D] (cross-attention interface): the image every cross-attention block
        attends to; None (or zeros) for a conversation without an image. `image_mask` (visual-expert
        interface): bool or float [T] or [B, T], 1 where `embeds` holds image tokens; None for text only.
        """
        return self.lm_head(self.hidden_states(embeds, input_pos, image_features, image_mask))

    def hidden_states(
        self, embeds: torch.Tensor, input_pos: torch.Tensor | None = None, image_features: torch.Tensor | None = None, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final-norm hidden states [B, T, D] (what `lm_head` reads)."""
        if image_features is not None and self.interface != "cross_attention":
            raise ValueError(f"image_features are an input of the cross_attention interface only; this decoder's interface is {self.interface!r}")
        if image_mask is not None:
            if self.interface != "visual_expert":
                raise ValueError(f"image_mask is an input of the visual_expert interface only; this decoder's interface is {self.interface!r}")
            image_mask = image_mask_3d(image_mask, embeds.shape[0], embeds.shape[1])
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
            x = layer(x, cos, sin, input_pos, mask) if self.interface == "token" else layer(x, cos, sin, input_pos, mask, image_features, image_mask)
        return self.norm(x)


def image_mask_3d(image_mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """A visual-expert mask as given to `decode` (bool or float, [T] or [B, T], 1 at image positions)
    as the bool [B or 1, T, 1] the layers route with."""
    if image_mask.shape[-1] != length or image_mask.dim() not in (1, 2) or (image_mask.dim() == 2 and image_mask.shape[0] not in (1, batch)):
        raise ValueError(f"image_mask of shape {tuple(image_mask.shape)} does not fit {batch} sequence(s) of {length} positions (expected [T] or [B, T])")
    mask = image_mask if image_mask.dtype == torch.bool else image_mask > 0.5
    return mask.reshape(-1 if mask.dim() == 2 else 1, length, 1)


def _interface_modules(config: TextConfig, interface: str, cross_attention_every: int, index: int) -> tuple[nn.Module | None, nn.Module | None]:
    """(cross_attn, image_expert) of layer `index`."""
    if interface == "token":
        return None, None
    # imported here: interfaces.py builds on this module's RMSNorm
    from .interfaces import GatedCrossAttention, VisualExpert

    if interface == "cross_attention":
        if cross_attention_every < 1:
            raise ValueError(f"cross_attention_every must be at least 1, got {cross_attention_every}")
        return (GatedCrossAttention(config) if index % cross_attention_every == cross_attention_every - 1 else None), None
    if interface == "visual_expert":
        return None, VisualExpert(config)
    raise ValueError(f"unknown interface {interface!r}")
