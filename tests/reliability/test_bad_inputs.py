"""The catalogue of bad inputs: every entry is a file (or argument) a user could hand the toolkit,
built here in a temporary folder, and run through the real `mobilevlm` command in a subprocess.

A bad input must end the command with a non-zero status and exactly one line on stderr that names
the file, the field and what was expected, never a Python traceback. A few entries are awkward but
valid inputs (16-bit, CMYK, palette with transparency, EXIF-rotated images; an opted-in weights-only
pickle): those must work. The table is long on purpose: its length is the count the README quotes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


# --- the harness ---------------------------------------------------------------------------------


@dataclass
class Env:
    """What a case builder may use: a private temporary folder and the shared micro fixtures."""

    tmp: Path
    checkpoint: Path
    tokenizer: Path
    image: Path

    def copy_checkpoint(self, name: str = "ckpt") -> Path:
        """A private copy of the micro checkpoint that a case may damage."""
        return Path(shutil.copytree(self.checkpoint, self.tmp / name))

    def generate(self, model: Path | None = None, image: Path | None = None, prompt: str | bytes = "What color?", *extra: str) -> list:
        return ["generate", "--model", model or self.checkpoint, "--image", image or self.image, "--prompt", prompt, "--max-new-tokens", "2", "--threads", "1", *extra]


@dataclass
class Run:
    """The command line a case runs, and the fragments its one-line error must contain."""

    args: list
    expect: tuple[str, ...] = ()
    setup_child: Callable[[], None] | None = None


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Env], Run]
    works: bool = False  # a valid input that must be accepted (exit 0)


def run_cli(run: Run, debug: bool = False) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter, one torch thread, as a user would start it."""
    args = [os.fsencode(str(a)) if not isinstance(a, bytes) else a for a in run.args]
    if debug:
        args.insert(0, b"--debug")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "mobilevlm.cli", *args], capture_output=True, cwd=ROOT, env=env, timeout=240, preexec_fn=run.setup_child
    )


# --- images --------------------------------------------------------------------------------------


def png_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def noise(width: int = 48, height: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int) -> bytes:
    """A valid-looking PNG of `side` x `side` grey pixels in a few hundred bytes: its IHDR claims the
    size, its one IDAT holds the first rows only. Decoding it whole would need side^2 bytes."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    rows = zlib.compress(b"\x00" * (side + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def image_case(data: Callable[[], bytes], suffix: str, *expect: str) -> Callable[[Env], Run]:
    def build(env: Env) -> Run:
        path = env.tmp / f"input{suffix}"
        path.write_bytes(data())
        return Run(env.generate(image=path), (path.name, *expect))

    return build


def sixteen_bit_png() -> bytes:
    array = np.linspace(0, 65535, 48 * 40).reshape(40, 48).astype(np.uint16)
    return png_bytes(Image.fromarray(array))


def cmyk_jpeg() -> bytes:
    return jpeg_bytes(noise().convert("CMYK"))


def palette_with_transparency() -> bytes:
    image = noise().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return png_bytes(image, transparency=0)


def exif_rotated_jpeg() -> bytes:
    image = noise(60, 20)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return jpeg_bytes(image, exif=exif)


def image_folder(env: Env) -> Run:
    folder = env.tmp / "picture.png"
    folder.mkdir()
    return Run(env.generate(image=folder), ("picture.png", "is a folder", "image file"))


def image_missing(env: Env) -> Run:
    return Run(env.generate(image=env.tmp / "nowhere.png"), ("nowhere.png", "no such image file"))


IMAGES = [
    Case("image-truncated-png", image_case(lambda: png_bytes(noise())[:300], ".png", "corrupt or truncated")),
    Case("image-truncated-jpeg", image_case(lambda: jpeg_bytes(noise())[:400], ".jpg", "corrupt or truncated")),
    Case("image-zero-bytes", image_case(lambda: b"", ".png", "empty (0 bytes)", "expected an image")),
    Case("image-text-named-png", image_case(lambda: b"this is not an image\n" * 10, ".png", "not a decodable image")),
    Case("image-1x100000", image_case(lambda: png_bytes(Image.new("L", (1, 100000))), ".png", "1x100000", "aspect ratio")),
    Case("image-decompression-bomb", image_case(lambda: bomb_png(30000), ".png", "900000000 pixels", "more than the 64,000,000")),
    Case("image-bomb-just-over-limit", image_case(lambda: bomb_png(8001), ".png", "8001x8001", "more than the 64,000,000")),
    Case("image-is-a-folder", image_folder),
    Case("image-missing", image_missing),
    Case("image-16-bit-png", image_case(sixteen_bit_png, ".png"), works=True),
    Case("image-cmyk-jpeg", image_case(cmyk_jpeg, ".jpg"), works=True),
    Case("image-palette-with-transparency", image_case(palette_with_transparency, ".png"), works=True),
    Case("image-exif-rotated", image_case(exif_rotated_jpeg, ".jpg"), works=True),
]


# --- checkpoints ---------------------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header, data) of a safetensors file: 8-byte little-endian header length, JSON header, data."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def edit_weights(edit: Callable[[dict[str, torch.Tensor]], None], *expect: str) -> Callable[[Env], Run]:
    """A checkpoint whose tensors went through `edit` (saved with safetensors, so the file is valid)."""
    from safetensors.torch import load_file, save_file

    def build(env: Env) -> Run:
        folder = env.copy_checkpoint()
        weights = load_file(str(folder / "model.safetensors"))
        edit(weights)
        save_file(weights, str(folder / "model.safetensors"))
        return Run(env.generate(model=folder), ("model.safetensors" if "model.safetensors" in expect else str(folder.name), *expect))

    return build


def poison(value: float) -> Callable[[dict], None]:
    def edit(weights: dict) -> None:
        weights["text.norm.weight"][3] = value

    return edit


def truncated_safetensors(env: Env) -> Run:
    folder = env.copy_checkpoint()
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return Run(env.generate(model=folder), ("model.safetensors", "corrupt or truncated safetensors"))


def lying_offsets(env: Env) -> Run:
    """The header says a tensor's data runs past the end of the file."""
    folder = env.copy_checkpoint()
    path = folder / "model.safetensors"
    header, data = read_safetensors(path)
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start + len(data), end + len(data)]
    write_safetensors(path, header, data)
    return Run(env.generate(model=folder), ("model.safetensors", "corrupt or truncated safetensors"))


def huge_header_length(env: Env) -> Run:
    """The first 8 bytes claim an exabyte-long header."""
    folder = env.copy_checkpoint()
    path = folder / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 60) + path.read_bytes()[8:])
    return Run(env.generate(model=folder), ("model.safetensors", "corrupt or truncated safetensors"))


class Exploit:
    """Unpickling this calls os.system: what a hostile .bin does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_refused(env: Env) -> Run:
    folder = env.copy_checkpoint()
    weights = torch.load(io.BytesIO(_state_bytes(folder)), weights_only=True)
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    return Run(env.generate(model=folder), (folder.name, "pytorch_model.bin", "pickle", "--allow-pickle"))


def pickle_exploit_with_opt_in(env: Env) -> Run:
    """Even with --allow-pickle, a pickle that would run code is refused by weights_only; the test
    also checks that the marker file the code would create does not exist."""
    folder = env.copy_checkpoint()
    (folder / "model.safetensors").unlink()
    marker = env.tmp / "pwned"
    with open(folder / "model.pt", "wb") as handle:
        pickle.dump({"text.norm.weight": Exploit(marker)}, handle)
    return Run(env.generate(model=folder) + ["--allow-pickle"], ("model.pt", "weights-only"))


def pickle_with_opt_in_works(env: Env) -> Run:
    folder = env.copy_checkpoint()
    weights = torch.load(io.BytesIO(_state_bytes(folder)), weights_only=True)
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    return Run(env.generate(model=folder) + ["--allow-pickle"])


def _state_bytes(folder: Path) -> bytes:
    from safetensors.torch import load_file

    buffer = io.BytesIO()
    torch.save(load_file(str(folder / "model.safetensors")), buffer)
    return buffer.getvalue()


def no_weights(env: Env) -> Run:
    folder = env.copy_checkpoint()
    (folder / "model.safetensors").unlink()
    return Run(env.generate(model=folder), (folder.name, "no weight files", "model.safetensors"))


def missing_folder(env: Env) -> Run:
    return Run(env.generate(model=env.tmp / "no-model"), ("no-model", "no such checkpoint folder"))


def rename_tensor(weights: dict) -> None:
    weights["text.extra.weight"] = weights.pop("text.norm.weight")


CHECKPOINTS = [
    Case("checkpoint-truncated-safetensors", truncated_safetensors),
    Case("checkpoint-header-lies-about-offsets", lying_offsets),
    Case("checkpoint-header-length-absurd", huge_header_length),
    Case("checkpoint-nan-weight", edit_weights(poison(float("nan")), "model.safetensors", "text.norm.weight", "NaN or Inf", "expected finite")),
    Case("checkpoint-inf-weight", edit_weights(poison(float("inf")), "model.safetensors", "text.norm.weight", "NaN or Inf", "expected finite")),
    Case("checkpoint-missing-tensor", edit_weights(lambda w: w.pop("text.norm.weight"), "missing: text.norm.weight")),
    Case("checkpoint-extra-tensor", edit_weights(lambda w: w.update({"text.bonus": torch.ones(2)}), "unexpected: text.bonus")),
    Case("checkpoint-renamed-tensor", edit_weights(rename_tensor, "missing: text.norm.weight", "unexpected: text.extra.weight")),
    Case("checkpoint-wrong-shape", edit_weights(lambda w: w.update({"text.norm.weight": torch.ones(65)}), "text.norm.weight: file (65,) vs model (64,)")),
    Case("checkpoint-wrong-dtype", edit_weights(lambda w: w.update({"text.norm.weight": torch.ones(64, dtype=torch.int32)}), "model.safetensors", "text.norm.weight", "torch.int32", "expected a floating-point")),
    Case("checkpoint-pickle-refused-without-opt-in", pickle_refused),
    Case("checkpoint-pickle-exploit-refused-with-opt-in", pickle_exploit_with_opt_in),
    Case("checkpoint-pickle-weights-only-with-opt-in", pickle_with_opt_in_works, works=True),
    Case("checkpoint-no-weight-file", no_weights),
    Case("checkpoint-folder-missing", missing_folder),
]


# --- configs -------------------------------------------------------------------------------------


def edit_config(edit: Callable[[dict], object], *expect: str) -> Callable[[Env], Run]:
    """A checkpoint whose config.json went through `edit` (which may return a replacement)."""

    def build(env: Env) -> Run:
        folder = env.copy_checkpoint()
        data = json.loads((folder / "config.json").read_text())
        replaced = edit(data)
        (folder / "config.json").write_text(json.dumps(data if replaced is None else replaced))
        return Run(env.generate(model=folder), ("config.json", *expect))

    return build


def set_text(field: str, value: object) -> Callable[[dict], None]:
    return lambda data: data["model"]["text"].__setitem__(field, value)


def config_missing(env: Env) -> Run:
    folder = env.copy_checkpoint()
    (folder / "config.json").unlink()
    return Run(env.generate(model=folder), ("config.json", "missing", "needs config.json"))


def config_not_json(env: Env) -> Run:
    folder = env.copy_checkpoint()
    (folder / "config.json").write_bytes(b'{"format": "mobilevlm", \xff')
    return Run(env.generate(model=folder), ("config.json", "not valid JSON"))


CONFIGS = [
    Case("config-missing", config_missing),
    Case("config-not-json", config_not_json),
    Case("config-not-an-object", edit_config(lambda d: [d], "expected a JSON object")),
    Case("config-missing-field", edit_config(lambda d: d["model"]["text"].pop("hidden_size") and None, "model: text", "missing field 'hidden_size'", "expected int")),
    Case("config-missing-section", edit_config(lambda d: d["model"].pop("vision") and None, "missing field 'vision'")),
    Case("config-wrong-type-string", edit_config(set_text("num_layers", "2"), "text.num_layers", "expected an integer", "'2'")),
    Case("config-wrong-type-bool", edit_config(set_text("vocab_size", True), "text.vocab_size", "expected an integer")),
    Case("config-wrong-type-float-nan", edit_config(set_text("rope_theta", float("nan")), "text.rope_theta", "expected a finite number")),
    Case("config-negative-size", edit_config(set_text("hidden_size", -64), "text.hidden_size must be positive")),
    Case("config-unknown-field", edit_config(set_text("flash", True), "unknown field(s) 'flash'")),
    Case("config-terabytes-of-parameters", edit_config(set_text("vocab_size", 4_000_000_000_000), "parameters", "more than the 100,000,000,000")),
    Case("config-terabytes-of-layers", edit_config(set_text("num_layers", 10**9), "parameters", "more than the 100,000,000,000")),
    Case("config-terabytes-of-context", edit_config(set_text("max_seq_len", 2**40), "text.max_seq_len", "bytes")),
    Case("config-future-format-version", edit_config(lambda d: d.__setitem__("format_version", 99), "format_version 99", "reads 1")),
    Case("config-neither-format", edit_config(lambda d: {"hello": 1}, "no 'format' field", "mm_projector_type")),
]


# --- tokenizers ----------------------------------------------------------------------------------


def tokenizer_missing(env: Env) -> Run:
    folder = env.copy_checkpoint()
    (folder / "tokenizer.json").unlink()
    return Run(env.generate(model=folder), ("tokenizer.json", "missing"))


def tokenizer_too_large(env: Env) -> Run:
    from mobilevlm.data.tokenizer import pad_vocabulary

    folder = env.copy_checkpoint()
    tok = pad_vocabulary(_tokenizers_tokenizer(env.tokenizer), 512)
    tok.save(str(folder / "tokenizer.json"))
    return Run(env.generate(model=folder), ("tokenizer.json", "512 tokens", "text.vocab_size", "384"))


def tokenizer_too_small_for_export(env: Env) -> Run:
    """A tokenizer smaller than the model's output: the exporter refuses it (runtimes sample over
    the tokenizer's ids only), before any lowering."""
    from mobilevlm.processing import train_tokenizer

    folder = env.copy_checkpoint()
    train_tokenizer(["USER: hello ASSISTANT: hi"] * 4, vocab_size=300).save(str(folder / "tokenizer.json"))
    return Run(_export_args(env, model=folder), (folder.name, "tokens but the model 384"))


def tokenizer_not_json(env: Env) -> Run:
    folder = env.copy_checkpoint()
    (folder / "tokenizer.json").write_text("{not json")
    return Run(env.generate(model=folder), ("tokenizer.json", "not a valid tokenizer.json"))


def tokenizer_without_special_tokens(env: Env) -> Run:
    from mobilevlm.processing import train_tokenizer

    folder = env.copy_checkpoint()
    train_tokenizer(["USER: hello ASSISTANT: hi"] * 4, vocab_size=300, special_tokens=("<unk>",)).save(str(folder / "tokenizer.json"))
    return Run(env.generate(model=folder), ("tokenizer.json", "special token '<s>'", "not in the vocabulary"))


def _tokenizers_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


TOKENIZERS = [
    Case("tokenizer-missing", tokenizer_missing),
    Case("tokenizer-larger-than-model", tokenizer_too_large),
    Case("tokenizer-smaller-than-model-export", tokenizer_too_small_for_export),
    Case("tokenizer-not-json", tokenizer_not_json),
    Case("tokenizer-without-special-tokens", tokenizer_without_special_tokens),
]


# --- prompts -------------------------------------------------------------------------------------

PROMPTS = [
    Case("prompt-longer-than-context", lambda env: Run(env.generate(prompt="red circle " * 200), ("prompt takes", "tokens", "context holds 96"))),
    Case("prompt-invalid-utf8", lambda env: Run(env.generate(prompt=b"what \xff\xfe color?"), ("prompt", "not valid UTF-8"))),
    Case("prompt-empty", lambda env: Run(env.generate(prompt=""), ("prompt is empty",))),
    Case("prompt-whitespace-only", lambda env: Run(env.generate(prompt=" \n\t "), ("prompt is empty",))),
]


# --- recipes -------------------------------------------------------------------------------------


def _export_args(env: Env, *extra: str, model: Path | None = None, out: Path | None = None) -> list:
    return ["export", "--backend", "executorch", "--model", model or env.checkpoint, "--out", out or env.tmp / "bundle", "--parity-cases", "1", "--eval-scenes", "0", "--threads", "1", *extra]


RECIPES = [
    Case("recipe-unknown", lambda env: Run(_export_args(env, "--quant", "fp99"), ("recipe 'fp99'", "expected"))),
    Case("recipe-of-another-backend", lambda env: Run(_export_args(env, "--quant", "q4_0"), ("recipe 'q4_0'", "expected"))),
    Case("recipe-bad-group-size", lambda env: Run(_export_args(env, "--quant", "8da4w-g7"), ("8da4w-g7", "group size 7"))),
    Case("backend-unknown", lambda env: Run(_export_args(env)[:2] + ["tflite"] + _export_args(env)[3:], ("backend 'tflite'", "expected one of"))),
    Case("train-recipe-unknown", lambda env: Run(["train", "--recipe", "huge", "--out", env.tmp / "run"], ("--recipe", "'huge'", "choose from"))),
]


# --- bundles -------------------------------------------------------------------------------------


def write_bundle(root: Path) -> dict:
    """A structurally valid bundle (it loads: `test_the_pristine_bundle_loads`) whose artifact is a
    placeholder: every bundle case breaks exactly one thing, and `load_bundle` must catch it before
    any runtime opens the artifact."""
    from mobilevlm.export.bundle import FORMAT, FORMAT_VERSION, finalize_manifest

    root.mkdir(parents=True)
    (root / "model-fp32.pte").write_bytes(b"placeholder program")
    (root / "tokenizer.json").write_text("{}")
    (root / "tokenizer_config.json").write_text("{}")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": {}, "preprocessing": {}, "prompt": {},
        "tokenizer": {"file": "tokenizer.json", "config_file": "tokenizer_config.json"},
        "artifacts": [{"name": "executorch-fp32", "backend": "executorch", "file": "model-fp32.pte"}],
        "parity": {"cases": []},
    }
    finalize_manifest(root, manifest)
    return manifest


def edit_bundle(edit: Callable[[Path, dict], None], *expect: str) -> Callable[[Env], Run]:
    def build(env: Env) -> Run:
        root = env.tmp / "bundle"
        manifest = write_bundle(root)
        edit(root, manifest)
        if (root / "manifest.json").exists():
            raw = manifest.pop(RAW, None)
            (root / "manifest.json").write_text(raw if raw is not None else json.dumps(manifest))
        return Run(["generate", "--bundle", root, "--image", env.image, "--prompt", "hi"], expect)

    return build


RAW = "__raw_manifest_text__"  # an edit that sets it replaces manifest.json with this text


def escape_artifact(root: Path, manifest: dict) -> None:
    (root.parent / "outside.pte").write_bytes(b"x")
    manifest["artifacts"][0]["file"] = "../outside.pte"
    manifest["files"]["../outside.pte"] = {"bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}


def escape_by_symlink(root: Path, manifest: dict) -> None:
    (root.parent / "secret.txt").write_text("secret")
    (root / "model-fp32.pte").unlink()
    (root / "model-fp32.pte").symlink_to(root.parent / "secret.txt")


def escape_tokenizer(root: Path, manifest: dict) -> None:
    manifest["tokenizer"]["file"] = "../../tokenizer.json"


def tamper(root: Path, manifest: dict) -> None:
    (root / "model-fp32.pte").write_bytes(b"placeholder progran")


def unlisted_artifact(root: Path, manifest: dict) -> None:
    del manifest["files"]["model-fp32.pte"]


def unlisted_tokenizer(root: Path, manifest: dict) -> None:
    del manifest["files"]["tokenizer.json"]
    (root / "tokenizer.json").write_text('{"swapped": true}')


BUNDLES = [
    Case("bundle-no-manifest", edit_bundle(lambda r, m: (r / "manifest.json").unlink(), "manifest.json", "missing")),
    Case("bundle-manifest-not-json", edit_bundle(lambda r, m: m.__setitem__(RAW, '{"format": ]'), "manifest.json", "not valid JSON")),
    Case("bundle-format-version-from-the-future", edit_bundle(lambda r, m: m.__setitem__("format_version", 7), "manifest.json", "format_version 7", "newer")),
    Case("bundle-wrong-format", edit_bundle(lambda r, m: m.__setitem__("format", "zip"), "manifest.json", "field 'format'", "mobilevlm-bundle")),
    Case("bundle-missing-field", edit_bundle(lambda r, m: m.pop("prompt"), "manifest.json", "missing field 'prompt'")),
    Case("bundle-artifact-path-escapes", edit_bundle(escape_artifact, "manifest.json", "'../outside.pte'", "escapes the bundle")),
    Case("bundle-artifact-absolute-path", edit_bundle(lambda r, m: m["artifacts"][0].__setitem__("file", "/etc/passwd"), "manifest.json", "'/etc/passwd'", "relative path inside the bundle")),
    Case("bundle-symlink-escapes", edit_bundle(escape_by_symlink, "manifest.json", "'model-fp32.pte'", "escapes the bundle")),
    Case("bundle-tokenizer-path-escapes", edit_bundle(escape_tokenizer, "manifest.json", "tokenizer.file", "escapes the bundle")),
    Case("bundle-checksum-mismatch", edit_bundle(tamper, "model-fp32.pte", "SHA-256 does not match")),
    Case("bundle-listed-file-missing", edit_bundle(lambda r, m: (r / "tokenizer_config.json").unlink(), "manifest.json", "'tokenizer_config.json'", "missing")),
    Case("bundle-artifact-not-checksummed", edit_bundle(unlisted_artifact, "manifest.json", "artifacts[0].file", "not listed under 'files'")),
    Case("bundle-tokenizer-not-checksummed", edit_bundle(unlisted_tokenizer, "manifest.json", "tokenizer.file", "not listed under 'files'")),
]


# --- output folders ------------------------------------------------------------------------------


def out_exists(env: Env) -> Run:
    (env.tmp / "bundle").mkdir()
    return Run(_export_args(env), ("bundle", "already exists", "--force"))


def out_under_a_file(env: Env) -> Run:
    """Not writable, even for root: a parent of the output path is a regular file."""
    (env.tmp / "plain-file").write_text("x")
    return Run(_export_args(env, out=env.tmp / "plain-file" / "bundle"), ("plain-file", "cannot create the output folder"))


def out_read_only(env: Env) -> Run:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; out-under-a-file covers the not-writable case")
    folder = env.tmp / "locked"
    folder.mkdir(mode=0o500)
    return Run(["scene", "--out", folder / "scene.png"], ("scene.png", "cannot"))


def scene_under_a_file(env: Env) -> Run:
    (env.tmp / "plain-file").write_text("x")
    return Run(["scene", "--out", env.tmp / "plain-file" / "scene.png"], ("plain-file", "cannot create"))


def limit_file_size(limit: int) -> Callable[[], None]:
    """In the child: files may grow to `limit` bytes; a longer write fails (EFBIG), as on a full disk.
    SIGXFSZ is ignored so the write returns an error instead of killing the process."""

    def setup() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return setup


def disk_full_scene(env: Env) -> Run:
    return Run(["scene", "--out", env.tmp / "scene.png", "--size", "512"], ("scene.png", "writing failed", "too large"), limit_file_size(4096))


def disk_full_checkpoint(env: Env) -> Run:
    return Run(["init", "--preset", "tiny", "--out", env.tmp / "model"], ("model", "writing failed"), limit_file_size(1 << 20))


OUTPUTS = [
    Case("output-exists", out_exists),
    Case("output-parent-is-a-file", out_under_a_file),
    Case("output-read-only-folder", out_read_only),
    Case("output-file-parent-is-a-file", scene_under_a_file),
    Case("output-disk-full-file", disk_full_scene),
    Case("output-disk-full-checkpoint", disk_full_checkpoint),
]

CATALOGUE = IMAGES + CHECKPOINTS + CONFIGS + TOKENIZERS + PROMPTS + RECIPES + BUNDLES + OUTPUTS


# --- the tests -----------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path, micro_checkpoint, tokenizer_path, image_path) -> Env:
    return Env(tmp_path, micro_checkpoint, tokenizer_path, image_path)


def test_the_catalogue_is_large_and_names_are_unique():
    names = [c.name for c in CATALOGUE]
    assert len(names) == len(set(names))
    assert len([c for c in CATALOGUE if not c.works]) >= 40


@pytest.mark.parametrize("case", CATALOGUE, ids=lambda c: c.name)
def test_catalogue(case: Case, env: Env):
    run = case.build(env)
    before = _listing(env.tmp)
    result = run_cli(run)
    stderr = result.stderr.decode("utf-8", "replace")
    if case.works:
        assert result.returncode == 0, stderr
        return
    lines = stderr.strip().splitlines()
    assert result.returncode == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    missing = [fragment for fragment in run.expect if fragment not in lines[0]]
    assert not missing, f"{lines[0]!r} lacks {missing}"
    assert not (env.tmp / "pwned").exists(), "a pickle ran code"
    assert _listing(env.tmp) - before == set(), "a failed command left files behind"


def _listing(folder: Path) -> set[str]:
    """Every path under `folder` (hidden temporaries included): a failed command must add none."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("name", ["image-decompression-bomb", "checkpoint-nan-weight", "bundle-checksum-mismatch", "output-exists"])
def test_debug_shows_the_traceback(name: str, env: Env):
    case = next(c for c in CATALOGUE if c.name == name)
    result = run_cli(case.build(env), debug=True)
    assert result.returncode != 0 and b"Traceback" in result.stderr


def test_the_pristine_bundle_loads(tmp_path):
    """The bundle cases start from a bundle `load_bundle` accepts, so each fails for its own defect."""
    from mobilevlm.export.bundle import load_bundle

    write_bundle(tmp_path / "b")
    assert load_bundle(tmp_path / "b").artifact("executorch-fp32")["file"] == "model-fp32.pte"


def test_awkward_images_decode_to_the_right_pixels(tmp_path):
    """The four images that must work also come out right: upright, scaled, composited."""
    from mobilevlm.processing import load_image

    rotated = load_image(exif_rotated_jpeg())
    assert rotated.size == (20, 60)
    wide = np.asarray(load_image(sixteen_bit_png()))
    assert wide.min() == 0 and wide.max() == 255  # scaled from 16 bits, not clipped to white
    assert load_image(cmyk_jpeg()).mode == "RGB"
    palette = np.asarray(load_image(palette_with_transparency()))
    assert palette.shape == (40, 48, 3) and (palette == 255).all(axis=-1).any()  # index 0 shows white


def test_disk_full_in_process_leaves_nothing(tmp_path, monkeypatch, capsys):
    """ENOSPC while the checkpoint is written: one line, status 2, no folder and no temporary."""
    import errno

    import safetensors.torch

    from mobilevlm import cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    status = cli.main(["init", "--preset", "tiny", "--out", str(tmp_path / "model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "No space left on device" in err[0] and "model" in err[0]
    assert list(tmp_path.iterdir()) == []
