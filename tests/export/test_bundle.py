"""Bundle reading: every malformed bundle is a clear error naming the file and the problem."""

from __future__ import annotations

import json

import pytest

from mobilevlm.errors import BundleError
from mobilevlm.export.bundle import FORMAT, FORMAT_VERSION, finalize_manifest, load_bundle


def _bundle(tmp_path, **changes):
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "model.pte").write_bytes(b"program bytes")
    (root / "tokenizer.json").write_text("{}")
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": {}, "preprocessing": {}, "prompt": {}, "tokenizer": {},
                "artifacts": [{"name": "executorch-fp32", "backend": "executorch", "file": "model.pte"}], "files": {}}
    finalize_manifest(root, manifest)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(changes)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_valid_bundle_loads(tmp_path):
    bundle = load_bundle(_bundle(tmp_path))
    assert bundle.artifact("executorch-fp32")["file"] == "model.pte"
    assert set(bundle.manifest["files"]) == {"model.pte", "tokenizer.json"}


def test_no_manifest(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match="manifest.json: missing"):
        load_bundle(tmp_path / "b")


def test_missing_folder(tmp_path):
    with pytest.raises(BundleError, match="no such bundle folder"):
        load_bundle(tmp_path / "nope")


def test_future_format_version(tmp_path):
    with pytest.raises(BundleError, match="format_version 99 is newer"):
        load_bundle(_bundle(tmp_path, format_version=99))


def test_wrong_format_and_bad_json(tmp_path):
    root = _bundle(tmp_path, format="something-else")
    with pytest.raises(BundleError, match="'format' must be"):
        load_bundle(root)
    (root / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(root)


@pytest.mark.parametrize("path", ["../outside.pte", "/etc/passwd", "sub/../../x"])
def test_artifact_path_escaping_the_bundle(tmp_path, path):
    root = _bundle(tmp_path, artifacts=[{"name": "x", "backend": "executorch", "file": path}])
    with pytest.raises(BundleError, match="escapes the bundle|relative path inside"):
        load_bundle(root)


def test_checksum_mismatch(tmp_path):
    root = _bundle(tmp_path)
    (root / "model.pte").write_bytes(b"tampered program")
    with pytest.raises(BundleError, match="model.pte: SHA-256 does not match"):
        load_bundle(root)
    assert load_bundle(root, verify=False)


def test_listed_file_missing(tmp_path):
    root = _bundle(tmp_path)
    (root / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="'tokenizer.json' is missing"):
        load_bundle(root)
