"""ONNX Runtime exporter: a folder of three graphs plus `genai_config.json`, the layout Microsoft's own
multimodal ONNX models ship in, runnable by plain `onnxruntime` and by `onnxruntime-genai`.

    model-<recipe>/vision.onnx       uint8 RGB [B, 3, S, S] -> image_features [B, N, D] (normalised inside)
    model-<recipe>/embedding.onnx    input_ids (negative = image position), image_features -> inputs_embeds
    model-<recipe>/decoder.onnx      inputs_embeds, attention_mask, past_key_values.* -> logits, present.*
    model-<recipe>/genai_config.json model type `decoder-pipeline` (embedding stage, then the decoder)
    model-<recipe>/tokenizer.json, tokenizer_config.json   (so GenAI's Tokenizer opens the folder alone)

Graph details (names, dynamic axes, the module swap) are in `export/onnx_graphs.py`; the runtimes that
drive them in `export/onnx_session.py`; the quantization passes in `export/onnx_quantize.py`.

Recipes read left to right (`parse_recipe`; an unknown name lists this grammar):

    fp32 | fp16 | int8[-emb4|-embfp] | int4[-bN][-accK][-sym][-emb4|-embfp][-vis8]    then [-gqa][-opsetN][-ort]

| part | meaning | ONNX Runtime tool |
|------|---------|-------------------|
| `fp32` | the exported graphs as they are | - |
| `fp16` | every graph in fp16, inputs / outputs (and the KV cache) kept fp32 | `onnxruntime.transformers.float16` |
| `int8` | dynamic int8 for every weight MatMul of vision and decoder (per-channel weights, activations quantized per call) | `quantize_dynamic` |
| `int4` | 4-bit blocks (asymmetric: scale + zero point per block) for every decoder MatMul (attention, MLP, output head) | `MatMulNBitsQuantizer` -> `MatMulNBits` |
| `-bN` | int4 block size N in 16, 32, 64, 128, 256 (default 32); widths it does not divide are padded | `block_size` |
| `-accK` | MatMulNBits `accuracy_level` K: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (default 4, as GenAI's builder for CPU) | `accuracy_level` |
| `-sym` | int4 blocks symmetric (no zero points; GenAI's builder default): smaller and a little faster, less accurate - on the tiny model 92.9% vs 95.6% greedy token agreement | `is_symmetric=True` |
| `-emb4` | token table in 4-bit symmetric blocks of 32 along the width (default for int4; ORT's tool quantizes Gather in 4 bits only) | `GatherBlockQuantized` |
| `-embfp` | token table kept fp32 (default for int8) | - |
| `-vis8` | int4 only: the vision graph in dynamic int8 too (vision stays fp32 otherwise) | `quantize_dynamic` |
| `-gqa` | each decoder attention as one fused `com.microsoft.GroupQueryAttention` (rotary inside), as GenAI's builder emits, run with a shared KV buffer (no cache copy per token); rows must not be left-padded | `torch.onnx.export(custom_translation_table=...)` |
| `-opsetN` | ONNX opset 18..23 (default 18: attention lowers to MatMul / Softmax; 23 emits `Attention` and `RMSNormalization`) | `torch.onnx.export(opset_version=N)` |
| `-ort` | convert the graphs to `.ort` with a reduced-operator config for ORT Mobile builds | `convert_onnx_models_to_ort` |

Why int8 also covers the decoder: dynamic int8 weights cut the decoder 4x and ORT's CPU kernels for it
(`MatMulInteger`) are mature on x86 and ARM, at a smaller accuracy cost than 4-bit; the vision tower
in int4 would cost more accuracy than it saves (it is a small share of the bytes), hence `-vis8`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import onnxruntime  # noqa: F401  missing -> get_backend names the package (the `onnx` extra)

from mobilevlm.errors import ExportError
from mobilevlm.fileio import disk_bytes
from mobilevlm.model import MobileVLM
from mobilevlm.processing import Processor

from .pipeline import ExportReport

RECIPE_GRAMMAR = "fp32 | fp16 | int8[-emb4|-embfp] | int4[-b16|-b32|-b64|-b128|-b256][-acc0..4][-sym][-emb4|-embfp][-vis8], then optionally [-gqa][-opset18..23][-ort]"
BLOCK_SIZES = (16, 32, 64, 128, 256)
OPSETS = range(18, 24)
EMBEDDING_BLOCK = 32
GRAPHS = ("vision", "embedding", "decoder")
_PATTERN = re.compile(r"(fp32|fp16|int8|int4)(?:-b(\d+))?(?:-acc(\d+))?(-sym)?(?:-(emb4|embfp))?(-vis8)?(-gqa)?(?:-opset(\d+))?(-ort)?")


@dataclass(frozen=True)
class OnnxRecipe:
    name: str
    precision: str  # fp32 | fp16 | int8 | int4
    block_size: int | None = None
    accuracy_level: int | None = None
    symmetric: bool = False
    embedding_bits: int | None = None  # 4 (GatherBlockQuantized) or None (fp32 table)
    vision_int8: bool = False
    fused_attention: bool = False
    opset: int = 18
    ort_format: bool = False

    def describe(self) -> dict:
        decoder = {"fp32": "fp32", "fp16": "fp16 (fp32 inputs / outputs)", "int8": "int8 dynamic (MatMulInteger), per-channel weights",
                   "int4": f"int4 MatMulNBits, {'symmetric' if self.symmetric else 'asymmetric'} blocks of {self.block_size}, accuracy_level {self.accuracy_level}"}[self.precision]
        vision = "int8 dynamic (MatMulInteger)" if self.vision_int8 else {"fp16": "fp16 (fp32 inputs / outputs)"}.get(self.precision, "fp32")
        return {
            "recipe": self.name,
            "decoder_matmuls": decoder,
            "embedding": f"int{self.embedding_bits} GatherBlockQuantized, blocks of {EMBEDDING_BLOCK}" if self.embedding_bits else vision if self.precision == "fp16" else "fp32",
            "vision_and_projector": vision,
            "kv_cache": "fp32, one buffer of the context length shared by past and present (GQA writes in place)" if self.fused_attention else "fp32, concatenated past -> present (past_present_share_buffer false)",
            "attention": "com.microsoft.GroupQueryAttention (fused, rotary inside)" if self.fused_attention else "decomposed (MatMul / Softmax), rotary and grouped heads as plain ops",
            "opset": self.opset,
            "format": ".ort (ORT Mobile, reduced-operator config)" if self.ort_format else ".onnx",
        }


def parse_recipe(name: str) -> OnnxRecipe:
    """Parse a recipe name; an unknown or inconsistent one is an `ExportError` showing the grammar."""
    match = _PATTERN.fullmatch(name) if isinstance(name, str) else None
    if not match:
        raise ExportError(f"unknown quantization recipe {name!r} for the onnx backend; expected {RECIPE_GRAMMAR}")
    precision, block, accuracy, symmetric, embedding, vision8, gqa, opset, ort_format = match.groups()
    if precision != "int4" and (block or accuracy or symmetric or vision8):
        raise ExportError(f"quantization recipe {name!r}: -bN, -accK, -sym and -vis8 apply to int4 only; expected {RECIPE_GRAMMAR}")
    if precision in ("fp32", "fp16") and embedding:
        raise ExportError(f"quantization recipe {name!r}: -emb* applies to int8 and int4 only; expected {RECIPE_GRAMMAR}")
    block_size = int(block or 32) if precision == "int4" else None
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise ExportError(f"quantization recipe {name!r}: int4 block size {block_size} is not one of {BLOCK_SIZES}")
    accuracy_level = int(accuracy or 4) if precision == "int4" else None
    if accuracy_level is not None and not 0 <= accuracy_level <= 4:
        raise ExportError(f"quantization recipe {name!r}: accuracy level {accuracy_level} is not in 0..4")
    opset_version = int(opset or 18)
    if opset_version not in OPSETS:
        raise ExportError(f"quantization recipe {name!r}: opset {opset_version} is not supported; expected one of {OPSETS.start}..{OPSETS.stop - 1}")
    bits = 4 if embedding == "emb4" or (precision == "int4" and embedding is None) else None
    if ort_format and bits:
        raise ExportError(f"quantization recipe {name!r}: the .ort format cannot store the 4-bit token table (GatherBlockQuantized's int4 tensors); add -embfp (e.g. int4-embfp-ort)")
    return OnnxRecipe(name, precision, block_size, accuracy_level, bool(symmetric), bits, bool(vision8) or precision == "int8", bool(gqa), opset_version, bool(ort_format))


def export_onnx(model: MobileVLM, processor: Processor, recipe: OnnxRecipe, path: Path, context_length: int | None = None) -> ExportReport:
    """Export, quantize and (when onnxruntime-genai is installed) cross-check the artifact folder `path`."""
    from .bundle import write_tokenizer
    from .onnx_graphs import DECODER_IMAGE_INPUT, export_graphs
    from .onnx_quantize import embedding_to_nbits, graph_bytes, to_fp16, to_int4, to_int8_dynamic, to_ort_format

    started = time.time()
    config = model.config
    context = context_length or config.text.max_seq_len
    if not config.num_image_tokens + 2 <= context <= config.text.max_seq_len:
        raise ExportError(f"context length {context} must hold the {config.num_image_tokens} image tokens plus text, and be at most the model's {config.text.max_seq_len}")
    path = Path(path)
    path.mkdir(parents=True)
    graphs = export_graphs(model, path, context, recipe.opset, recipe.fused_attention)
    passes: list[str] = []
    if recipe.precision == "fp16":
        for name in GRAPHS:
            to_fp16(graphs[name])
        passes.append("float16 conversion (fp32 I/O kept) on all graphs")
    if recipe.precision == "int4":
        passes.append(f"MatMulNBits on {to_int4(graphs['decoder'], recipe.block_size, recipe.accuracy_level, recipe.symmetric)} decoder MatMuls")
    if recipe.precision == "int8":
        passes.append(f"MatMulInteger on {to_int8_dynamic(graphs['decoder'])} decoder MatMuls")
    if recipe.vision_int8:
        passes.append(f"MatMulInteger on {to_int8_dynamic(graphs['vision'])} vision MatMuls")
    if recipe.embedding_bits:
        embedding_to_nbits(graphs["embedding"], recipe.embedding_bits, EMBEDDING_BLOCK)
        passes.append(f"GatherBlockQuantized int{recipe.embedding_bits} token table (the tool raises the embedding graph to opset 21 for its int4 tensors)")
    sizes = {name: graph_bytes(p) for name, p in graphs.items()}
    files = {name: p.name for name, p in graphs.items()}
    if recipe.ort_format:
        operators = to_ort_format(path, list(GRAPHS))
        files = {name: f"{name}.ort" for name in GRAPHS}
        sizes = {name: (path / file).stat().st_size for name, file in files.items()}
        passes.append(f"ORT format conversion, operator config {operators.name}")
    write_tokenizer(path, processor)
    (path / "genai_config.json").write_text(json.dumps(genai_config(model, processor, context, files, recipe.fused_attention), indent=2) + "\n")
    metadata = {
        "graphs": files,
        "graph_bytes": sizes,
        "genai_config": "genai_config.json",
        "context_length": context,
        "kv_cache": "shared-buffer" if recipe.fused_attention else "concat",
        "opset": recipe.opset,
        "execution_provider": "CPUExecutionProvider",
        "image_placeholder": "any negative input_id; the k-th one takes row k of image_features flattened to [I * N, D]",
        "decoder_image_input": DECODER_IMAGE_INPUT.get(config.interface),
        "passes": passes,
        "versions": _versions(),
    }
    _check_loads(path, files)
    metadata["onnxruntime_genai"] = genai_check(model, processor, path, metadata)
    logging.info("wrote %s", path)
    size = disk_bytes(path)
    return ExportReport(path, time.time() - started, size, graph_specs(model, context, recipe), metadata)


def genai_config(model: MobileVLM, processor: Processor, context: int, files: dict[str, str], shared_buffer: bool = False) -> dict:
    """ONNX Runtime GenAI's config: a `decoder-pipeline` of the embedding graph and the decoder.

    `past_present_share_buffer` is true only for `-gqa` decoders: GroupQueryAttention writes new
    positions into a cache preallocated to the context; the concat-style graph returns past ++ new
    and fails in a shared buffer."""
    from .onnx_graphs import DECODER_IMAGE_INPUT, PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE, cache_names

    t = model.config.text
    tok = processor.tokenizer
    image_input = [DECODER_IMAGE_INPUT[model.config.interface]] if model.config.interface in DECODER_IMAGE_INPUT else []
    embedding_outputs = ["inputs_embeds", "image_mask"] if model.config.interface == "visual_expert" else ["inputs_embeds"]
    return {
        "model": {
            "type": "decoder-pipeline",
            "bos_token_id": tok.bos_id,
            "eos_token_id": [tok.eos_id],
            "pad_token_id": tok.pad_id if tok.pad_id is not None else tok.eos_id,
            "vocab_size": t.vocab_size,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": t.head_dim,
                "hidden_size": t.hidden_size,
                "num_attention_heads": t.num_heads,
                "num_hidden_layers": t.num_layers,
                "num_key_value_heads": t.num_kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
                "pipeline": [{
                    "embedding": {"filename": files["embedding"], "inputs": ["input_ids", "image_features"], "outputs": embedding_outputs},
                    "decoder": {"filename": files["decoder"], "inputs": ["inputs_embeds", "attention_mask", *cache_names(t.num_layers, True), *image_input],
                                "outputs": ["logits", *cache_names(t.num_layers, False)]},
                }],
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context, "min_length": 0,
                   "past_present_share_buffer": shared_buffer, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0,
                   "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0, "early_stopping": True},
    }


def graph_specs(model: MobileVLM, context: int, recipe: OnnxRecipe) -> dict:
    """Each graph's inputs and outputs, for the manifest (an app's whole contract)."""
    c = model.config
    s, d, v = c.input_image_size, c.text.hidden_size, c.text.vocab_size
    kv = [c.text.num_kv_heads, c.text.head_dim]
    image = {"name": "image", "dtype": "uint8", "shape": ["batch_size", 3, s, s], "layout": "NCHW", "channels": "RGB", "range": [0, 255],
             "resized_inside": False, "normalized_inside": True}
    features = {"name": "image_features", "dtype": "float32", "shape": ["batch_size", c.num_image_features, d]}
    if c.resolution == "anyres":
        image.update(shape=["K", 3, s, s], dynamic={"K": [2, 1 + c.max_tiles]},
                     meaning="the views of ONE image: the global view, then the tiles of the chosen layout row-major (preprocessing.tiling)")
        features.update(shape=[1, f"K * {c.tokens_per_view + 1}", d],
                        meaning="each view's tokens followed by a separator token; the prompt gets one negative id per row")
    specs = {
        "vision": {"inputs": [image], "outputs": [features]},
        "embedding": {
            "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch_size", "sequence_length"], "meaning": "token ids; a negative id is an image position"},
                       {"name": "image_features", "dtype": "float32", "shape": ["num_images", c.num_image_features, d], "meaning": "vision output, num_images 0 for text-only calls"}],
            "outputs": [{"name": "inputs_embeds", "dtype": "float32", "shape": ["batch_size", "sequence_length", d]}],
        },
        "decoder": {
            "inputs": [{"name": "inputs_embeds", "dtype": "float32", "shape": ["batch_size", "sequence_length", d]},
                       {"name": "attention_mask", "dtype": "int64", "shape": ["batch_size", "total_sequence_length"], "meaning": "1 for real positions (past and new), 0 for left padding"},
                       {"name": "past_key_values.{i}.key / .value", "dtype": "float32", "shape": ["batch_size", *kv[:1], "past_sequence_length", kv[1]], "layers": c.text.num_layers}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch_size", "sequence_length", v]},
                        {"name": "present.{i}.key / .value", "dtype": "float32", "shape": ["batch_size", kv[0], "past_sequence_length + sequence_length", kv[1]]}],
            "kv_cache": {"positions": context, "layout": "[batch, kv_heads, positions, head_dim] per layer, passed in and out (concatenated)"},
        },
    }
    decoder = specs["decoder"]
    if c.interface == "cross_attention":
        decoder["inputs"].append({"name": "image_features", "dtype": "float32", "shape": ["batch_size", c.num_image_features, d],
                                  "meaning": "the vision graph's output for the conversation's image, the same tensor on every call; all zeros when there is no image"})
        decoder.update(interface="cross_attention", how_to_run=(
            "the image takes no positions: the prompt is the ids of before_image followed by those of after_image (no negative ids; the embedding "
            "graph gets image_features with num_images 0), and every decoder call, prefill and each generated token, gets the vision output as image_features"))
    elif c.interface == "visual_expert":
        specs["embedding"]["outputs"].append({"name": "image_mask", "dtype": "float32", "shape": ["batch_size", "sequence_length"],
                                              "meaning": "1.0 where input_ids was negative (an image position), 0.0 elsewhere"})
        decoder["inputs"].append({"name": "image_mask", "dtype": "float32", "shape": ["batch_size", "sequence_length"],
                                  "meaning": "the embedding graph's image_mask for these positions: 1.0 routes a position through the visual expert's weights"})
        decoder.update(interface="visual_expert", how_to_run=(
            "as the token interface, and pass the embedding graph's second output image_mask to the decoder with inputs_embeds "
            "(ONNX Runtime GenAI's pipeline does this by name)"))
    return specs


def _check_loads(folder: Path, files: dict[str, str]) -> None:
    from .onnx_session import open_graph

    for file in files.values():
        open_graph(folder / file, threads=1)


def genai_check(model: MobileVLM, processor: Processor, folder: Path, metadata: dict, num_cases: int = 4) -> dict:
    """Parity of onnxruntime-genai on the first parity cases, or why it could not run."""
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        return {"ran": False, "reason": f"onnxruntime-genai is not installed ({exc}); pip install onnxruntime-genai"}
    from .bundle import preprocessing_spec, prompt_spec
    from .onnx_session import GenAISession
    from .parity import compare, parity_cases

    manifest = {"prompt": prompt_spec(processor, metadata["context_length"], model.config.num_image_tokens), "preprocessing": preprocessing_spec(processor),
                "tokenizer": {"file": "tokenizer.json"}, "model": {"config": model.config.to_dict()}}
    try:
        session = GenAISession(folder, {"name": folder.name, "file": ".", "metadata": metadata}, manifest)
        record = compare(session, model, processor, parity_cases(num_cases), 0, None, None)
    except Exception as exc:  # a runtime failure is a finding to record, not a reason to lose the export
        return {"ran": False, "version": og.__version__, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    record.update(ran=True, version=og.__version__, runtime="onnxruntime-genai decoder-pipeline (embedding + decoder; vision graph in onnxruntime), CPU")
    return record


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("onnx", "onnxruntime", "onnxscript", "onnxruntime-genai"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def backend():
    from .onnx_session import OnnxSession
    from .pipeline import Backend

    return Backend("onnx", "", parse_recipe, export_onnx, OnnxSession, "onnxruntime (CPUExecutionProvider): vision -> embedding -> decoder with KV cache", unsupported=())
