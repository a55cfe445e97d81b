"""`mobilevlm export`: checkpoint -> quantize -> lower -> verify in the runtime -> bundle.

One short linear function. Everything is checked before the expensive work starts (the model loads,
the recipes parse, the output folder is free), the bundle is built in a temporary folder, and an
export whose fp32 artifact does not reproduce the reference answers fails and leaves nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mobilevlm.checkpoint import load_model, load_processor
from mobilevlm.errors import ExportError
from mobilevlm.fileio import OutputError, atomic_folder

from .bundle import finalize_manifest, new_manifest, write_tokenizer
from .parity import compare, parity_cases


@dataclass
class ExportReport:
    """What a backend's export returns: the artifact (file or folder), how long it took, its size,
    each method / graph's inputs and outputs (the manifest's `methods`) and backend facts (`metadata`)."""

    path: Path
    seconds: float
    size_bytes: int
    methods: dict
    metadata: dict


@dataclass(frozen=True)
class Backend:
    """What the pipeline needs from a backend module (each module's `backend()` returns one)."""

    name: str
    suffix: str
    parse_recipe: Callable[[str], object]  # recipe name -> recipe with `.name` and `.describe()`
    export: Callable  # (model, processor, recipe, path, context_length) -> ExportReport
    session: Callable  # (bundle root, artifact entry, manifest) -> ArtifactSession (see parity.py)
    runtime: str  # the runtime that runs the artifact, as recorded in the manifest
    # Recipes whose answers must equal the reference's: the export fails otherwise. Backends whose
    # runtime is known to compute differently (llama.cpp, see export/gguf.py) name none.
    exact_recipes: tuple[str, ...] = ("fp32",)
    # Model-family features (see `model_features`) this backend cannot carry; asking is an ExportError
    # before any work, naming the feature.
    unsupported: tuple[str, ...] = ()

    def check_supports(self, config) -> None:
        missing = [f for f in model_features(config) if f in self.unsupported or f.split(":")[0] in self.unsupported]
        if missing:
            raise ExportError(
                f"backend {self.name!r} cannot export this model: {', '.join(missing)} "
                f"(the executorch backend carries every model family)"
            )


def model_features(config) -> list[str]:
    """The model-family choices of a config beyond the MobileVLM baseline, as `kind:value` names."""
    features = []
    if config.vision.type != "clip_vit":
        features.append(f"vision:{config.vision.type}")
    if config.projector.type not in ("mlp2x_gelu", "ldp", "ldpv2"):
        features.append(f"projector:{config.projector.type}")
    if config.resolution != "direct":
        features.append(f"resolution:{config.resolution}")
    if config.interface != "token":
        features.append(f"interface:{config.interface}")
    if config.text.num_experts:
        features.append("decoder:moe")
    return features


# Backend name -> module exposing `backend()`; imported only when asked for.
BACKENDS: dict[str, str] = {
    "executorch": "mobilevlm.export.executorch",
    "onnx": "mobilevlm.export.onnx",
    "coreml": "mobilevlm.export.coreml",
    "gguf": "mobilevlm.export.gguf",
    "hf": "mobilevlm.export.hf",
}


def get_backend(name: str) -> Backend:
    import importlib

    if name not in BACKENDS:
        raise ExportError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    entry = BACKENDS[name]
    if callable(entry):
        return entry()
    try:
        module = importlib.import_module(entry)
    except ModuleNotFoundError as exc:
        raise ExportError(f"backend {name!r} is not available: {exc.name} is not installed (see the README's extras)") from None
    return module.backend()


def default_model_dir() -> Path:
    """The reference model shipped inside the package (trained by `mobilevlm train --recipe tiny`)."""
    return Path(__file__).resolve().parent.parent / "mobilevlm" / "reference_model"


def export_bundle(
    out: Path,
    backend: str = "executorch",
    recipes: tuple[str, ...] = ("fp32",),
    model_dir: Path | None = None,
    force: bool = False,
    context_length: int | None = None,
    num_parity_cases: int = 8,
    eval_scenes: int = 20,
    eval_seed: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    out = Path(out)
    chosen = get_backend(backend)
    parsed = [chosen.parse_recipe(r) for r in recipes]
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (pass --force to replace it)")
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    model, processor = load_model(model_dir), load_processor(model_dir)
    chosen.check_supports(model.config)
    if processor.tokenizer.vocab_size != model.config.text.vocab_size:
        raise ExportError(
            f"{model_dir}: the tokenizer has {processor.tokenizer.vocab_size} tokens but the model {model.config.text.vocab_size} outputs; "
            "runtimes sample over the tokenizer's ids only, so they must agree (pad the tokenizer with mobilevlm.data.tokenizer.pad_vocabulary)"
        )
    context = context_length or model.config.text.max_seq_len
    cases = parity_cases(num_parity_cases)
    with atomic_folder(out, overwrite=force) as tmp:
        manifest = new_manifest(model, processor, str(model_dir), context)
        write_tokenizer(tmp, processor)
        (tmp / "parity").mkdir()
        for case in cases:
            case.image().save(tmp / "parity" / f"{case.id}.png")
        manifest["parity"]["cases"] = [{"id": c.id, "image": f"parity/{c.id}.png", "question": c.question, "max_new_tokens": c.max_new_tokens, "scene_seed": c.seed} for c in cases]
        reference_eval = None
        for recipe in parsed:
            file = f"model-{recipe.name}{chosen.suffix}"
            log(f"{backend} {recipe.name}: exporting {model_dir} ...")
            report = chosen.export(model, processor, recipe, tmp / file, context)
            artifact = {
                "name": f"{backend}-{recipe.name}",
                "backend": backend,
                "file": file,
                "runtime": chosen.runtime,
                "quantization": recipe.describe(),
                "size_bytes": report.size_bytes,
                "export_seconds": round(report.seconds, 1),
                "methods": report.methods,
                "metadata": report.metadata,
            }
            log(f"{backend} {recipe.name}: {report.size_bytes / 1e6:.1f} MB in {report.seconds:.0f} s; checking parity in the runtime ...")
            session = chosen.session(tmp, artifact, manifest)
            if eval_scenes and reference_eval is None:
                from mobilevlm.evaluate import ReferenceAnswerer, evaluate

                reference_eval = evaluate(ReferenceAnswerer(model, processor), eval_seed, eval_scenes, progress=False)
            started = time.time()
            parity = compare(session, model, processor, cases, eval_scenes, eval_seed, reference_eval)
            parity["seconds"] = round(time.time() - started, 1)
            artifact["parity"] = parity
            manifest["artifacts"].append(artifact)
            log(_parity_line(artifact))
            if recipe.name in chosen.exact_recipes and parity["answers_identical"] != parity["num_cases"]:
                bad = next(r for r in parity["cases"] if not r["match"])
                raise ExportError(
                    f"{backend} {recipe.name} parity is broken: {parity['answers_identical']}/{parity['num_cases']} answers equal the reference "
                    f"(first difference, {bad['case']}: reference {bad['reference']!r}, artifact {bad['artifact']!r}); no bundle written"
                )
        finalize_manifest(tmp, manifest)
    log(f"wrote {out}")
    return out


def _parity_line(artifact: dict) -> str:
    p = artifact["parity"]
    line = f"{artifact['name']}: {p['answers_identical']}/{p['num_cases']} answers identical, token agreement {100 * p['token_agreement']:.1f}%, first-token logit error {p['first_logit_max_abs_error']:.2e}"
    if "task" in p:
        line += f", accuracy {100 * p['task']['artifact']['closed_ended_accuracy']:.1f}% (reference {100 * p['task']['reference']['closed_ended_accuracy']:.1f}%)"
    return line


def open_session(bundle_dir: Path, artifact_name: str | None = None):
    """An artifact of a bundle, ready to answer, as an app would run it: (session, artifact entry)."""
    from .bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    if not bundle.manifest["artifacts"]:
        raise ExportError(f"{bundle.root}: the bundle has no artifacts")
    artifact = bundle.artifact(artifact_name) if artifact_name else bundle.manifest["artifacts"][0]
    return get_backend(artifact["backend"]).session(bundle.root, artifact, bundle.manifest), artifact
