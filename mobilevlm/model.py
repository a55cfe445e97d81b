"""MobileVLM: vision encoder -> projector -> decoder, as three methods every backend shares.

- `encode_image(pixel_values)`: normalised pixels [B, 3, H, W] -> image tokens [B, N, D_text];
- `embed(token_ids)`: [B, T] -> [B, T, D_text];
- `decode(embeds, input_pos)`: [B, T, D_text] at positions [T] -> logits [B, T, V], using the KV cache.

A prompt is text before the image, the image tokens, and text after it: the caller embeds each part and
feeds them to `decode` in order. Exporters lower exactly these three methods, so the reference and
every artifact share one definition. `forward` is the training path: whole sequences, no cache.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MobileVLMConfig
from .projector import build_projector
from .text import TextDecoder
from .vision import build_vision_encoder

# Marks the image's place in a list of token ids (as in LLaVA / MobileVLM); never a vocabulary id.
IMAGE_TOKEN_INDEX = -200
# Label value the loss ignores (prompt, image and padding positions).
IGNORE_INDEX = -100


def encode_views(vision: nn.Module, projector: nn.Module, separator: torch.Tensor | None, pixel_values: torch.Tensor) -> torch.Tensor:
    """`MobileVLM.encode_image` over its parts, so exporters can lower the image path without the
    decoder's weights. `separator` is None unless the model tiles images ("anyres")."""
    if separator is None:
        return projector(vision(pixel_values))
    views = pixel_values if pixel_values.dim() == 5 else pixel_values.unsqueeze(0)
    b, k = views.shape[:2]
    tokens = projector(vision(views.flatten(0, 1)))
    ends = separator.expand(b * k, 1, tokens.shape[-1])
    return torch.cat([tokens, ends], dim=1).reshape(b, k * (tokens.shape[1] + 1), tokens.shape[-1])


class MobileVLM(nn.Module):
    def __init__(self, config: MobileVLMConfig):
        super().__init__()
        self.config = config.validate()
        self.vision = build_vision_encoder(config)
        self.projector = build_projector(config)
        self.text = TextDecoder(config.text)
        if config.resolution == "anyres":
            # ends every view's tokens, so the decoder can tell the global view and the tiles apart
            self.image_separator = nn.Parameter(torch.randn(config.text.hidden_size) * 0.02)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Small-normal init for linear / embedding weights, zero biases, unit norms (GPT-2 / LLaMA style)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)

    # --- the three methods the exporters lower ----------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, N, D]. With the "anyres" strategy the input is one image's views
        [K, 3, S, S] (global view first, then the tiles) or a batch of them [B, K, 3, S, S], and each
        view's tokens are followed by the separator: [B, K * (tokens_per_view + 1), D]."""
        return encode_views(self.vision, self.projector, getattr(self, "image_separator", None), pixel_values)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.text.embed_tokens(token_ids)

    def decode(self, embeds: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.text(embeds, input_pos)

    # --- cache ----------------------------------------------------------------------------------

    def setup_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> None:
        self.text.setup_cache(batch_size, max_seq_len)

    @property
    def cache_len(self) -> int:
        return self.text.cache_len

    # --- training path --------------------------------------------------------------------------

    def merge_inputs(
        self, token_ids: torch.Tensor, image_features: torch.Tensor | None, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embed a batch of id rows and put image tokens where `IMAGE_TOKEN_INDEX` stands.

        token_ids [B, T]; image_features [B, N, D] (row i uses image i). When features are given, every
        row holds exactly one placeholder. Returns embeds [B, T - 1 + N, D] and the labels aligned to
        them, with image positions ignored.
        """
        has_image = token_ids == IMAGE_TOKEN_INDEX
        text = self.embed(token_ids.clamp(min=0))
        if image_features is None or not bool(has_image.any()):
            return text, labels
        rows, new_labels = [], []
        for i in range(token_ids.shape[0]):
            where = has_image[i].nonzero().flatten()
            if where.numel() != 1:
                raise ValueError(f"row {i} has {where.numel()} image placeholders; expected exactly 1")
            p = int(where[0])
            rows.append(torch.cat([text[i, :p], image_features[i], text[i, p + 1 :]]))
            if labels is not None:
                ignore = labels.new_full((image_features.shape[1],), IGNORE_INDEX)
                new_labels.append(torch.cat([labels[i, :p], ignore, labels[i, p + 1 :]]))
        embeds = torch.stack(rows)
        return embeds, (torch.stack(new_labels) if labels is not None else None)

    def forward(self, token_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T', V] for whole sequences (no cache); with `labels`, the mean next-token loss."""
        features = self.encode_image(pixel_values) if pixel_values is not None else None
        embeds, labels = self.merge_inputs(token_ids, features, labels)
        logits = self.text(embeds)
        if labels is None:
            return logits
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return loss + self.router_aux_loss()

    def router_aux_loss(self) -> torch.Tensor | float:
        """The sparse decoder's load-balancing loss of the last forward, weighted (0 for dense models)."""
        losses = [m.aux_loss for m in self.text.modules() if getattr(m, "aux_loss", None) is not None]
        return self.config.text.router_aux_loss_coef * sum(losses) if losses else 0.0

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
