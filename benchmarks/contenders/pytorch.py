"""Benchmark contender: the PyTorch reference (eager), from the checkpoint the bundle was exported from."""

from __future__ import annotations

from pathlib import Path

import torch


class Contender:
    name = "pytorch"
    backend = "pytorch"

    def __init__(self, bundle, model_dir: Path):
        from mobilevlm import load_model

        self.model = load_model(model_dir)
        if self.model.config.interface != "token":
            from mobilevlm.errors import MobileVLMError

            # the worker's prompt flow puts the image in the sequence; these decoders take it beside it
            raise MobileVLMError(f"{model_dir}: the benchmark worker times token-interface models only, not interface {self.model.config.interface!r}")
        self.model.setup_cache(1, bundle.manifest["prompt"]["context_length"])
        self.file_bytes = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
        v = self.model.config.vision
        self.mean, self.std = torch.tensor(v.image_mean).view(1, 3, 1, 1), torch.tensor(v.image_std).view(1, 3, 1, 1)

    @torch.inference_mode()
    def encode(self, image_u8: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image((image_u8.float() / 255 - self.mean) / self.std)

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(ids)

    @torch.inference_mode()
    def decode(self, embeds: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model.decode(embeds, pos)[0, -1]
