"""MobileVLM: vision encoder -> projector -> decoder, as three methods every backend shares.

- `encode_image(pixel_values)`: normalised pixels [B, 3, H, W] -> image tokens [B, N, D_text];
- `embed(token_ids)`: [B, T] -> [B, T, D_text];
- `decode(embeds, input_pos)`: [B, T, D_text] at positions [T] -> logits [B, T, V], using the KV cache.

A prompt is text before the image, the image tokens, and text after it: the caller embeds each part and
feeds them to `decode` in order. Exporters lower exactly these three methods, so the reference and
every artifact share one definition. `forward` is the training path: whole sequences, no cache.

The feature-level interfaces (`config.interface`, see `interfaces.py`) keep the three methods and give
`decode` one more input:
- "cross_attention": `decode(embeds, input_pos, image_features=encode_image(...))` on every call; the
  sequence holds only text (the image placeholder is dropped), the features enter through the gated
  cross-attention blocks;
- "visual_expert": `decode(embeds, input_pos, image_mask=...)`, 1 where `embeds` holds image tokens,
  which the layers' image experts process.
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
        self.text = TextDecoder(config.text, config.interface, config.cross_attention_every)
        if config.resolution == "anyres":
            # ends every view's tokens, so the decoder can tell the global view and the tiles apart
            self.image_separator = nn.Parameter(torch.randn(config.text.hidden_size) * 0.02)
        self.reset_parameters()
        if config.interface == "visual_expert":
            # CogVLM's init: the image experts start as the text weights, so the new model computes
            # what the token interface would (a cheap copy; a model loaded from a checkpoint is
            # built on the meta device, where it costs nothing and the checkpoint's weights follow)
            self.text.copy_text_weights_to_image_experts()

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

    def decode(
        self, embeds: torch.Tensor, input_pos: torch.Tensor, image_features: torch.Tensor | None = None, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`image_features` [B, N, D] (cross_attention; None or zeros without an image) or `image_mask`
        [T] / [B, T] (visual_expert; 1 at image positions) are the interfaces' extra input."""
        return self.text(embeds, input_pos, image_features, image_mask)

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

        Cross-attention interface: the image is not in the sequence, so the placeholder and its label
        are dropped (embeds [B, T - 1, D]) and the features go to `decode` / the decoder instead.
        """
        has_image = token_ids == IMAGE_TOKEN_INDEX
        text = self.embed(token_ids.clamp(min=0))
        if self.config.interface == "cross_attention":
            return _drop_placeholders(text, has_image, labels)
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

    def image_inputs(self, token_ids: torch.Tensor, image_features: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The decoder's image input for rows merged by `merge_inputs`, as keyword arguments of
        `self.text`: {"image_features"} (cross_attention), {"image_mask": bool [B, T - 1 + N]} true
        where `merge_inputs` put the image tokens (visual_expert), or nothing."""
        if image_features is None:
            return {}
        if self.config.interface == "cross_attention":
            return {"image_features": image_features}
        has_image = token_ids == IMAGE_TOKEN_INDEX
        if self.config.interface != "visual_expert" or not bool(has_image.any()):
            return {}
        n = image_features.shape[1]
        start = has_image.int().argmax(dim=1, keepdim=True)  # merge_inputs checked: one placeholder per row
        positions = torch.arange(token_ids.shape[1] - 1 + n, device=token_ids.device)
        return {"image_mask": (positions >= start) & (positions < start + n)}

    def prepare_inputs(
        self, token_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """(embeds, labels aligned to them, the decoder's image input) of a training batch: what
        `self.text(embeds, **image_input)` needs for whole sequences."""
        features = self.encode_image(pixel_values) if pixel_values is not None else None
        embeds, labels = self.merge_inputs(token_ids, features, labels)
        return embeds, labels, self.image_inputs(token_ids, features)

    def forward(self, token_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T', V] for whole sequences (no cache); with `labels`, the mean next-token loss."""
        embeds, labels, image_input = self.prepare_inputs(token_ids, pixel_values, labels)
        logits = self.text(embeds, **image_input)
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


def _drop_placeholders(embeds: torch.Tensor, has_image: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows without their image placeholder (cross-attention: the image is not in the sequence)."""
    if not bool(has_image.any()):
        return embeds, labels
    counts = has_image.sum(dim=1)
    if bool((counts != 1).any()):
        i = int((counts != 1).nonzero()[0])
        raise ValueError(f"row {i} has {int(counts[i])} image placeholders; expected exactly 1")
    keep = ~has_image
    b, t = has_image.shape
    kept = embeds[keep].view(b, t - 1, embeds.shape[-1])
    return kept, (labels[keep].view(b, t - 1) if labels is not None else None)
