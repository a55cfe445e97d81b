"""Benchmark contender: an ONNX artifact folder run by plain onnxruntime with the CPU execution provider
(the only one the PyPI build has; XNNPACK / NNAPI / QNN / CoreML EPs are in the mobile builds), through
the same `OnnxSession` that export-time parity uses. Threads: `intra_op_num_threads` =
`torch.get_num_threads()`, which the worker sets from `--threads`."""

from __future__ import annotations

import numpy as np
import torch

from mobilevlm.fileio import disk_bytes


class Contender:
    backend = "onnx"

    def __init__(self, bundle, artifact: dict):
        from mobilevlm.errors import MobileVLMError
        from mobilevlm.export.onnx_session import OnnxSession

        folder = bundle.path(artifact["file"])
        if image_input := (artifact.get("metadata") or {}).get("decoder_image_input"):
            # The worker feeds the image as prompt embeddings (the token interface); a decoder that
            # also takes image_features (cross_attention) or image_mask (visual_expert) needs another flow.
            raise MobileVLMError(f"{folder}: decoder.onnx takes {image_input} (a feature-level interface); the benchmark drives only token-interface graphs")
        self.name = artifact["name"]
        self.file_bytes = disk_bytes(folder)
        self.session = OnnxSession(bundle.root, artifact, bundle.manifest)
        self.execution_provider = self.session.providers[0]

    def encode(self, image_u8: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.vision.run(None, {"image": image_u8.numpy()})[0])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.embed(ids.numpy()))

    def decode(self, embeds: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        start = int(pos[0])
        if start == 0:
            self.session.reset()
        elif start != self.session.length:
            raise ValueError(f"{self.name}: decode at position {start}, but the cache holds {self.session.length} positions")
        return torch.from_numpy(self.session.step(np.ascontiguousarray(embeds.numpy()))[-1])
