"""Core ML recipes: named weight-compression plans carried out by coremltools' `ct.optimize.coreml`.

A recipe name reads  `fp16`  or  `int8[-bN]`  or  `int4[-bN]`  or  `palettize4[-gN]`.

| recipe        | decoder linears (attention, MLP, output head)                  | vision, projector, embedding table |
|---------------|----------------------------------------------------------------|------------------------------------|
| `fp16`        | fp16                                                           | fp16                               |
| `int8[-bN]`   | int8 symmetric, one scale per block of N inputs (default 32)   | int8 per-block 32                  |
| `int4[-bN]`   | int4 affine, one scale and zero point per block of N inputs (default 32) | int8 per-block 32        |
| `palettize4[-gN]` | 4-bit k-means lookup table, one table per N output channels (default 16) | int8 per-block 32      |

Activations and the KV-cache states are fp16 in every recipe. The vision side stays at 8 bits in the
4-bit recipes, as ExecuTorch's own LLaVA recipe keeps it out of 4 bits.

Every weight of a linear, conv or gather op gets an explicit per-op config (`op_name_configs`), so
coremltools' size threshold never skips a small layer. Where the block size does not divide a
layer's input width (or the group size its output width), that one op gets per-channel quantization
(or one table per tensor) instead, and the manifest's per-layer list says so; a block size that fits
no decoder linear at all is an error. After saving, `coreml.verify_compressed` checks that every
planned weight is really stored compressed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mobilevlm.errors import ExportError

SCHEMES = ("fp16", "int8", "int4", "palettize4")
RECIPE_GRAMMAR = "fp16 | int8[-bN] | int4[-bN] | palettize4[-gN]"
DEFAULT_BLOCK, DEFAULT_GROUP, SECONDARY_BLOCK = 32, 16, 32
WEIGHT_OPS = {"linear": "weight", "conv": "weight", "gather": "x"}


@dataclass(frozen=True)
class CoreMLRecipe:
    name: str
    scheme: str  # one of SCHEMES
    block_size: int | None  # int8 / int4: inputs sharing one scale
    group_size: int | None  # palettize4: output channels sharing one lookup table

    def describe(self) -> dict:
        decoder = {
            "fp16": "fp16",
            "int8": f"int8 symmetric per-block {self.block_size} (ct.optimize.coreml.linear_quantize_weights)",
            "int4": f"int4 affine (scale and zero point) per-block {self.block_size} (ct.optimize.coreml.linear_quantize_weights)",
            "palettize4": f"4-bit k-means palettization, one table per {self.group_size} output channels (ct.optimize.coreml.palettize_weights)",
        }[self.scheme]
        rest = "fp16" if self.scheme == "fp16" else f"int8 symmetric per-block {SECONDARY_BLOCK}"
        return {"recipe": self.name, "decoder_linears": decoder, "vision_projector_embedding": rest, "activations": "fp16", "kv_cache": "fp16 Core ML state",
                "per_layer": "artifact metadata.layers lists what each weight got (per-channel / per-tensor where the block or group does not divide)"}


def parse_recipe(name: str) -> CoreMLRecipe:
    """Parse a Core ML recipe name; an unknown one is an `ExportError` showing the grammar."""
    match = re.fullmatch(r"(fp16|int8|int4|palettize4)(?:-([bg])(\d+))?", name)
    if not match:
        raise ExportError(f"unknown Core ML quantization recipe {name!r}; expected {RECIPE_GRAMMAR}")
    scheme, kind, number = match.group(1), match.group(2), match.group(3)
    if kind and (scheme == "fp16" or (kind == "b") != scheme.startswith("int")):
        raise ExportError(f"unknown Core ML quantization recipe {name!r}; expected {RECIPE_GRAMMAR} (-bN for int8 / int4, -gN for palettize4)")
    size = int(number) if number else None
    if size is not None and not 1 <= size <= 4096:
        raise ExportError(f"Core ML quantization recipe {name!r}: size {size} must be in 1..4096")
    block = (size or DEFAULT_BLOCK) if scheme.startswith("int") else None
    group = (size or DEFAULT_GROUP) if scheme == "palettize4" else None
    return CoreMLRecipe(name, scheme, block, group)


def check_block_size(decoder, recipe: CoreMLRecipe) -> None:
    """Refuse, before converting anything, a block size that divides no decoder linear's input width."""
    from torch import nn

    if recipe.scheme not in ("int8", "int4"):
        return
    widths = sorted({m.in_features for m in decoder.modules() if isinstance(m, nn.Linear)})
    if not any(w % recipe.block_size == 0 for w in widths):
        raise ExportError(f"Core ML recipe {recipe.name!r}: block size {recipe.block_size} divides the input width of no decoder linear "
                          f"(widths {', '.join(map(str, widths))}); choose a block size that divides them")


def _layer_name(weight_var: str, names: list[str]) -> str:
    """The PyTorch parameter behind a converted weight (`p_text_layers_0_..._weight_to_fp16`)."""
    key = weight_var.removesuffix("_to_fp16").removeprefix("p_")
    found = [n for n in names if n.replace(".", "_").endswith(key)]
    return found[0] if len(found) == 1 else weight_var


def _int_config(bits: int, block: int | None):
    from coremltools.optimize.coreml import OpLinearQuantizerConfig

    # int4 is affine (a zero point per block as well as a scale): symmetric int4 wastes one of its 16
    # levels and the range a lopsided block does not use (on the trained tiny model: 92.7% token
    # agreement symmetric, 100% affine, at the same size to within the zero points).
    mode = "linear" if bits == 4 else "linear_symmetric"
    if block is None:
        return OpLinearQuantizerConfig(mode=mode, dtype=f"int{bits}", granularity="per_channel", weight_threshold=0)
    return OpLinearQuantizerConfig(mode=mode, dtype=f"int{bits}", granularity="per_block", block_size=block, weight_threshold=0)


def _lut_config(group: int | None):
    from coremltools.optimize.coreml import OpPalettizerConfig

    if group is None:
        return OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_tensor", weight_threshold=0)
    return OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=group, weight_threshold=0)


def plan(program, recipe: CoreMLRecipe, part: str, names: list[str]) -> tuple[dict, dict, list[dict]]:
    """Per-op configs (quantization, palettization) and the per-layer report for one converted program."""
    quantize, palettize, rows = {}, {}, []
    fitting, widths = 0, set()
    for op in program.functions["main"].operations:
        weight = op.inputs.get(WEIGHT_OPS.get(op.op_type, ""))
        if weight is None or weight.op is None or weight.op.op_type != "const" or weight.rank < 2:
            continue
        shape = [int(s) for s in weight.shape]
        row = {"layer": _layer_name(weight.name, names), "op": op.name, "op_type": op.op_type, "shape": shape}
        main = part == "decoder" and op.op_type == "linear"
        if recipe.scheme == "fp16":
            row["compression"] = "fp16"
        elif main and recipe.scheme == "palettize4":
            group = recipe.group_size if shape[0] % recipe.group_size == 0 else None
            palettize[op.name] = _lut_config(group)
            row["compression"] = f"4-bit LUT per {group} output channels" if group else f"4-bit LUT per tensor (output width {shape[0]} is not a multiple of group {recipe.group_size})"
        else:
            bits, block = (int(recipe.scheme[3:]), recipe.block_size) if main else (8, SECONDARY_BLOCK)
            if main:
                widths.add(shape[1])
                fitting += shape[1] % block == 0
            fits = shape[1] % block == 0
            quantize[op.name] = _int_config(bits, block if fits else None)
            row["compression"] = f"int{bits} per-block {block}" if fits else f"int{bits} per-channel (input width {shape[1]} is not a multiple of block {block})"
        rows.append(row)
    if part == "decoder" and recipe.scheme in ("int8", "int4") and not fitting:
        raise ExportError(f"Core ML recipe {recipe.name!r}: block size {recipe.block_size} divides the input width of no decoder linear "
                          f"(widths {', '.join(map(str, sorted(widths)))}); choose a block size that divides them")
    return quantize, palettize, rows


def compress(mlmodel, recipe: CoreMLRecipe, part: str, names) -> tuple[object, list[dict]]:
    """Apply `recipe` to one converted model with coremltools' own compression passes."""
    from coremltools.optimize.coreml import OptimizationConfig, linear_quantize_weights, palettize_weights

    quantize, palettize, rows = plan(mlmodel._mil_program, recipe, part, list(names))
    if quantize:
        mlmodel = linear_quantize_weights(mlmodel, OptimizationConfig(op_name_configs=quantize))
    if palettize:
        mlmodel = palettize_weights(mlmodel, OptimizationConfig(op_name_configs=palettize))
    return mlmodel, rows
