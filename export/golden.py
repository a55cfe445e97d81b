"""Golden files for the demo apps' cores: what the Python toolkit says an app must compute from a bundle.

    python -m mobilevlm.export.golden --bundle BUNDLE --out DIR
    python -m mobilevlm.export.golden --model CHECKPOINT --out DIR   (DIR-source-bundle: no artifacts, no export)

The Android (Java) and iOS (Swift) cores read DIR in their unit tests and must agree with every value:

    DIR/golden.json            the expectations below, format "mobilevlm-golden" version 1
    DIR/manifest.json          a copy of the bundle's manifest (what the apps parse and validate)
    DIR/tokenizer.json         a copy of the bundle's tokenizer
    DIR/images/NAME.png        test images (the bundle's parity images and made-up ones that exercise
                               every aspect mode, upscaling, transparency and each EXIF orientation)
    DIR/images/NAME.rgba       the same image decoded: straight (not premultiplied) RGBA bytes, row
                               by row, as stored (before its EXIF orientation) — what a platform decoder
                               hands the core, so the cores are tested without a PNG decoder

Per image: the uint8 [1, 3, S, S] RGB tensor the artifact must be given (`ImageProcessor.prepare_image`,
PIL's bicubic), as a SHA-256 of its CHW bytes and its shape. Per parity question: the prompt text before
and after the image and their token ids. Tokenizer strings with their ids, token ids with their text.
Stop behaviour: streams of text pieces as a runner hands them to the app, with the answer and the
reason the app must stop. Runner statistics JSON with the figures the app derives and the line it
shows. Only text and small images, written from whatever bundle is given (tests write them; nothing
is checked in).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mobilevlm.errors import MobileVLMError

from .bundle import MANIFEST, load_bundle

FORMAT = "mobilevlm-golden"
VERSION = 1

TOKENIZER_STRINGS = [
    "What color is the circle?",
    "  two leading spaces and trailing  ",
    "tabs\tand\nnew lines\n\n",
    "numbers 12345 and 3.14",
    "it's I'll we're they've",
    "émoji ünïcödé 日本語 😀",
    "a stop string </s> inside",
    "USER: ",
    "x",
]

# Runner statistics as ExecuTorch's runners report them (`stats_to_json_string`, the "PyTorchObserver"
# line and Android's LlmCallback.onStats), with made-up timings.
STATS_SAMPLES = [
    {"prompt_tokens": 31, "generated_tokens": 12, "model_load_start_ms": 1000, "model_load_end_ms": 2345,
     "inference_start_ms": 5000, "inference_end_ms": 5900, "model_execution_start_ms": 0, "model_execution_end_ms": 0,
     "prompt_eval_end_ms": 5123, "first_token_ms": 5131, "aggregate_sampling_time_ms": 3, "SCALING_FACTOR_UNITS_PER_SECOND": 1000},
    {"prompt_tokens": 7, "generated_tokens": 0, "model_load_start_ms": 0, "model_load_end_ms": 0,
     "inference_start_ms": 100, "inference_end_ms": 100, "model_execution_start_ms": 0, "model_execution_end_ms": 0,
     "prompt_eval_end_ms": 100, "first_token_ms": 100, "aggregate_sampling_time_ms": 0, "SCALING_FACTOR_UNITS_PER_SECOND": 1000},
]


def fixed(value: float | None, digits: int) -> str:
    """Decimal text rounded half away from zero: the rule both cores implement (printf-style
    formatting rounds ties differently in Java and Swift)."""
    if value is None or not math.isfinite(value):
        return "-"
    scaled = math.floor(abs(value) * 10**digits + 0.5)
    whole, frac = divmod(scaled, 10**digits)
    sign = "-" if value < 0 and scaled else ""
    return f"{sign}{whole}" + (f".{frac:0{digits}d}" if digits else "")


def derived_stats(stats: dict) -> dict:
    """What the apps derive from a stats record (ExecuTorch's own formulas for the two rates)."""
    prefill_ms = stats["prompt_eval_end_ms"] - stats["inference_start_ms"]
    decode_ms = stats["inference_end_ms"] - stats["prompt_eval_end_ms"]
    load_ms = stats["model_load_end_ms"] - stats["model_load_start_ms"]
    return {
        "prompt_tokens": stats["prompt_tokens"],
        "generated_tokens": stats["generated_tokens"],
        "prefill_tok_s": stats["prompt_tokens"] / prefill_ms * 1000 if prefill_ms > 0 else None,
        "decode_tok_s": stats["generated_tokens"] / decode_ms * 1000 if decode_ms > 0 else None,
        "ttft_ms": stats["first_token_ms"] - stats["inference_start_ms"] if stats["first_token_ms"] >= stats["inference_start_ms"] else None,
        "load_s": load_ms / 1000 if load_ms > 0 else None,
    }


def stats_line(d: dict) -> str:
    """The one line the apps show under an answer."""
    return (f"prefill {d['prompt_tokens']} tok @ {fixed(d['prefill_tok_s'], 1)} tok/s · first token {fixed(d['ttft_ms'], 0)} ms · "
            f"decode {d['generated_tokens']} tok @ {fixed(d['decode_tok_s'], 1)} tok/s · load {fixed(d['load_s'], 2)} s")


def tensor_entry(tensor) -> dict:
    data = tensor.contiguous().numpy().astype(np.uint8).tobytes()
    return {"shape": [1, *tensor.shape], "dtype": "uint8", "layout": "NCHW", "sha256": hashlib.sha256(data).hexdigest(), "first_bytes": list(data[:12])}


def write_image(folder: Path, name: str, image: Image.Image, exif_orientation: int = 1) -> tuple[Path, dict]:
    """Save `image` as PNG (with an EXIF orientation tag when not 1) and its stored RGBA bytes."""
    png = folder / f"{name}.png"
    if exif_orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(png, exif=exif.tobytes())
    else:
        image.save(png)
    stored = Image.open(png)
    stored.load()
    rgba = np.asarray(stored.convert("RGBA"), dtype=np.uint8)
    (folder / f"{name}.rgba").write_bytes(rgba.tobytes())
    return png, {"png": f"images/{name}.png", "pixels": f"images/{name}.rgba", "width": stored.width, "height": stored.height,
                 "pixel_format": "RGBA8 straight alpha, rows top to bottom, as stored (before EXIF orientation)", "exif_orientation": exif_orientation}


def made_up_images(size: int) -> list[tuple[str, Image.Image, str, int]]:
    """(name, image, aspect mode, EXIF orientation): small images that reach every code path."""
    rng = np.random.default_rng(20250611)

    def rgb(w: int, h: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")

    smooth = np.linspace(0, 255, 48 * 31 * 3).reshape(31, 48, 3).astype(np.uint8)
    alpha = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)
    alpha[:5, :, 3] = 0
    alpha[5:10, :, 3] = 255
    images = [
        ("exact-size", rgb(size, size), "pad", 1),
        ("wide-pad", rgb(45, 27), "pad", 1),
        ("tall-pad", rgb(27, 46), "pad", 1),
        ("smooth-pad", Image.fromarray(smooth, "RGB"), "pad", 1),
        ("upscale-pad", rgb(13, 9), "pad", 1),
        ("wide-crop", rgb(53, 31), "crop", 1),
        ("tall-crop", rgb(30, 49), "crop", 1),
        ("wide-resize", rgb(50, 29), "resize", 1),
        ("square-downscale", rgb(3 * size + 1, 3 * size + 1), "pad", 1),
        ("transparent", Image.fromarray(alpha, "RGBA"), "pad", 1),
    ]
    base = rgb(24, 15)
    images += [(f"exif-{n}", base, "pad", n) for n in range(2, 9)]
    return images


def utf8_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Token texts grouped as ExecuTorch's Android binding hands them over: bytes are held back until
    they form whole UTF-8 characters."""
    pieces, pending = [], b""
    for token in ids:
        pending += tokenizer.token_bytes(token)
        try:
            pieces.append(pending.decode("utf-8"))
            pending = b""
        except UnicodeDecodeError:
            continue
    if pending:
        pieces.append(pending.decode("utf-8", "replace"))
    return pieces


def stop_cases(prompt: dict, tokenizer, answers: list[tuple[str, str]]) -> list[dict]:
    stops = list(prompt["stop_strings"])
    stop = stops[0] if stops else "</s>"
    cases = []
    for case_id, answer in answers:
        pieces = utf8_pieces(tokenizer, tokenizer.encode(answer))
        # The runner hands over the EOS token's text too; when EOS is the very first token it does not
        # stop at all (executorch/extension/llm/runner), so text may follow: the app must cut there.
        cases.append({"name": f"{case_id}: answer then EOS", "pieces": [*pieces, stop, " after"], "max_new_tokens": 64,
                      "expected_text": answer, "expected_reason": "stop_string", "expected_tokens": len(pieces) + 1})
    cases += [
        {"name": "stop string split over two pieces", "pieces": ["the", " red", stop[: len(stop) // 2], stop[len(stop) // 2:], "x"],
         "max_new_tokens": 64, "expected_text": "the red", "expected_reason": "stop_string", "expected_tokens": 4},
        {"name": "a prefix of the stop string that is not one", "pieces": ["a ", stop[:1], "b", stop[:2] + "c"], "max_new_tokens": 64,
         "expected_text": "a " + stop[:1] + "b" + stop[:2] + "c", "expected_reason": "end", "expected_tokens": 4},
        {"name": "token limit", "pieces": ["one", " two", " three", " four"], "max_new_tokens": 3,
         "expected_text": "one two three", "expected_reason": "max_new_tokens", "expected_tokens": 3},
        {"name": "stop string glued to text", "pieces": ["yes" + stop + "no"], "max_new_tokens": 64,
         "expected_text": "yes", "expected_reason": "stop_string", "expected_tokens": 1},
        {"name": "nothing generated", "pieces": [], "max_new_tokens": 64, "expected_text": "", "expected_reason": "end", "expected_tokens": 0},
    ]
    for case in cases:
        case["stop_strings"] = stops
    return cases


def parity_answers(manifest: dict) -> list[tuple[str, str]]:
    for artifact in manifest.get("artifacts", []):
        rows = artifact.get("parity", {}).get("cases", [])
        if rows:
            return [(row["case"], row["reference"]) for row in rows if isinstance(row.get("reference"), str)]
    return []


def write_golden(bundle_dir: Path, out: Path) -> dict:
    from mobilevlm.processing import ImageProcessor, Tokenizer

    bundle = load_bundle(bundle_dir, verify=False)
    manifest = bundle.manifest
    pre, prompt = manifest["preprocessing"], manifest["prompt"]
    size = pre["image_size"]
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    shutil.copyfile(bundle.root / MANIFEST, out / "manifest.json")
    shutil.copyfile(bundle.path(manifest["tokenizer"]["file"]), out / "tokenizer.json")
    tokenizer = Tokenizer(out / "tokenizer.json")

    def processor(mode: str) -> ImageProcessor:
        return ImageProcessor(size, tuple(pre["mean"]), tuple(pre["std"]), mode)

    images = []
    cases = manifest.get("parity", {}).get("cases", [])
    for case in cases:
        source = Image.open(bundle.path(case["image"]))
        source.load()
        png, entry = write_image(out / "images", case["id"], source)
        tensor = processor(pre["aspect_mode"]).prepare_image(png)
        images.append({"name": case["id"], "source": case["image"], **entry, "aspect_mode": pre["aspect_mode"],
                       "resampled": Image.open(png).size != (size, size), "expected": tensor_entry(tensor)})
    for name, image, mode, orientation in made_up_images(size):
        png, entry = write_image(out / "images", name, image, orientation)
        tensor = processor(mode).prepare_image(png)
        upright = (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size
        images.append({"name": name, "source": "made up", **entry, "aspect_mode": mode, "resampled": upright != (size, size),
                       "expected": tensor_entry(tensor)})

    slot = prompt["prompt_slot"]
    prompts = []
    for case in cases:
        after_text = prompt["after_image"].replace(slot, case["question"])
        before_ids = tokenizer.encode(prompt["before_image"], add_bos=prompt["add_bos"])
        after_ids = tokenizer.encode(after_text)
        total = len(before_ids) + prompt["image_tokens"] + len(after_ids)
        prompts.append({"case": case["id"], "question": case["question"], "before_image": prompt["before_image"], "after_image": after_text,
                        "before_ids": before_ids, "after_ids": after_ids, "manifest_before_ids": prompt["before_image_ids"],
                        "prompt_tokens": total, "fits_context": total < prompt["context_length"], "max_new_tokens": case.get("max_new_tokens")})
    long_question = "why " * prompt["context_length"]
    long_ids = tokenizer.encode(prompt["after_image"].replace(slot, long_question))
    prompts.append({"case": "too-long", "question": long_question, "before_image": prompt["before_image"],
                    "after_image": prompt["after_image"].replace(slot, long_question),
                    "before_ids": tokenizer.encode(prompt["before_image"], add_bos=prompt["add_bos"]), "after_ids": long_ids,
                    "manifest_before_ids": prompt["before_image_ids"],
                    "prompt_tokens": len(prompt["before_image_ids"]) + prompt["image_tokens"] + len(long_ids), "fits_context": False, "max_new_tokens": None})

    answers = parity_answers(manifest)
    decode_cases = [{"ids": tokenizer.encode(text), "text": tokenizer.decode(tokenizer.encode(text))} for text in TOKENIZER_STRINGS]
    decode_cases.append({"ids": [prompt["bos_id"], *tokenizer.encode("hi"), *prompt["eos_ids"]], "text": "hi", "note": "special tokens are skipped"})

    stats = []
    for sample in STATS_SAMPLES:
        derived = derived_stats(sample)
        stats.append({"json": json.dumps(sample, separators=(",", ":")), "expected": derived, "line": stats_line(derived)})

    golden = {
        "format": FORMAT,
        "version": VERSION,
        "bundle": str(bundle_dir),
        "manifest": "manifest.json",
        "tokenizer": "tokenizer.json",
        "image_size": size,
        "pad_color": pre["pad_color"],
        "images": images,
        "prompts": prompts,
        "tokenizer_cases": [{"text": text, "ids": tokenizer.encode(text)} for text in TOKENIZER_STRINGS],
        "decode_cases": decode_cases,
        "stops": stop_cases(prompt, tokenizer, answers),
        "stats": stats,
        "fixed_cases": [[v, d, fixed(v, d)] for v, d in [(21.25, 1), (2.5, 0), (0.125, 2), (1234.5678, 1), (-1.05, 1), (0.0, 2), (99.95, 1)]],
    }
    (out / "golden.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return golden


def write_source_bundle(model_dir: Path, out: Path, num_cases: int = 4) -> Path:
    """A bundle without artifacts (manifest, tokenizer, parity images) from a checkpoint, written with
    the exporter's own functions: all the golden files need, in seconds and without ExecuTorch."""
    from mobilevlm.checkpoint import load_model, load_processor

    from .bundle import finalize_manifest, new_manifest, write_tokenizer
    from .parity import parity_cases

    model, processor = load_model(model_dir), load_processor(model_dir)
    if out.exists():
        shutil.rmtree(out)
    (out / "parity").mkdir(parents=True)
    manifest = new_manifest(model, processor, str(model_dir), model.config.text.max_seq_len)
    write_tokenizer(out, processor)
    cases = parity_cases(num_cases)
    for case in cases:
        case.image().save(out / "parity" / f"{case.id}.png")
    manifest["parity"]["cases"] = [{"id": c.id, "image": f"parity/{c.id}.png", "question": c.question, "max_new_tokens": c.max_new_tokens,
                                    "scene_seed": c.seed} for c in cases]
    finalize_manifest(out, manifest)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobilevlm.export.golden", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", type=Path, help="bundle folder (what mobilevlm export wrote)")
    source.add_argument("--model", type=Path, help="checkpoint folder: write OUT/source-bundle (no artifacts) from it first")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced)")
    args = parser.parse_args(argv)
    try:
        bundle = args.bundle
        if args.model is not None:
            bundle = write_source_bundle(args.model, args.out.parent / f"{args.out.name}-source-bundle")
        golden = write_golden(bundle, args.out)
    except MobileVLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(golden['images'])} images, {len(golden['prompts'])} prompts, {len(golden['stops'])} stop cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
