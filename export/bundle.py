"""The bundle: the folder `mobilevlm export` writes, and the only thing apps and benchmarks read.

    BUNDLE/manifest.json          everything an app needs to drive the artifacts without our Python
    BUNDLE/tokenizer.json         the tokenizer (+ tokenizer_config.json naming BOS / EOS for runtimes)
    BUNDLE/<artifacts>            .pte / .onnx / .mlpackage / .gguf files
    BUNDLE/parity/case-NN.png     the images of the parity cases

The manifest records a SHA-256 for every file; `load_bundle` checks the format version, that every
path stays inside the bundle, that every file exists and (by default) that its checksum matches. A
bundle is built in a temporary sibling folder and renamed into place, so a failed export leaves
nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mobilevlm.errors import BundleError
from mobilevlm.fileio import read_json
from mobilevlm.model import MobileVLM
from mobilevlm.processing import Processor

MANIFEST = "manifest.json"
FORMAT = "mobilevlm-bundle"
FORMAT_VERSION = 1


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit() -> str | None:
    """The toolkit's git commit, when it runs from a checkout (recorded in manifests and results)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("mobilevlm", "torch", "executorch", "torchao", "onnx", "onnxruntime", "coremltools", "gguf", "llama_cpp_python"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def preprocessing_spec(processor: Processor, tokens_per_view: int | None = None) -> dict:
    image = processor.image
    spec = {
        "image_size": image.size,
        "aspect_mode": image.aspect_mode,
        "pad_color": list(image.pad_color),
        "resize": "bicubic",
        "channel_order": "RGB",
        "mean": list(image.mean),
        "std": list(image.std),
        "steps": [
            "decode the image, apply its EXIF orientation, convert to RGB (transparency composited over white)",
            {
                "pad": "pad to a square of side max(width, height) filled with pad_color, the image at offset ((side - width) // 2, (side - height) // 2)",
                "crop": "resize the short side to image_size (bicubic), crop the centre square",
                "resize": "no padding (the image is stretched to a square)",
            }[image.aspect_mode],
            "resize to image_size x image_size, bicubic (PIL Image.BICUBIC)",
            "hand the artifact uint8 RGB pixels as the artifact's inputs say; normalisation (x / 255 - mean) / std happens inside the vision graph",
        ],
    }
    if image.grids:
        spec["tiling"] = {
            "grids": [list(g) for g in image.grids],
            "tile_size": image.size,
            "views": "the global view (the image prepared by `steps`) first, then the tiles of the chosen grid, row-major",
            "choose_grid": "for each (rows, cols): scale = min(cols * tile_size / width, rows * tile_size / height); "
            "kept = min(width * height * scale^2, width * height); pick the largest kept, then the smallest rows * cols * tile_size^2 - kept",
            "tiles": "resize the image by scale (bicubic, rounded sides), paste it centred on a (cols * tile_size) x (rows * tile_size) "
            "canvas of pad_color, cut it into tile_size squares",
            "image_tokens": "(1 + rows * cols) * tokens_per_view, the separators included",
            "tokens_per_view": tokens_per_view,
        }
    return spec


def prompt_spec(processor: Processor, context_length: int, num_image_tokens: int) -> dict:
    tok, template = processor.tokenizer, processor.template
    before, after = template.split("{prompt}")
    return {
        "template": template.name,
        "text": template.text,
        "before_image": before,
        "after_image": after,
        "prompt_slot": "{prompt}",
        "add_bos": template.add_bos,
        "bos_id": tok.bos_id,
        "eos_ids": [tok.eos_id],
        "pad_id": tok.pad_id,
        "stop_strings": list(template.stop),
        "before_image_ids": tok.encode(before, add_bos=template.add_bos),
        "image_tokens": num_image_tokens,
        "context_length": context_length,
        "how_to_run": "tokens of before_image (BOS first), then the image, then the tokens of after_image with {prompt} replaced by the question; generate until an EOS id or a stop string",
    }


@dataclass
class Bundle:
    root: Path
    manifest: dict

    def path(self, relative: str) -> Path:
        return resolve_inside(self.root, relative)

    def artifacts(self, backend: str | None = None) -> Iterator[dict]:
        for artifact in self.manifest["artifacts"]:
            if backend is None or artifact["backend"] == backend:
                yield artifact

    def artifact(self, name: str) -> dict:
        for artifact in self.manifest["artifacts"]:
            if artifact["name"] == name:
                return artifact
        raise BundleError(f"{self.root / MANIFEST}: no artifact named {name!r} (has {', '.join(a['name'] for a in self.manifest['artifacts'])})")


def resolve_inside(root: Path, relative: Any) -> Path:
    """`root / relative`, refusing absolute paths and any path that leaves the bundle folder."""
    if not isinstance(relative, str) or not relative or "\x00" in relative or Path(relative).is_absolute():
        raise BundleError(f"{root / MANIFEST}: file path {relative!r} must be a relative path inside the bundle")
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BundleError(f"{root / MANIFEST}: file path {relative!r} escapes the bundle folder")
    return path


def new_manifest(model: MobileVLM, processor: Processor, source: str, context_length: int) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "toolkit": {"git_commit": git_commit(), "versions": versions()},
        "model": {"source": source, "parameters": model.num_parameters(), "config": model.config.to_dict()},
        "preprocessing": preprocessing_spec(processor, model.config.tokens_per_view + 1),
        "prompt": prompt_spec(processor, context_length, model.config.num_image_tokens),
        "tokenizer": {"file": "tokenizer.json", "config_file": "tokenizer_config.json", "vocab_size": processor.tokenizer.vocab_size},
        "artifacts": [],
        "parity": {"cases": []},
        "files": {},
    }


def write_tokenizer(folder: Path, processor: Processor) -> None:
    """tokenizer.json, and tokenizer_config.json naming the special tokens (ExecuTorch's tokenizer
    loader reads BOS / EOS from it when given the bundle folder)."""
    import shutil

    shutil.copyfile(processor.tokenizer.path, folder / "tokenizer.json")
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": processor.template.add_bos}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def finalize_manifest(folder: Path, manifest: dict) -> None:
    """Record size and SHA-256 of every file, then write manifest.json (last)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    manifest["files"] = files
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and validate a bundle; every problem is a `BundleError` naming the file and field."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle folder")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing (not a bundle written by mobilevlm export)")
    manifest = read_json(manifest_path, BundleError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: field 'format' must be {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{manifest_path}: field 'format_version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{manifest_path}: format_version {version} is newer than this toolkit reads ({FORMAT_VERSION}); upgrade mobilevlm")
    for field in ("model", "preprocessing", "prompt", "tokenizer", "artifacts", "files"):
        if field not in manifest:
            raise BundleError(f"{manifest_path}: missing field {field!r}")
    if not isinstance(manifest["files"], dict) or not isinstance(manifest["artifacts"], list):
        raise BundleError(f"{manifest_path}: fields 'files' (object) and 'artifacts' (list) have the wrong type")
    check_files(root, manifest["files"], verify)
    for index, artifact in enumerate(manifest["artifacts"]):
        if not isinstance(artifact, dict) or "file" not in artifact or "backend" not in artifact:
            raise BundleError(f"{manifest_path}: artifacts[{index}] needs 'backend' and 'file'")
        file = _checked_reference(root, manifest["files"], f"artifacts[{index}].file", artifact["file"])
        if not file.exists():
            raise BundleError(f"{file}: artifact file missing")
    for field, relative in _other_references(manifest_path, manifest):
        _checked_reference(root, manifest["files"], field, relative)
    return Bundle(root, manifest)


def check_files(root: Path, files: dict, verify: bool = True) -> None:
    """Every file a manifest lists exists inside the bundle and (with `verify`) matches its SHA-256."""
    for relative, info in files.items():
        file = resolve_inside(root, relative)
        if not file.is_file():
            raise BundleError(f"{root / MANIFEST}: listed file {relative!r} is missing from the bundle")
        if verify and (not isinstance(info, dict) or sha256(file) != info.get("sha256")):
            raise BundleError(f"{root / relative}: SHA-256 does not match the manifest (file changed or corrupt)")


def _checked_reference(root: Path, files: dict, field: str, relative: Any) -> Path:
    """A path the manifest points a reader at: inside the bundle, and covered by a checksum (a file
    listed under 'files', or a folder artifact such as .mlpackage whose every file is listed), so
    nothing a runtime reads escapes verification."""
    if not isinstance(relative, str) or not relative or "\x00" in relative or Path(relative).is_absolute():
        raise BundleError(f"{root / MANIFEST}: {field} {relative!r} must be a relative path inside the bundle")
    try:
        path = resolve_inside(root, relative)
    except BundleError:
        raise BundleError(f"{root / MANIFEST}: {field} {relative!r} escapes the bundle folder") from None
    prefix = relative.rstrip("/") + "/"
    if relative not in files and not any(k.startswith(prefix) for k in files):
        raise BundleError(f"{root / MANIFEST}: {field} {relative!r} is not listed under 'files' (every file a bundle uses needs a SHA-256)")
    return path


def _other_references(manifest_path: Path, manifest: dict) -> Iterator[tuple[str, Any]]:
    """(field, path) of the tokenizer files and parity images the manifest names."""
    tokenizer = manifest["tokenizer"]
    if not isinstance(tokenizer, dict):
        raise BundleError(f"{manifest_path}: field 'tokenizer' must be an object, got {type(tokenizer).__name__}")
    for key in ("file", "config_file"):
        if key in tokenizer:
            yield f"tokenizer.{key}", tokenizer[key]
    cases = manifest.get("parity", {}).get("cases", []) if isinstance(manifest.get("parity"), dict) else []
    for index, case in enumerate(cases if isinstance(cases, list) else []):
        if isinstance(case, dict) and "image" in case:
            yield f"parity.cases[{index}].image", case["image"]
