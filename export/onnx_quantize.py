"""Post-export passes over the fp32 graphs, each one of ONNX Runtime's own tools (no hand-written
quantizer): why each is used where it is is in `export/onnx.py`'s recipe table.

- `to_int4`: `MatMulNBitsQuantizer` -> `com.microsoft.MatMulNBits` (4-bit blocks) on every
  MatMul with a constant weight; widths the block does not divide are padded by the tool.
- `embedding_to_nbits`: the same tool on the embedding graph's table Gather -> `GatherBlockQuantized`.
- `to_int8_dynamic`: `quantize_dynamic` (per-channel int8 weights, uint8 activations quantized at run
  time) -> `MatMulInteger` / `DynamicQuantizeLinear`.
- `to_fp16`: `onnxruntime.transformers.float16.convert_float_to_float16`, fp32 inputs / outputs kept
  (the app's buffers and the KV cache stay fp32; casts sit at the graph edges).
- `to_ort_format`: `onnxruntime.tools.convert_onnx_models_to_ort` (fixed optimisations for ARM, a
  `required_operators_and_types.config` for a reduced-operator ORT Mobile build).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from mobilevlm.errors import ExportError

# Graphs above this size keep their weights in `<name>.data` (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_800_000_000


def _load(path: Path):
    import onnx

    return onnx.load(str(path))


def save_model(model, path: Path) -> None:
    """Save a ModelProto, with external data when large; stale `.data` files of `path` are removed first."""
    import onnx

    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    big = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True, location=data.name if big else None)


def graph_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def to_int4(path: Path, block_size: int, accuracy_level: int, symmetric: bool) -> int:
    """MatMulNBits on every constant-weight MatMul of the graph at `path`, in place; returns how many."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",), bits=4)
    return _weight_only(path, config, "MatMulNBits")


def embedding_to_nbits(path: Path, bits: int, block_size: int) -> int:
    """GatherBlockQuantized for the token table (blocks along the embedding width)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),), bits=bits)
    return _weight_only(path, config, "GatherBlockQuantized")


def _weight_only(path: Path, config, op_type: str) -> int:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(_load(path), algo_config=config)
    with _quiet():
        quantizer.process()
    model = quantizer.model.model
    count = sum(node.op_type == op_type for node in model.graph.node)
    if count == 0:
        raise ExportError(f"{path}: ONNX Runtime's weight-only quantizer found no node to turn into {op_type}")
    save_model(model, path)
    return count


def to_int8_dynamic(path: Path) -> int:
    """Dynamic int8 on every MatMul with a constant weight, in place; returns the MatMulInteger count."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name(path.stem + ".int8.onnx")
    with _quiet():
        quantize_dynamic(str(path), str(out), op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                         use_external_data_format=graph_bytes(path) > EXTERNAL_DATA_BYTES)
    model = _load(out)
    for stale in (out, out.with_name(out.name + ".data")):
        if stale.exists():
            stale.unlink()
    count = sum(node.op_type == "MatMulInteger" for node in model.graph.node)
    save_model(model, path)
    return count


def to_fp16(path: Path) -> None:
    """fp16 weights and compute, fp32 graph inputs and outputs, in place."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        model = convert_float_to_float16(_load(path), keep_io_types=True, disable_shape_infer=graph_bytes(path) > EXTERNAL_DATA_BYTES)
    save_model(model, path)


def to_ort_format(folder: Path, names: list[str]) -> Path:
    """Convert `folder/<name>.onnx` to `.ort` (then delete the .onnx) and write the operator config an
    ORT Mobile reduced build takes (`--include_ops_by_config`); returns the config's path."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    for name in names:
        if (folder / f"{name}.onnx.data").exists():
            raise ExportError(f"{folder / name}.onnx: weights over 2 GB cannot be stored in the .ort format; use a quantized recipe with -ort")
    with _quiet():
        convert_onnx_models_to_ort(folder, output_dir=folder, optimization_styles=[OptimizationStyle.Fixed], target_platform="arm", enable_type_reduction=True)
    for name in names:
        (folder / f"{name}.onnx").unlink()
    config = folder / "required_operators_and_types.config"
    if not config.is_file():
        raise ExportError(f"{folder}: ORT format conversion wrote no {config.name}")
    return config


@contextlib.contextmanager
def _quiet():
    """ORT's tools print progress to stdout; keep the CLI's output to our own lines."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
