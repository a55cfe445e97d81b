"""Losses beyond plain next-token prediction: CLIP's contrastive loss with its small text tower, and
DPO for alignment against hallucination."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model import IGNORE_INDEX, MobileVLM
from ..text import RMSNorm


class TextTower(nn.Module):
    """CLIP's text side, small: token + position embeddings, a few pre-norm transformer layers with a
    causal mask, the hidden state at the EOS token, a projection. Used only for vision pretraining."""

    def __init__(self, vocab_size: int, width: int = 128, layers: int = 2, heads: int = 4, max_len: int = 96, embed_dim: int = 128):
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.randn(max_len, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = RMSNorm(width, 1e-6)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.max_len = max_len

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        ids, t = ids[:, : self.max_len], min(ids.shape[1], self.max_len)
        x = self.token(ids) + self.position[:t]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        x = self.norm(self.layers(x, mask=mask, is_causal=True))
        last = (lengths.clamp(max=t) - 1).to(x.device)
        return self.proj(x[torch.arange(x.shape[0]), last])


class ContrastiveModel(nn.Module):
    """The VLM's vision encoder (pooled class token) against a text tower, InfoNCE both ways, with
    one hard-negative caption per image among the image-to-text candidates (NegCLIP)."""

    def __init__(self, model: MobileVLM, vocab_size: int, embed_dim: int = 128):
        super().__init__()
        self.vision = model.vision
        self.image_proj = nn.Linear(model.config.vision.hidden_size, embed_dim, bias=False)
        self.text = TextTower(vocab_size, embed_dim=embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, pixels: torch.Tensor, captions: tuple, negatives: tuple | None = None, mask_ratio: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        image = F.normalize(self.image_proj(self.vision.pooled(pixels, mask_ratio, generator)), dim=-1)
        text = F.normalize(self.text(*captions), dim=-1)
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        candidates = text if negatives is None else torch.cat([text, F.normalize(self.text(*negatives), dim=-1)])
        target = torch.arange(len(image))
        image_to_text = F.cross_entropy(scale * image @ candidates.T, target)
        text_to_image = F.cross_entropy(scale * text @ image.T, target)
        return (image_to_text + text_to_image) / 2


def sequence_logprobs(model: MobileVLM, token_ids: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of the labelled tokens of each row [B]. The image reaches the decoder
    as the model's interface wants it (tokens in the sequence, cross-attention features, or image
    tokens routed to the visual expert): `MobileVLM.prepare_inputs`."""
    embeds, labels, image_input = model.prepare_inputs(token_ids, pixels, labels)
    logits = model.text(embeds, **image_input)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al., 2023): -log sigmoid(beta * margin), where the
    margin is how much more the policy prefers chosen over rejected than the reference does.
    Returns (loss, share of pairs the policy ranks correctly)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean(), (margin > 0).float().mean()
