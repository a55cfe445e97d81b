"""EVA-02-style ViT vision encoder (the EVA family MiniGPT-4 uses, in its EVA-02 / EVA-02-CLIP form).

Against CLIP's ViT (clip.py) an EVA-02 block differs in four ways, all kept here:
- 2-D rotary position embedding on the patch tokens' queries and keys (not on the class token): the
  first half of each head is rotated by the patch's row, the second half by its column;
- sub-LayerNorms ("sub-LN"): `inner_attn_ln` on the attention output before its projection and
  `ffn_ln` on the MLP hidden before its down projection;
- a SwiGLU MLP (`w1` gate, `w2` up, SiLU, `w3` down) of width `intermediate_size`;
- the key projection has no bias (only q and v do), the patch conv has one, and there is no pre-LN.
`hidden_act` is not used (SwiGLU's SiLU is part of the family). Published EVA-02 models use
`layer_norm_eps = 1e-6`.

Rotary convention, as EVA-02's `VisionRotaryEmbeddingFast` (so imported weights give the published
function): per axis `head_dim / 4` frequencies `theta ** (-2i / (head_dim / 2))`, each used for one
interleaved pair of channels ("rotate every two": (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin));
grid positions are scaled to a reference grid of 16 (`pt_hw_seq_len = 16` with `intp_freq`, the setting
of every published EVA-02-CLIP), so position i of a g x g grid is i * 16 / g.

The rotary tables are derived, not learned: non-persistent buffers, so checkpoints hold only weights.
They are created on the CPU even under a `torch.device("meta")` context, because checkpoint loading
builds the model on meta and assigns only the persistent weights.

`eva_clip_state_dict` renames a published EVA-CLIP vision state dict (BAAI's `eva_vit_model.py`
layout, `visual.` prefix) to this module's names, checking every key and shape.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..errors import CheckpointError, ConfigError
from .clip import VisionEmbeddings, flip_keep_index

ROPE_THETA = 10000.0
# EVA-02 trained its rotary positions on a 16 x 16 grid and rescales other grids onto it.
ROPE_REFERENCE_GRID = 16


def rotary_tables(config: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [num_patches + 1, head_dim] for the class token (row 0: identity) and each patch in
    row-major order. Channel pairs (2j, 2j+1) of the first half turn with the row, of the second half
    with the column."""
    head_dim = config.hidden_size // config.num_heads
    half = head_dim // 2
    cpu = torch.device("cpu")
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, half, 2, device=cpu).float() / half)  # [head_dim / 4]
    g = config.grid_size
    position = torch.arange(g, device=cpu) / g * ROPE_REFERENCE_GRID
    angle = (position[:, None] * inv_freq).repeat_interleave(2, dim=-1)  # [g, half], pairs share an angle
    rows = angle[:, None, :].expand(g, g, half)
    cols = angle[None, :, :].expand(g, g, half)
    angles = torch.cat([rows, cols], dim=-1).reshape(g * g, head_dim)
    angles = torch.cat([torch.zeros(1, head_dim, device=cpu), angles])  # class token: not rotated
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): a quarter turn of every channel pair."""
    return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_pairs(x) * sin


class EVAAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.inner_attn_ln = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, D]; cos / sin broadcastable to [B, heads, T, head_dim]."""
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
        return self.out_proj(self.inner_attn_ln(y.transpose(1, 2).reshape(b, t, d)))


class EVASwiGLU(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.w2 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_ln = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)
        self.w3 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EVALayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = EVAAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EVASwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class EVAVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        head_dim = config.hidden_size // config.num_heads
        if head_dim % 4:
            raise ConfigError(f"vision head size {head_dim} (hidden_size / num_heads) must be a multiple of 4 for EVA's 2-D rotary embedding")
        self.config = config
        self.embeddings = VisionEmbeddings(config, patch_bias=True)
        self.layers = nn.ModuleList(EVALayer(config) for _ in range(config.num_layers))
        # Used only for the pooled (class-token) output in contrastive pretraining, never by the VLM.
        self.post_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        cos, sin = rotary_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def hidden_states(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> list[torch.Tensor]:
        """Embeddings and each layer's output (EVA has no pre-LN), as Hugging Face's `hidden_states`."""
        x = self.embeddings(pixel_values)
        cos, sin = self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype)
        states = [x]
        for layer in self.layers[: self.config.num_layers if num_layers is None else num_layers]:
            x = layer(x, cos, sin)
            states.append(x)
        return states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] -> selected features [B, N, D_vision]."""
        x = self.hidden_states(pixel_values, self.config.num_layers_used)[-1]
        return x[:, 1:] if self.config.select_feature == "patch" else x

    def pooled(self, pixel_values: torch.Tensor, mask_ratio: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Class-token output after the last layer and the post-LN, as EVA-CLIP's image tower gives
        (before its projection head).

        `mask_ratio` drops that share of patch tokens at random (FLIP); the learned positions and the
        rotary angles stay attached to the kept tokens, so each keeps its (row, column).
        """
        x = self.embeddings(pixel_values)
        cos, sin = self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype)
        if mask_ratio > 0:
            index = flip_keep_index(x, mask_ratio, generator)
            x = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            cos, sin = cos[index].unsqueeze(1), sin[index].unsqueeze(1)  # [B, 1, keep + 1, head_dim]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.post_norm(x[:, 0])


# --- published EVA-CLIP weights ------------------------------------------------------------------

_TOP_LEVEL = {
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding.weight",
    "norm.weight": "post_norm.weight",
    "norm.bias": "post_norm.bias",
}
_IN_BLOCK = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.q_proj.weight": "attn.q_proj.weight",
    "attn.q_bias": "attn.q_proj.bias",
    "attn.k_proj.weight": "attn.k_proj.weight",
    "attn.v_proj.weight": "attn.v_proj.weight",
    "attn.v_bias": "attn.v_proj.bias",
    "attn.inner_attn_ln.weight": "attn.inner_attn_ln.weight",
    "attn.inner_attn_ln.bias": "attn.inner_attn_ln.bias",
    "attn.proj.weight": "attn.out_proj.weight",
    "attn.proj.bias": "attn.out_proj.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    **{f"mlp.{name}.{p}": f"mlp.{name}.{p}" for name in ("w1", "w2", "w3", "ffn_ln") for p in ("weight", "bias")},
}
# EVA-CLIP's projection into the joint image-text space: not part of the encoder (pooled() is the
# class token before it).
_DROPPED = ("head.weight", "head.bias")
# Published shape of tensors we store flattened: cls_token [1, 1, D], pos_embed [1, N + 1, D].
_LEADING_ONES = {"cls_token": 2, "pos_embed": 1}


def _our_key(key: str) -> str | None:
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and re.fullmatch(r"0|[1-9][0-9]*", parts[1]) and parts[2] in _IN_BLOCK:
        return f"layers.{int(parts[1])}.{_IN_BLOCK[parts[2]]}"
    return None


def eva_clip_state_dict(state: dict[str, torch.Tensor], config: VisionConfig, prefix: str = "visual.") -> dict[str, torch.Tensor]:
    """Published EVA-CLIP vision weights (keys under `prefix`) -> `EVAVisionEncoder` state dict.

    Keys outside `prefix` (a whole CLIP checkpoint also holds the text tower) are ignored. The rotary
    buffers (`rope.freqs_cos` / `freqs_sin`, at the top and in every block) are not weights: they are
    dropped after checking that they equal the tables this encoder computes, which confirms the
    checkpoint uses EVA-02's rotary convention at this grid. `head.*` (the CLIP projection) is dropped.
    A missing or unexpected key, a wrong shape or other rotary tables raise `CheckpointError`.
    """
    with torch.device("meta"):
        reference = EVAVisionEncoder(config)
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    rope = {"freqs_cos": reference.rope_cos[1:], "freqs_sin": reference.rope_sin[1:]}
    out: dict[str, torch.Tensor] = {}
    found: set[str] = set()
    problems: list[str] = []
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        table = name.rsplit(".", 1)[-1]
        if (name.startswith("rope.") or ".attn.rope." in name) and table in rope:
            if tensor.shape != rope[table].shape:
                problems.append(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(rope[table].shape)} (rotary table of a {config.grid_size}x{config.grid_size} grid)")
            elif not torch.allclose(tensor.float(), rope[table], atol=2e-3):
                problems.append(f"{key}: rotary table differs from EVA-02's (theta {ROPE_THETA:g}, reference grid {ROPE_REFERENCE_GRID}, interleaved pairs)")
            continue
        if name in _DROPPED:
            continue
        ours = _our_key(name)
        if ours is None or ours not in expected:
            problems.append(f"{key}: unexpected")
            continue
        found.add(ours)
        want = (1,) * _LEADING_ONES.get(name, 0) + tuple(expected[ours])
        if tuple(tensor.shape) != want:
            problems.append(f"{key}: shape {tuple(tensor.shape)}, expected {want}")
            continue
        out[ours] = tensor.reshape(expected[ours])
    inverse = {ours: theirs for theirs, ours in _TOP_LEVEL.items()}
    inverse.update({f"layers.{i}.{ours}": f"blocks.{i}.{theirs}" for i in range(config.num_layers) for theirs, ours in _IN_BLOCK.items()})
    problems += [f"{prefix}{inverse[k]}: missing" for k in expected if k not in found]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems in all)" if len(problems) > 8 else "")
        raise CheckpointError(f"EVA-CLIP vision weights do not match the config: {shown}")
    return out
