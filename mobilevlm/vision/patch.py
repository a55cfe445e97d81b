"""Encoder-free vision path (Fuyu): raw patches, linearly projected, with a row separator.

The image is cut into `patch_size` x `patch_size` patches; each is flattened and one Linear maps it to
`hidden_size`. No transformer runs over the patches: the decoder itself is the image model. The
patches carry no position embedding; instead a learned separator vector (Fuyu's |NEWLINE| token) ends
every row of the grid, so the decoder can tell where a row stops, whatever the image's width. Tokens
are row-major: row 0's patches, separator, row 1's patches, separator, ... -> [B, rows * (cols + 1), D].

Flattening order is Fuyu's (`FuyuImageProcessor.patchify_image`): pixel row, pixel column, then
channel (channel fastest), so Fuyu's `vision_embed_tokens` loads here as `patch_embedding` unchanged.
Fuyu embeds |NEWLINE| with the text embedding; here it lives in the vision width and goes through the
projector like every other token, so the encoder's output stays one tensor.

Rows and columns come from the input's shape, so eager mode takes any size that is a multiple of
`patch_size` (`num_output_tokens` assumes the configured square image); an export fixes the size.
Patchification is rank-4 permutes and reshapes only (Core ML handles rank <= 5; XNNPACK and ONNX
transpose these directly).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig


class PatchEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.type != "patch":
            raise ValueError(f"PatchEncoder needs vision.type 'patch', got {config.type!r}")
        self.config = config
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Linear(3 * config.patch_size**2, config.hidden_size)
        self.newline = nn.Parameter(torch.randn(config.hidden_size) * 0.02)

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, rows, cols, p * p * C], each patch flattened as (pixel row, pixel col, channel)."""
        b, c, h, w = pixel_values.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of vision.patch_size {p}")
        rows, cols = h // p, w // p
        x = pixel_values.permute(0, 2, 3, 1).reshape(b * rows, p, cols, p * c)  # split H into (rows, p), W*C into (cols, p*C)
        return x.permute(0, 2, 1, 3).reshape(b, rows, cols, p * p * c)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] -> tokens [B, rows * (cols + 1), D], a separator after each row."""
        x = self.patch_embedding(self.patchify(pixel_values))  # [B, rows, cols, D]
        b, rows, _, d = x.shape
        newline = self.newline.reshape(1, 1, 1, d).expand(b, rows, 1, d)
        return torch.cat([x, newline], dim=2).reshape(b, -1, d)

    def pooled(self, pixel_values: torch.Tensor, mask_ratio: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean of the patch tokens (separators excluded: they carry no image content). `mask_ratio` is
        ignored: a linear projection costs nothing worth saving by dropping patches."""
        return self.patch_embedding(self.patchify(pixel_values)).mean(dim=(1, 2))
