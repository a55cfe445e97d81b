"""Fuzz the bundle manifest loader: any manifest.json beside a few real files.

    python fuzz/fuzz_manifest.py -max_total_time=3600      (see SECURITY.md)
"""

from __future__ import annotations

import json

from _driver import instrumented, main, scratch

with instrumented("mobilevlm.export.bundle"):
    from mobilevlm.export.bundle import FORMAT, FORMAT_VERSION, MANIFEST, finalize_manifest, load_bundle

ROOT = scratch() / "bundle"


def build_bundle() -> bytes:
    """A small valid bundle on disk; returns its manifest.json (the seed)."""
    ROOT.mkdir(parents=True)
    (ROOT / "model-fp32.pte").write_bytes(b"program")
    (ROOT / "tokenizer.json").write_text("{}")
    (ROOT / "parity").mkdir()
    (ROOT / "parity" / "case-00.png").write_bytes(b"png")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": {}, "preprocessing": {}, "prompt": {},
        "tokenizer": {"file": "tokenizer.json"},
        "artifacts": [{"name": "executorch-fp32", "backend": "executorch", "file": "model-fp32.pte"}],
        "parity": {"cases": [{"id": "case-00", "image": "parity/case-00.png"}]},
    }
    finalize_manifest(ROOT, manifest)
    return (ROOT / MANIFEST).read_bytes()


SEED = build_bundle()


def target(data: bytes) -> None:
    (ROOT / MANIFEST).write_bytes(data)
    bundle = load_bundle(ROOT)
    for artifact in bundle.manifest["artifacts"]:
        bundle.path(artifact["file"])


def seeds() -> list[bytes]:
    manifest = json.loads(SEED)
    variants = [SEED, json.dumps({**manifest, "format_version": 2}).encode()]
    variants.append(json.dumps({**manifest, "artifacts": [{"backend": "onnx", "file": "../x"}]}).encode())
    return variants


if __name__ == "__main__":
    main(target, seeds)
