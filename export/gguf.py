"""GGUF exporter: the text model and the mmproj that llama.cpp's multimodal tools (`mtmd`, what
`llama-mtmd-cli`, `llama-server` and llama.cpp-based phone apps use) load and run unchanged.

An artifact is a folder `model-<recipe>-gguf/` holding
- `model-<recipe>.gguf`: the decoder, architecture `llama`, with our byte-level BPE tokenizer as a
  `gpt2` tokenizer and a chat template; f32 is written by gguf-py, every other type is made from it by
  llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python);
- `mmproj-<f32|f16>.gguf`: CLIP tower + projector (`mlp`, `ldp`, `ldpv2`), written by gguf-py in f32
  (recipe f32) or f16 (every other recipe, llama.cpp's usual choice: its quantizer does not take clip
  files, and the vision side is small next to the decoder).

What llama.cpp computes differently from the PyTorch reference (measured by parity, listed in the
artifact's metadata): tanh-approximated GELU in the projector (ours is erf) and fp16-rounded activation
inputs to its GELU tables and depthwise convolutions; and, in the llama.cpp this was checked against,
the class token placed after the patches (llama.cpp issue 25814), which shifts every patch's position
embedding by one and feeds the class token's output as the last image token.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mobilevlm.errors import ExportError
from mobilevlm.model import MobileVLM
from mobilevlm.processing import Processor

from .gguf_layout import check_representable
from .gguf_write import quantize_text_model, read_bpe_tokenizer, tensor_type_census, write_mmproj, write_text_model
from .pipeline import ExportReport

RECIPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")

KNOWN_DIFFERENCES = [
    "projector GELU is llama.cpp's tanh approximation served from an fp16 table (the reference uses erf)",
    "CLIP quick_gelu reads an fp16 table; depthwise convolutions (ldp, ldpv2) round their input to fp16 (ggml_conv_2d_dw im2col) "
    "and take f16 kernels even in the f32 mmproj (ggml's CPU matmul refuses an f32 kernel against the f16 im2col)",
    "llama.cpp's default flash attention (CPU kernel) rounds the attention (about 5e-4 relative on the logits); the f32 artifact "
    "is run with it off and an f32 KV cache (artifact metadata: flash_attention, kv_cache_type), the others with llama.cpp's defaults",
    "llama.cpp's LLaVA graph (tools/mtmd/models/llava.cpp) appends the class token after the patches while still selecting "
    "rows 1..N: patch i gets position embedding i instead of i+1, patch 0 is dropped and the class token's output becomes the "
    "last image token (llama.cpp issue 25814, open fix PR 25844); the files are written in the standard layout (as llama.cpp's "
    "own converter writes them), so a llama.cpp with that fixed computes the reference's image tokens up to the differences above",
    "images handed to llama.cpp unprepared are resized (its bicubic) before padding with (122, 116, 104); the reference pads, "
    "then resizes with PIL; GgufSession hands prepared image_size x image_size RGB pixels, which llama.cpp copies unchanged",
]


@dataclass(frozen=True)
class GgufRecipe:
    name: str

    @property
    def mmproj_type(self) -> str:
        return "f32" if self.name == "f32" else "f16"

    def describe(self) -> dict:
        return {
            "recipe": self.name,
            "text_model": self.name,
            "text_quantizer": "gguf-py writer (f32)" if self.name == "f32" else "llama.cpp llama_model_quantize (via llama-cpp-python) from the f32 GGUF",
            "mmproj": self.mmproj_type,
            "mmproj_writer": "gguf-py writer; tensors of 2+ dimensions in " + self.mmproj_type + ", 1-D tensors f32",
        }


def parse_recipe(name: str) -> GgufRecipe:
    if name not in RECIPES:
        raise ExportError(f"unknown quantization recipe {name!r} for gguf; expected one of {', '.join(RECIPES)}")
    return GgufRecipe(name)


def text_file(recipe: str) -> str:
    return f"model-{recipe}.gguf"


def mmproj_file(mmproj_type: str) -> str:
    return f"mmproj-{mmproj_type}.gguf"


def export_gguf(model: MobileVLM, processor: Processor, recipe: GgufRecipe, path: Path, context_length: int | None = None) -> ExportReport:
    """Write the artifact folder `path` (the caller puts it in a bundle)."""
    if isinstance(recipe, str):
        recipe = parse_recipe(recipe)
    config = model.config
    check_representable(config)
    read_bpe_tokenizer(processor.tokenizer.path)  # refuse other tokenizers before any work
    context = context_length or config.text.max_seq_len
    if not config.num_image_tokens + 2 <= context <= config.text.max_seq_len:
        raise ExportError(f"context length {context} must hold the {config.num_image_tokens} image tokens plus text, and be at most the model's {config.text.max_seq_len}")
    if recipe.name != "f32":
        _require_llama_cpp()
    started = time.time()
    path = Path(path)
    path.mkdir(parents=True)
    name = f"mobilevlm-{config.projector.type}-{config.text.num_layers}L-{config.text.hidden_size}"
    text, mmproj = path / text_file(recipe.name), path / mmproj_file(recipe.mmproj_type)
    model = model.eval()
    with torch.no_grad():
        if recipe.name == "f32":
            write_text_model(text, model, processor, name)
        else:
            with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
                source = Path(scratch) / "model-f32.gguf"
                write_text_model(source, model, processor, name)
                quantize_text_model(source, text, recipe.name, max(1, torch.get_num_threads()))
        write_mmproj(mmproj, model, recipe.mmproj_type, name)
    size = sum(p.stat().st_size for p in path.iterdir())
    metadata = {
        "text_model": text.name,
        "mmproj": mmproj.name,
        "projector_type": {"mlp2x_gelu": "mlp"}.get(config.projector.type, config.projector.type),
        "text_tensor_types": tensor_type_census(text),
        "mmproj_tensor_types": tensor_type_census(mmproj),
        "context_length": context,
        # runtime settings the artifact was verified with (llama.cpp's defaults, except that f32 keeps
        # the KV cache in f32 and flash attention off, so that it reproduces the reference closely)
        "kv_cache_type": "f32" if recipe.name == "f32" else "f16",
        "flash_attention": "disabled" if recipe.name == "f32" else "auto",
        "image_input": f"RGB uint8 {config.vision.image_size}x{config.vision.image_size}, already padded / resized as manifest.preprocessing says; llama.cpp normalises it",
        "known_differences": KNOWN_DIFFERENCES,
    }
    return ExportReport(path, time.time() - started, size, method_specs(model, context), metadata)


def method_specs(model: MobileVLM, context: int) -> dict:
    """What each file takes and returns, for the manifest."""
    c = model.config
    s = c.vision.image_size
    return {
        "mmproj": {
            "inputs": [{"name": "image", "dtype": "uint8", "shape": [s, s, 3], "layout": "HWC", "channels": "RGB", "range": [0, 255],
                        "resized_inside": "only when not already image_size x image_size", "normalized_inside": True}],
            "outputs": [{"name": "image_embeddings", "dtype": "float32", "shape": [c.num_image_tokens, c.text.hidden_size]}],
            "runtime": "llama.cpp mtmd (mtmd_init_from_file with the text model, mtmd_tokenize / mtmd_helper_eval_chunks)",
        },
        "text_model": {
            "inputs": [{"name": "tokens or embeddings", "dtype": "int32 / float32", "shape": ["T"], "positions": "0..context-1, image tokens take one position each"}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [c.text.vocab_size]}],
            "context": context,
        },
    }


def cls_last_image_features(model: MobileVLM, pixels: torch.Tensor) -> torch.Tensor:
    """Image tokens as llama.cpp's LLaVA graph computes them for this model (llama.cpp issue 25814),
    in exact arithmetic: the class token appended after the patches, position rows 0..N added in that
    order, the tower run to the selected layer, rows 1..N (the last N-1 patches and the class token)
    fed to the projector. A diagnostic oracle: it separates that upstream defect from our export."""
    v = model.vision
    with torch.no_grad():
        patches = v.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
        cls = v.embeddings.class_embedding.expand(patches.shape[0], 1, -1)
        x = v.pre_layernorm(torch.cat([patches, cls], 1) + v.embeddings.position_embedding.weight)
        for layer in v.layers[: v.config.num_layers_used]:
            x = layer(x)
        return model.projector(x[:, 1:])


def _require_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ExportError("gguf quantization needs llama-cpp-python (the `gguf` extra; see the README for building it)") from None


def backend():
    from .gguf_session import GgufSession
    from .pipeline import Backend

    # No exact recipe: llama.cpp's image path computes differently (KNOWN_DIFFERENCES), so even f32
    # answers are measured and recorded, not required to match.
    return Backend("gguf", "-gguf", parse_recipe, export_gguf, GgufSession, "llama.cpp (llama-cpp-python: llama_decode + mtmd)", exact_recipes=(), unsupported=("vision", "projector", "resolution", "interface", "decoder"))
