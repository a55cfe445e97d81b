"""Feature-level modality interfaces: where image features meet the decoder besides the token sequence.

`MobileVLMConfig.interface` picks one (see `config.INTERFACES`); "token" (image tokens in the sequence,
MobileVLM / LLaVA) needs nothing from this module. The two others are built here and placed in the
decoder's layers by `text.TextDecoder`, so their weights sit under `text.` and train with the decoder:

- "cross_attention" (Flamingo, Alayrac et al., 2022): a `GatedCrossAttention` block runs before decoder
  layers k-1, 2k-1, ... (k = `cross_attention_every`), as `text.layers.{i}.cross_attn`. The sequence
  holds no image tokens; every text position attends to all image features. Both of the block's
  residual branches go through tanh of a gate initialised to 0, so a new block leaves the pretrained
  decoder's output exactly unchanged and training opens the gates.
- "visual_expert" (CogVLM, Wang et al., 2023): every layer holds a `VisualExpert`
  (`text.layers.{i}.image_expert`), a second set of attention projections and a second SwiGLU MLP for
  image positions; text positions keep the original weights and both share one attention over the
  whole sequence (one KV cache). A token-type mask routes them.

Both are export-friendly: static shapes, no data-dependent control flow (the visual expert computes
both paths on every token and selects with `torch.where`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .moe import MLP
from .text import RMSNorm


class GatedCrossAttention(nn.Module):
    """Text hidden states [B, T, D] attend to image features [B, N, D]; Flamingo's gated xattn-dense.

        x = x + tanh(attn_gate) * o_proj(attention(q_proj(norm(x)), k_proj(f), v_proj(f)))
        x = x + tanh(mlp_gate)  * mlp(mlp_norm(x))

    Multi-head attention with the decoder's head count and head size, no rotary embedding (the
    features have no position in the text) and no mask: every text position sees every feature.

    A conversation without an image passes `features=None`, which skips the attention branch, or
    all-zero features [B, N, D], which give exactly the same result: with bias-free v and o
    projections the values are 0, so the attention output is 0 whatever the (uniform) weights are.
    A bias on v_proj (or o_proj) would make zero features a real input; a bias on k_proj alone would
    not (every feature would get the same score). The dense MLP branch runs either way, as in
    Flamingo, where it applies to every token.

    Cost: the block projects the N features to keys and values on every call, i.e. 2 * N * D^2
    multiply-adds per block per generated token; for N = 144 image features that is 288 D^2, about
    70 times the attention projections of a decoder layer for that token. Computing the keys and
    values once per image and keeping them in a buffer (as the KV cache keeps the text's) removes
    that cost; it is the optimisation left, at the price of a stateful "set image" call in every
    runtime.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d, config.rms_norm_eps)
        self.mlp = MLP(config)
        # nn.Parameter, so MobileVLM.reset_parameters (which re-initialises Linear weights) keeps them at 0
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def attend(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The attention branch before its gate: [B, T, D]."""
        b, t, _ = x.shape
        n = features.shape[1]
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(features).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(features).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        if features is not None:
            if features.shape[0] != x.shape[0] or features.shape[-1] != x.shape[-1]:
                raise ValueError(f"image features {tuple(features.shape)} do not fit text hidden states {tuple(x.shape)} (expected [B, N, D])")
            x = x + torch.tanh(self.attn_gate) * self.attend(self.norm(x), features)
        return x + torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(x))


class VisualExpert(nn.Module):
    """The image positions' own weights in one decoder layer: q/k/v/o projections shaped like the
    layer's attention and a dense SwiGLU MLP shaped like its MLP (a dense one even when the layer's
    MLP is a mixture of experts). Names mirror the text weights (`image_expert.q_proj`,
    `image_expert.mlp.gate_proj`, ...).

    Routing: `mask` is a bool [B or 1, T, 1] that is True at image positions. Both paths run on every
    token and `torch.where` picks one per position: twice the projection and MLP work for a static
    graph with no data-dependent branch.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        d, kv = config.hidden_size, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp = MLP(config)

    def qkv(self, attention: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [B, T, *] of `attention`'s text weights, the expert's at image positions."""
        return (
            torch.where(mask, self.q_proj(x), attention.q_proj(x)),
            torch.where(mask, self.k_proj(x), attention.k_proj(x)),
            torch.where(mask, self.v_proj(x), attention.v_proj(x)),
        )

    def out(self, attention: nn.Module, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, self.o_proj(y), attention.o_proj(y))

    def feed_forward(self, text_mlp: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, self.mlp(x), text_mlp(x))

    @torch.no_grad()
    def copy_from(self, attention: nn.Module, text_mlp: nn.Module) -> None:
        """CogVLM's initialisation: the expert starts as a copy of the layer's text weights (the MLP
        only when the layer's is dense; a mixture of experts has no single MLP to copy)."""
        pairs = [(getattr(self, n), getattr(attention, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if isinstance(text_mlp, MLP):
            pairs += [(getattr(self.mlp, n), getattr(text_mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
        for mine, text in pairs:
            mine.weight.copy_(text.weight)

