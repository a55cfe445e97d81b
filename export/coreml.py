"""Core ML exporter: three ML programs for iOS 18+, compressed with coremltools' own tools, verified by
running the saved programs in our numpy MIL interpreter (`coreml_check.py`; Core ML itself runs only on
Apple hardware).

The artifact is one folder in the bundle (`model-<recipe>-coreml/`) holding
- `vision.mlpackage`: `image` (ImageType, RGB, S x S, scale 1/255) -> `image_embeddings` [1, N, D] fp16.
  CLIP's per-channel std cannot be expressed by ImageType's single scale, so the image is scaled to
  [0, 1] by Core ML and `(x - mean) / std` is computed inside the program (exact, not approximated);
- `embedding.mlpackage`: `input_ids` int32 [1, T] -> `embeddings` [1, T, D] fp16. The table is its own
  small model, not inside the decoder: the decoder takes embeddings (text and image tokens alike), and
  an app embeds a prompt's text once, joins it with the image tokens and prefills in one call;
- `decoder.mlpackage`: `inputs_embeds` [1, T, D] and `causal_mask` [1, 1, T, P + T] fp16 -> `logits`
  [1, V] of the last position. The KV cache is Core ML state (one fp16 `StateType` per layer for keys
  and one for values, [1, kv_heads, C, head_dim]), which needs iOS 18. Positions are implied by the
  mask: the chunk starts at P = mask width - T. T and the mask width are flexible (`RangeDim`) up to
  C - 1: `torch.export` with a dynamic size whose maximum equals the cache length C fails a guard.

The decoder reuses our model's modules: only the attention is swapped (on a copy) for one that keeps
its cache as fp16 buffers (which become the states), reads the rotary tables our decoder precomputes
(float64 `theta ** -x`, so no reciprocal and no fp16 angles reach the converter), and repeats KV heads
with `repeat_interleave` (`scaled_dot_product_attention(enable_gqa=True)` converts to a program that
tiles the heads instead: query head h reads kv head h % n_kv instead of h // group).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mobilevlm.errors import ExportError
from mobilevlm.fileio import disk_bytes
from mobilevlm.model import MobileVLM, encode_views
from mobilevlm.processing import Processor
from mobilevlm.text import apply_rope

from .coreml_check import VERIFICATION_NOTE, CoreMLSession, load_program
from .coreml_compress import CoreMLRecipe, check_block_size, compress, parse_recipe
from .pipeline import ExportReport

MODELS = ("vision", "embedding", "decoder")
MIN_STATEFUL_TARGET = 18  # Core ML state (the KV cache) exists from iOS 18 / macOS 15 on
NUMPY_LIMIT = (2, 4)  # numpy 2.4 breaks coremltools 9.0 conversion ("only 0-dimensional arrays can be converted")


class CoreMLAttention(nn.Module):
    """Our attention's projections with the KV cache as fp16 buffers, written at the chunk's positions."""

    def __init__(self, attention: nn.Module, cache_len: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        shape = (1, self.num_kv_heads, cache_len, self.head_dim)
        # fp16: Core ML states are fp16 only.
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int, mask: torch.Tensor, expert: tuple | None = None) -> torch.Tensor:
        """`expert`: as in `mobilevlm.text.Attention` (the visual expert's projections at image positions)."""
        b, t, _ = x.shape
        end = mask.shape[-1]
        q, k, v = (self.q_proj(x), self.k_proj(x), self.v_proj(x)) if expert is None else expert[0].qkv(self, x, expert[1])
        q = apply_rope(q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        self.k_cache[:, :, start:end] = k.to(self.k_cache.dtype)
        self.v_cache[:, :, start:end] = v.to(self.v_cache.dtype)
        keys, values = self.k_cache[:, :, :end].to(q.dtype), self.v_cache[:, :, :end].to(q.dtype)
        group = self.num_heads // self.num_kv_heads
        if group > 1:  # head h reads kv head h // group
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(y) if expert is None else expert[0].out(self, y, expert[1])


class DecoderProgram(nn.Module):
    """(inputs_embeds [1, T, D], causal_mask [1, 1, T, P + T][, image input]) -> logits [1, V] of the
    last position. The image input: `image_features` [1, N, D] for cross-attention (every call),
    `image_mask` [1, T] (1.0 at image positions) for the visual expert."""

    def __init__(self, model: MobileVLM, cache_len: int):
        super().__init__()
        self.text = model.text
        self.interface = model.config.interface
        for layer in self.text.layers:
            layer.self_attn = CoreMLAttention(layer.self_attn, cache_len)

    def forward(self, inputs_embeds: torch.Tensor, causal_mask: torch.Tensor, image_input: torch.Tensor | None = None) -> torch.Tensor:
        t, end = inputs_embeds.shape[1], causal_mask.shape[-1]
        start = end - t
        cos, sin = self.text.rope_cos[start:end], self.text.rope_sin[start:end]
        extra = {}
        if self.interface == "cross_attention":
            extra = {"image_features": image_input}
        elif self.interface == "visual_expert":
            extra = {"image_mask": (image_input > 0.5).unsqueeze(-1)}
        x = inputs_embeds
        for layer in self.text.layers:
            x = layer(x, cos, sin, start, causal_mask, **extra)
        return self.text.lm_head(self.text.norm(x[:, -1, :]))


class VisionProgram(nn.Module):
    """Pixels in [0, 1] (Core ML applies the 1/255 scale) -> image tokens; CLIP normalisation inside.

    A tiled model ("anyres") runs this program once per view (an ImageType input is one image) and
    each call returns that view's tokens followed by the separator, so the app's concatenation of the
    calls, global view first, is exactly `encode_image` of the views (views are encoded independently)."""

    def __init__(self, model: MobileVLM):
        super().__init__()
        self.vision, self.projector = model.vision, model.projector
        self.separator = getattr(model, "image_separator", None)
        v = model.config.vision
        self.register_buffer("mean", torch.tensor(v.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(v.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return encode_views(self.vision, self.projector, self.separator, (image - self.mean) / self.std)


class EmbeddingProgram(nn.Module):
    def __init__(self, model: MobileVLM):
        super().__init__()
        self.embed_tokens = model.text.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


def check_environment() -> None:
    """Refuse versions known to break conversion before any work starts."""
    version = tuple(int(p) for p in np.__version__.split(".")[:2])
    if version >= NUMPY_LIMIT:
        raise ExportError(f"numpy {np.__version__} breaks coremltools 9.0 conversion; install numpy<2.4 (the `coreml` extra pins it)")


def untested_torch_note() -> str | None:
    """coremltools warns when torch is newer than it was tested with; the interpreter is our check."""
    from coremltools import _deps

    tested = _deps._TORCH_MAX_VERSION
    current = torch.__version__.split("+")[0]
    if tuple(int(p) for p in current.split(".")[:2]) > tuple(int(p) for p in tested.split(".")[:2]):
        return f"coremltools was tested with torch <= {tested}, converted with torch {current}; the programs were checked by the MIL interpreter"
    return None


def _target(name: str, stateful: bool):
    import coremltools as ct

    if not (name.startswith("iOS") and name[3:].isdigit() and hasattr(ct.target, name)):
        raise ExportError(f"unknown Core ML deployment target {name!r}; expected iOS15 .. iOS18")
    if stateful and int(name[3:]) < MIN_STATEFUL_TARGET:
        raise ExportError(f"the decoder keeps its KV cache as Core ML state, which needs minimum deployment target iOS{MIN_STATEFUL_TARGET} or later; got {name}")
    return getattr(ct.target, name)


def convert(module: nn.Module, example: tuple, dynamic_shapes, inputs: list, outputs: list, target: str = "iOS18", states: list | None = None, fp16: bool = True):
    """torch.export (ATen dialect) -> Core ML ML program (fp16 compute unless `fp16=False`), not loaded:
    Core ML runs only on Apple OSes."""
    import coremltools as ct

    check_environment()
    deployment = _target(target, bool(states))
    with torch.no_grad():
        program = torch.export.export(module.eval(), example, dynamic_shapes=dynamic_shapes, strict=False).run_decompositions({})
    with warnings.catch_warnings():
        # Buffer names `text.layers.0...` become `text_layers_0...`; the manifest lists the saved names.
        warnings.filterwarnings("ignore", message=r"Input, '.*', of the source model, has been renamed")
        return ct.convert(program, inputs=inputs, outputs=outputs, states=states or None, minimum_deployment_target=deployment,
                          compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32, skip_model_load=True)


def convert_decoder(model: MobileVLM, cache_len: int, target: str = "iOS18"):
    """The stateful decoder program. Swaps the attention modules of `model.text` in place: pass a copy
    (as `export_coreml` does)."""
    import coremltools as ct
    from torch.export import Dim

    _target(target, stateful=True)  # fail before the slow part
    decoder = DecoderProgram(model, cache_len)
    c = model.config.text
    top = cache_len - 1  # a maximum equal to the cache length fails torch.export's guards
    seq, width = Dim("seq", min=1, max=top), Dim("width", min=1, max=top)
    example = (torch.zeros(1, 3, c.hidden_size), torch.zeros(1, 1, 3, 5))
    shapes: tuple = ({1: seq}, {2: seq, 3: width})
    inputs = [
        ct.TensorType("inputs_embeds", shape=(1, ct.RangeDim(1, top, default=1), c.hidden_size), dtype=np.float16),
        ct.TensorType("causal_mask", shape=(1, 1, ct.RangeDim(1, top, default=1), ct.RangeDim(1, top, default=1)), dtype=np.float16),
    ]
    interface = model.config.interface
    if interface == "cross_attention":  # a fixed number of image features
        n = model.config.num_image_features
        example += (torch.zeros(1, n, c.hidden_size),)
        shapes += (None,)
        inputs.append(ct.TensorType("image_features", shape=(1, n, c.hidden_size), dtype=np.float16))
    elif interface == "visual_expert":  # one value per position of inputs_embeds
        example += (torch.zeros(1, 3),)
        shapes += ({1: seq},)
        inputs.append(ct.TensorType("image_mask", shape=(1, ct.RangeDim(1, top, default=1)), dtype=np.float16))
    states = [ct.StateType(ct.TensorType(shape=tuple(buffer.shape), dtype=np.float16), name=name)
              for name, buffer in decoder.named_buffers() if name.endswith(("k_cache", "v_cache"))]
    return convert(decoder, example, shapes, inputs, [ct.TensorType("logits", dtype=np.float16)], target, states)


def convert_vision(model: MobileVLM, target: str = "iOS18"):
    import coremltools as ct

    s = model.config.input_image_size
    image = ct.ImageType("image", shape=(1, 3, s, s), scale=1.0 / 255.0, bias=[0.0, 0.0, 0.0], color_layout=ct.colorlayout.RGB)
    return convert(VisionProgram(model), (torch.rand(1, 3, s, s),), None, [image], [ct.TensorType("image_embeddings", dtype=np.float16)], target)


def convert_embedding(model: MobileVLM, cache_len: int, target: str = "iOS18"):
    import coremltools as ct
    from torch.export import Dim

    top = cache_len - 1
    ids = ct.TensorType("input_ids", shape=(1, ct.RangeDim(1, top, default=1)), dtype=np.int32)
    example = (torch.zeros(1, 4, dtype=torch.int32),)
    return convert(EmbeddingProgram(model), example, ({1: Dim("tokens", min=1, max=top)},), [ids], [ct.TensorType("embeddings", dtype=np.float16)], target)


def saved_states(package: Path) -> list[dict]:
    """The decoder's states as the saved program names them (coremltools renames `a.b` to `a_b`)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    return [{"name": s.name, "dtype": "float16", "shape": [int(d) for d in s.type.stateType.arrayType.shape]} for s in spec.description.state]


def model_specs(model: MobileVLM, cache_len: int, target: str, states: list[dict]) -> dict:
    """What each program takes and returns, and how an app drives them (the manifest's `methods`)."""
    c = model.config
    s, d, top = c.input_image_size, c.text.hidden_size, cache_len - 1
    image = {"name": "image", "type": "ImageType", "color_layout": "RGB", "shape": [1, 3, s, s], "scale": 1 / 255, "bias": [0, 0, 0],
             "normalized_inside": True, "meaning": "the preprocessed image (padded / resized to S x S); Core ML scales it to [0, 1], (x - mean) / std happens inside"}
    embeddings = {"name": "image_embeddings", "dtype": "float16", "shape": [1, c.num_image_features, d]}
    if c.resolution == "anyres":
        image["meaning"] = "ONE view of the tiled image (preprocessing.tiling): run the program once per view, the global view first, then the tiles row-major"
        embeddings.update(shape=[1, c.tokens_per_view + 1, d],
                          meaning="this view's tokens followed by the separator token; concatenate the views' outputs in order along axis 1")
    specs = {
        "vision": {"file": "vision.mlpackage", "inputs": [image], "outputs": [embeddings]},
        "embedding": {
            "file": "embedding.mlpackage",
            "inputs": [{"name": "input_ids", "dtype": "int32", "shape": [1, "T"], "dynamic": {"T": [1, top]}}],
            "outputs": [{"name": "embeddings", "dtype": "float16", "shape": [1, "T", d]}],
        },
        "decoder": {
            "file": "decoder.mlpackage",
            "inputs": [
                {"name": "inputs_embeds", "dtype": "float16", "shape": [1, "T", d], "dynamic": {"T": [1, top]}},
                {"name": "causal_mask", "dtype": "float16", "shape": [1, 1, "T", "P+T"], "dynamic": {"P+T": [1, top]},
                 "meaning": "P = positions already in the cache; entry (i, j) is 0 where j <= P + i, -inf elsewhere"},
            ],
            "states": states,
            "outputs": [{"name": "logits", "dtype": "float16", "shape": [1, c.text.vocab_size], "meaning": "next-token logits after the last position"}],
            "max_positions": top,
            "minimum_deployment_target": target,
        },
        "how_to_run": (
            "make one MLState per conversation (decoder.makeState()); embed the prompt's text before and after the image with "
            "embedding, join [before, image_embeddings, after] and run decoder once with P = 0; then feed each generated token's "
            "embedding with P = tokens so far (T = 1). Stop at an EOS id, a stop string, or when P + T reaches max_positions."
        ),
    }
    decoder = specs["decoder"]
    if c.interface == "cross_attention":
        decoder["inputs"].append({"name": "image_features", "dtype": "float16", "shape": [1, c.num_image_features, d],
                                  "meaning": "vision's image_embeddings for the conversation's image, the same on every call; all zeros when there is no image"})
        decoder["interface"] = "cross_attention"
        specs["how_to_run"] = (
            "make one MLState per conversation (decoder.makeState()); the image takes no positions: embed the ids of before_image followed by "
            "those of after_image with embedding and run decoder once with P = 0 and vision's image_embeddings as image_features; then feed "
            "each generated token's embedding with P = tokens so far (T = 1) and the same image_features. Stop at an EOS id, a stop string, "
            "or when P + T reaches max_positions.")
    elif c.interface == "visual_expert":
        decoder["inputs"].append({"name": "image_mask", "dtype": "float16", "shape": [1, "T"], "dynamic": {"T": [1, top]},
                                  "meaning": "one value per position of inputs_embeds: 1.0 where they are vision's image_embeddings, 0.0 at text positions"})
        decoder["interface"] = "visual_expert"
        specs["how_to_run"] += " Pass image_mask with every call: 1.0 at the image_embeddings' positions of the joined prompt, 0.0 elsewhere and for generated tokens."
    if c.resolution == "anyres":
        specs["how_to_run"] += (" The image is tiled (preprocessing.tiling): its image_embeddings are the vision program's outputs for every view, "
                                "global view first, concatenated along axis 1.")
    return specs


def export_coreml(model: MobileVLM, processor: Processor, recipe: CoreMLRecipe, path: Path, cache_len: int | None = None, target: str = "iOS18") -> ExportReport:
    """Convert, compress and save the three programs into the folder `path` (the caller's bundle)."""
    import coremltools as ct

    check_environment()
    _target(target, stateful=True)
    started = time.time()
    config = model.config
    cache_len = cache_len or config.text.max_seq_len
    if not config.num_image_tokens + 2 <= cache_len <= config.text.max_seq_len:
        raise ExportError(f"context length {cache_len} must hold the {config.num_image_tokens} image tokens plus text, and be at most the model's {config.text.max_seq_len}")
    check_block_size(model.text, recipe)
    model = copy.deepcopy(model).eval().float()
    model.text.remove_cache()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=False)
    converted = {"vision": convert_vision(model, target), "embedding": convert_embedding(model, cache_len, target), "decoder": convert_decoder(model, cache_len, target)}
    names = {name: param for name, param in model.named_parameters()}
    layers = []
    for part, mlmodel in converted.items():
        mlmodel, rows = compress(mlmodel, recipe, part, names)
        mlmodel.short_description = f"MobileVLM {part} ({recipe.name})"
        mlmodel.save(str(path / f"{part}.mlpackage"))
        layers += rows
        verify_compressed(path / f"{part}.mlpackage", rows)
        logging.info("wrote %s", path / f"{part}.mlpackage")
    metadata = {
        "minimum_deployment_target": target,
        "compute_precision": "float16",
        "coremltools": ct.__version__,
        "verification": f"{VERIFICATION_NOTE}: parity measured by executing the saved ML programs in the numpy MIL interpreter (mobilevlm.export.coreml_check), fp16 rounding mode",
        "layers": layers,
    }
    if note := untested_torch_note():
        metadata["torch_note"] = note
    size = disk_bytes(path)
    specs = model_specs(model, cache_len, target, saved_states(path / "decoder.mlpackage"))
    return ExportReport(path, time.time() - started, size, specs, metadata)


def verify_compressed(package: Path, rows: list[dict]) -> None:
    """Every weight the plan compresses must reach its op through a constexpr op in the saved program."""
    wanted = {row["op"] for row in rows if row["compression"] != "fp16"}
    function = load_program(package).functions["main"]
    for op in function.operations:
        if op.name in wanted:
            weight = op.inputs["weight" if "weight" in op.inputs else "x"]
            if weight.op is None or not weight.op.op_type.startswith("constexpr_"):
                layer = next(r["layer"] for r in rows if r["op"] == op.name)
                raise ExportError(f"{package}: coremltools left {layer} ({op.op_type} {op.name}) uncompressed")
            wanted.discard(op.name)
    if wanted:
        raise ExportError(f"{package}: compressed op(s) {', '.join(sorted(wanted))} are missing from the saved program")


def backend():
    from .pipeline import Backend

    return Backend("coreml", "-coreml", parse_recipe, export_coreml, CoreMLSession,
                   f"Core ML ML programs for iOS 18+ (states, fp16); parity {VERIFICATION_NOTE} (numpy MIL interpreter)",
                   exact_recipes=("fp16",))
