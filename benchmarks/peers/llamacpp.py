"""Peer `llama.cpp`: the checkpoint through our GGUF exporter (export/gguf.py), the text model quantized
by llama.cpp's own `llama_model_quantize` (q4_0, q4_k_m; the mmproj in f16, as llama.cpp's converter
writes it), run in llama.cpp through llama-cpp-python exactly as the bundle's gguf contender runs
(benchmarks/contenders/gguf.py).

A model whose vision side llama.cpp cannot represent (export/gguf_layout.check_representable, e.g. an
LDP projector on a patch grid other than 24x24: llama.cpp's LDP graphs hard-code it) still has a plain
Llama decoder: that peer is the text GGUF alone, fed token ids, labelled `scope: text decoder` with
the reason, and has no image-encode time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mobilevlm.fileio import disk_bytes

QUANTS = ("q4_0", "q4_k_m")
BACKEND = "llama.cpp"


def available() -> None:
    from . import PeerSkipped

    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise PeerSkipped(f"llama.cpp peer needs llama-cpp-python and gguf (the `gguf` extra): {exc.name} is not installed") from None


def build(model_dir: Path, quant: str, out: Path, context: int) -> dict:
    from mobilevlm.checkpoint import load_model, load_processor
    from mobilevlm.errors import ExportError
    from mobilevlm.export.gguf import text_file
    from mobilevlm.export.gguf_layout import check_representable
    from mobilevlm.export.gguf_write import quantize_text_model, read_bpe_tokenizer, tensor_type_census, write_text_model
    from mobilevlm.export.pipeline import get_backend

    from . import PeerSkipped

    model, processor = load_model(model_dir).eval(), load_processor(model_dir)
    try:
        check_representable(model.config)
        why_text_only = None
    except ExportError as exc:
        why_text_only = str(exc)
    try:
        if why_text_only is None:
            backend = get_backend("gguf")
            report = backend.export(model, processor, backend.parse_recipe(quant), out / "gguf", context)
            return {"scope": "vision + text", "exporter": "mobilevlm export/gguf.py", "files": "gguf", "metadata": report.metadata}
        read_bpe_tokenizer(processor.tokenizer.path)
        (out / "gguf").mkdir(parents=True)
        text = out / "gguf" / text_file(quant)
        name = f"mobilevlm-{model.config.projector.type}-{model.config.text.num_layers}L-{model.config.text.hidden_size}"
        with torch.no_grad():
            write_text_model(out / "model-f32.gguf", model, processor, name)
            quantize_text_model(out / "model-f32.gguf", text, quant, max(1, torch.get_num_threads()))
        (out / "model-f32.gguf").unlink()
    except ExportError as exc:
        raise PeerSkipped(f"llama.cpp cannot hold this model: {exc}") from None
    return {"scope": "text decoder", "scope_reason": f"image path not measured: {why_text_only}", "exporter": "mobilevlm export/gguf_write.py (text model only)",
            "files": "gguf", "metadata": {"text_model": text.name, "text_tensor_types": tensor_type_census(text), "context_length": context, "kv_cache_type": "f16"}}


class Contender:
    backend = BACKEND

    def __init__(self, folder: Path, info: dict, bundle):
        self.name = f"peer-llama.cpp-{info['quant']}"
        self.file_bytes = disk_bytes(folder / info["files"])
        self.text_only = info["scope"] == "text decoder"
        if not self.text_only:
            from mobilevlm.benchmarks.contenders.gguf import Contender as GgufContender

            self.inner = GgufContender(bundle, {"name": self.name, "file": str(folder / info["files"]), "metadata": info["metadata"]})
            self.encode, self.embed, self.decode = self.inner.encode, self.inner.embed, self.inner.decode
            return
        from mobilevlm.export.gguf_session import LlamaCppRuntime  # text model alone: no mmproj

        self.runtime = LlamaCppRuntime(folder / info["files"] / info["metadata"]["text_model"], None, info["context_length"], torch.get_num_threads())

    # text decoder only: "embeddings" are the token ids, llama.cpp looks the rows up in its graph
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return ids

    def decode(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        positions = [int(p) for p in pos]
        if positions[0] == 0:
            self.runtime.reset()
        return torch.from_numpy(self.runtime.decode(positions, tokens=[int(t) for t in ids[0]]))
