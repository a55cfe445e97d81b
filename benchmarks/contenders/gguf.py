"""Benchmark contender: a GGUF artifact in llama.cpp (llama-cpp-python's C bindings), with llama.cpp's
thread count set from `torch.get_num_threads()` (the worker's --threads).

- `encode`: the mmproj through libmtmd (`mtmd_encode_chunk`), the image handed over as the prepared
  RGB bitmap, which llama.cpp copies unchanged before normalising;
- `embed`: rows of the text model's `token_embd`, dequantized once at load (llama.cpp has no public
  call for this; its graph does the same row lookup in f32);
- `decode`: `llama_decode` of embedding rows at explicit positions, KV cache in llama.cpp's context
  (cleared when a prompt starts again at position 0).
"""

from __future__ import annotations

import torch


class Contender:
    backend = "gguf"

    def __init__(self, bundle, artifact: dict):
        import gguf

        from mobilevlm.export.gguf_session import LlamaCppRuntime, artifact_paths

        text, mmproj = artifact_paths(bundle.root, artifact)
        meta = artifact["metadata"]
        self.name = artifact["name"]
        self.file_bytes = text.stat().st_size + mmproj.stat().st_size
        self.runtime = LlamaCppRuntime(text, mmproj, meta["context_length"], torch.get_num_threads(),
                                       meta["kv_cache_type"], meta.get("flash_attention", "auto"))
        table = next(t for t in gguf.GGUFReader(str(text)).tensors if t.name == "token_embd.weight")
        rows = gguf.quants.dequantize(table.data, table.tensor_type).reshape(int(table.shape[1]), int(table.shape[0]))
        self.table = torch.from_numpy(rows.astype("float32", copy=True))

    def encode(self, image_u8: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.runtime.encode_image(image_u8[0].permute(1, 2, 0).numpy())).unsqueeze(0)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]

    def decode(self, embeds: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        positions = [int(p) for p in pos]
        if positions[0] == 0:
            self.runtime.reset()
        return torch.from_numpy(self.runtime.decode(positions, embeds=embeds[0].float().numpy()))
