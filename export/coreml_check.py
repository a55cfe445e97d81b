"""Run a saved Core ML program off macOS: a numpy interpreter of MIL, and the parity session built on it.

coremltools converts and saves `.mlpackage` folders on Linux but cannot run them (prediction needs
Core ML, which exists only on Apple platforms). An exporter that only converts is unverified, and
conversion is where things go wrong silently (a converter that tiles KV heads instead of repeating
them, a reciprocal turned into `1 / (x + 1e-4)`). So the saved program itself is read back with
coremltools' own protobuf loader and executed here, op by op, in numpy (`mil_ops.OPS` holds the op
semantics), then compared with the PyTorch reference like every other backend's artifact.

Two precisions:
- "fp32": every value is kept in float32 — the program's arithmetic, free of rounding, which must
  reproduce the reference almost exactly (a conversion bug shows up as a large error here);
- "fp16": every value whose MIL type is fp16 (activations, KV-cache states, fp16 inputs / outputs)
  is rounded to fp16 after each op, as a device storing fp16 activations does. Accumulation inside an
  op stays float32 (the ANE and GPU accumulate wider), so this models the storage error, not any one
  chip's exact rounding. Results from it are labelled "interpreted, not run on Apple hardware".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mobilevlm.errors import ExportError

from . import mil_constexpr  # noqa: F401  registers the constexpr ops in OPS
from .mil_ops import OPS

PRECISIONS = ("fp16", "fp32")
STATE_OPS = ("read_state", "coreml_update_state")
WEIGHTS_DIR = Path("Data/com.apple.CoreML/weights")
VERIFICATION_NOTE = "interpreted, not run on Apple hardware"


class UnsupportedOpError(ExportError):
    """The program uses a MIL op the interpreter has no semantics for."""


def load_program(package: str | Path):
    """The pymil Program of a saved .mlpackage (weights read from its weight blob)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    package = Path(package)
    if not (package / "Manifest.json").is_file():
        raise ExportError(f"{package}: not a Core ML package (Manifest.json missing)")
    spec = ct.utils.load_spec(str(package))
    if spec.WhichOneof("Type") != "mlProgram":
        raise ExportError(f"{package}: holds a {spec.WhichOneof('Type')} model, expected an ML program")
    return load(spec, spec.specificationVersion, file_weights_dir=str(package / WEIGHTS_DIR))


def _kind(var) -> Any:
    """How values of a MIL var are held: "fp16" / "fp32" (as float32), a numpy int / bool dtype, or None (strings)."""
    from coremltools.converters.mil.mil import types

    if types.is_str(var.dtype):
        return None
    if types.is_float(var.dtype):
        return "fp16" if var.dtype == types.fp16 else "fp32"
    return types.nptype_from_builtin(var.dtype)


@dataclass
class Step:
    """One op, resolved once at load: its function, where its inputs come from, how its outputs are held."""

    op_type: str
    name: str
    inputs: list[tuple[str, Any]]  # (parameter, var name or list of var names)
    outputs: list[tuple[str, Any]]  # (var name, kind)


class MILProgram:
    """One function of a saved Core ML program, executable in numpy, holding its state between calls.

    `predict(inputs)` runs the function once and returns its outputs by name; `reset_state()` zeroes
    the states (a new conversation's KV cache). Constants and the constexpr ops that decompress
    weights are evaluated once, when the program is loaded, as Core ML does.
    """

    def __init__(self, source, precision: str = "fp16", function: str = "main"):
        """`source`: a saved .mlpackage folder, or a pymil Program (unit tests build those directly)."""
        from coremltools.converters.mil.mil import types

        if precision not in PRECISIONS:
            raise ExportError(f"interpreter precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.precision = precision
        if isinstance(source, (str, Path)):
            self.path, self.program = Path(source), load_program(source)
        else:
            self.path, self.program = Path("<program>"), source
        if function not in self.program.functions:
            raise ExportError(f"{self.path}: no function {function!r} (has {', '.join(self.program.functions)})")
        self.function = self.program.functions[function]
        unknown = sorted({op.op_type for op in self.function.operations if op.op_type != "const" and op.op_type not in OPS and op.op_type not in STATE_OPS})
        if unknown:
            raise UnsupportedOpError(f"{self.path}: the MIL interpreter does not implement MIL op(s) {', '.join(unknown)}")
        self.inputs = {name: var for name, var in self.function.inputs.items() if not types.is_state(var.sym_type)}
        self.input_kinds = {name: _kind(var) for name, var in self.inputs.items()}
        self.state_shapes = {name: tuple(var.sym_type.wrapped_type().get_shape()) for name, var in self.function.inputs.items() if types.is_state(var.sym_type)}
        self.output_names = [var.name for var in self.function.outputs]
        self.constants: dict[str, Any] = {}
        self.steps: list[Step] = []
        for op in self.function.operations:
            if op.op_type == "const":
                var = op.outputs[0]
                self.constants[var.name] = self._hold(_kind(var), np.array(var.val) if isinstance(var.val, str) else var.val)
                continue
            inputs = [(k, [x.name for x in v] if isinstance(v, (list, tuple)) else v.name) for k, v in op.inputs.items()]
            step = Step(op.op_type, op.name, inputs, [(var.name, _kind(var)) for var in op.outputs])
            if op.op_type.startswith("constexpr_"):
                self._run(step, self.constants, {})
            else:
                self.steps.append(step)
        self.reset_state()

    @property
    def op_types(self) -> list[str]:
        return [op.op_type for op in self.function.operations]

    def reset_state(self) -> None:
        self.states = {name: np.zeros(shape, np.float32) for name, shape in self.state_shapes.items()}

    def _hold(self, kind: Any, value: Any) -> Any:
        """A value as its MIL var's type says: float32 (fp16-rounded in fp16 mode), or its int / bool type."""
        if kind is None:
            return np.asarray(value)
        if kind == "fp16" and self.precision == "fp16":
            return np.asarray(value, dtype=np.float16).astype(np.float32)
        if kind in ("fp16", "fp32"):
            return np.asarray(value, dtype=np.float32)
        return np.asarray(value).astype(kind, copy=False)

    def _run(self, step: Step, env: dict[str, Any], states: dict[str, np.ndarray]) -> None:
        args = {k: [env[n] for n in v] if isinstance(v, list) else env[v] for k, v in step.inputs}
        if step.op_type == "read_state":
            result = states[args["input"]].copy()
        elif step.op_type == "coreml_update_state":
            result = args["value"]
            states[args["state"]] = self._hold(step.outputs[0][1], result)
        else:
            try:
                result = OPS[step.op_type](**args)
            except TypeError as exc:
                raise UnsupportedOpError(f"{self.path}: MIL op {step.op_type} ({step.name}) has inputs {sorted(args)} the interpreter does not read ({exc})") from None
        results = result if isinstance(result, tuple) else (result,)
        for (name, kind), value in zip(step.outputs, results):
            env[name] = self._hold(kind, value)

    def predict(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run the function on `inputs` (numpy arrays by input name); the states carry over."""
        env = dict(self.constants)
        for name, var in self.inputs.items():
            if name not in inputs:
                raise ExportError(f"{self.path}: missing input {name!r} (inputs: {', '.join(self.inputs)})")
            value = np.asarray(inputs[name])
            expected = var.shape
            if value.ndim != len(expected) or any(isinstance(e, (int, np.integer)) and e != v for e, v in zip(expected, value.shape)):
                raise ExportError(f"{self.path}: input {name!r} has shape {list(value.shape)}, expected {list(expected)}")
            env[name] = self._hold(self.input_kinds[name], value)
        for name in self.state_shapes:
            env[name] = name  # read_state / coreml_update_state look the state up by name
        for step in self.steps:
            self._run(step, env, self.states)
        return {name: env[name] for name in self.output_names}


def causal_mask(start: int, length: int) -> np.ndarray:
    """[1, 1, length, start + length]: 0 where row i may attend (columns 0..start+i), -inf elsewhere."""
    rows = np.arange(start, start + length)[:, None]
    cols = np.arange(start + length)[None, :]
    return np.where(cols <= rows, 0.0, -np.inf).astype(np.float16)[None, None]


class CoreMLSession:
    """A Core ML artifact of a bundle, driven from the manifest alone as an iOS app drives it, with
    the three programs executed by the MIL interpreter (see `export/parity.py`'s ArtifactSession)."""

    def __init__(self, root: Path, artifact: dict, manifest: dict, precision: str = "fp16"):
        from mobilevlm.processing import ImageProcessor, Tokenizer

        self.folder = Path(root) / artifact["file"]
        self.prompt = manifest["prompt"]
        self.image_processor = ImageProcessor.from_spec(manifest["preprocessing"])  # tiles when the manifest says so
        self.tokenizer = Tokenizer(Path(root) / manifest["tokenizer"]["file"])
        models = artifact["methods"]
        self.vision = MILProgram(self.folder / models["vision"]["file"], precision)
        self.embedding = MILProgram(self.folder / models["embedding"]["file"], precision)
        self.decoder = MILProgram(self.folder / models["decoder"]["file"], precision)
        # the decoder's interface input, if any: "image_features" (cross-attention) or "image_mask" (visual expert)
        self.image_input = next((i["name"] for i in models["decoder"]["inputs"] if i["name"] in ("image_features", "image_mask")), None)
        self.features: np.ndarray | None = None

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """[1, N, D]: the vision program once per view (one view unless the manifest tiles), joined."""
        # Core ML hands an RGB ImageType input to the program as float pixels 0..255 ([1, 3, S, S]).
        views = self.image_processor.prepare_views(image).numpy().astype(np.float32)
        return np.concatenate([self.vision.predict({"image": view[None]})["image_embeddings"] for view in views], axis=1)

    def embed(self, ids: list[int]) -> np.ndarray:
        return self.embedding.predict({"input_ids": np.array([ids], dtype=np.int32)})["embeddings"]

    def check_length(self, prompt: str) -> list[int]:
        from .parity import ids_after_image

        return ids_after_image(self.prompt, self.tokenizer, prompt, self.folder.name)

    def decode(self, embeds: np.ndarray, start: int, image_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits [V] after `embeds` [1, T, D] written at positions start..start+T-1 (the visual
        expert's `image_mask` [1, T] defaults to text positions)."""
        inputs = {"inputs_embeds": embeds, "causal_mask": causal_mask(start, embeds.shape[1])}
        if self.image_input == "image_features":
            inputs["image_features"] = self.features
        elif self.image_input == "image_mask":
            inputs["image_mask"] = image_mask if image_mask is not None else np.zeros(embeds.shape[:2], np.float16)
        return self.decoder.predict(inputs)["logits"][0]

    def prefill(self, image: Image.Image, prompt: str) -> tuple[np.ndarray, int]:
        after = self.check_length(prompt)
        self.decoder.reset_state()
        before, features = self.embed(self.prompt["before_image_ids"]), self.image_embeddings(image)
        if self.image_input == "image_features":  # beside the sequence, for every call
            self.features = features
            embeds = np.concatenate([before, self.embed(after)], axis=1)
            return self.decode(embeds, 0), embeds.shape[1]
        embeds = np.concatenate([before, features, self.embed(after)], axis=1)
        mask = np.zeros(embeds.shape[:2], np.float16)
        mask[:, before.shape[1]:before.shape[1] + features.shape[1]] = 1.0
        return self.decode(embeds, 0, mask), embeds.shape[1]

    def answer(self, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
        """Greedy answer, stopping at EOS, a stop string, the token budget or the end of the cache."""
        logits, pos = self.prefill(image, prompt)
        eos = set(self.prompt["eos_ids"])
        tokens: list[int] = []
        budget = min(max_new_tokens, self.prompt["context_length"] - pos)
        for step in range(budget):
            token = int(np.argmax(logits))
            if token in eos:
                break
            tokens.append(token)
            if step + 1 < budget:
                logits = self.decode(self.embed([token]), pos)
                pos += 1
        text = self.tokenizer.decode(tokens)
        for stop in self.prompt["stop_strings"]:
            text = text.split(stop)[0]
        return text

    def forced_logits(self, image: Image.Image, prompt: str, tokens: list[int]) -> list:
        import torch

        logits, pos = self.prefill(image, prompt)
        out = [torch.from_numpy(logits.astype(np.float32))]
        for token in tokens:
            out.append(torch.from_numpy(self.decode(self.embed([token]), pos).astype(np.float32)))
            pos += 1
        return out
