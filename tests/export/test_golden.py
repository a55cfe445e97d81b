"""The golden files the demo apps' cores are tested against (export/golden.py): written from any
bundle (or from a checkpoint, without exporting), and consistent with the reference they describe."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mobilevlm.export import golden
from mobilevlm.export.bundle import finalize_manifest, load_bundle
from mobilevlm.processing import ImageProcessor, Tokenizer


@pytest.fixture(scope="module")
def written(tmp_path_factory, micro_checkpoint):
    root = tmp_path_factory.mktemp("golden")
    bundle = golden.write_source_bundle(micro_checkpoint, root / "bundle", num_cases=4)
    return bundle, golden.write_golden(bundle, root / "golden"), root / "golden"


def test_source_bundle_is_a_valid_bundle_without_artifacts(written):
    bundle, _, _ = written
    loaded = load_bundle(bundle)
    assert loaded.manifest["artifacts"] == []
    assert len(loaded.manifest["parity"]["cases"]) == 4


def test_every_image_tensor_matches_the_reference_processor(written):
    bundle, data, out = written
    manifest = load_bundle(bundle).manifest
    pre = manifest["preprocessing"]
    names = {entry["name"] for entry in data["images"]}
    assert {"case-00", "wide-pad", "tall-crop", "wide-resize", "transparent", "upscale-pad", "exact-size"} <= names
    assert {f"exif-{n}" for n in range(2, 9)} <= names
    for entry in data["images"]:
        tensor = ImageProcessor(pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]), entry["aspect_mode"]).prepare_image(out / entry["png"])
        assert hashlib.sha256(tensor.numpy().tobytes()).hexdigest() == entry["expected"]["sha256"]
        assert entry["expected"]["shape"] == [1, 3, pre["image_size"], pre["image_size"]]
        stored = np.asarray(Image.open(out / entry["png"]).convert("RGBA"))
        assert (out / entry["pixels"]).read_bytes() == stored.tobytes()
        assert (entry["width"], entry["height"]) == (stored.shape[1], stored.shape[0])
    assert not next(e for e in data["images"] if e["name"] == "exact-size")["resampled"]
    assert next(e for e in data["images"] if e["name"] == "wide-pad")["resampled"]


def test_exif_images_are_turned_upright(written):
    _, data, out = written
    entry = next(e for e in data["images"] if e["name"] == "exif-6")
    assert Image.open(out / entry["png"]).getexif()[0x0112] == 6


def test_prompt_ids_agree_with_the_manifest(written):
    bundle, data, out = written
    prompt = load_bundle(bundle).manifest["prompt"]
    tokenizer = Tokenizer(out / "tokenizer.json")
    for row in data["prompts"]:
        assert row["before_ids"] == prompt["before_image_ids"] == row["manifest_before_ids"]
        assert row["after_ids"] == tokenizer.encode(prompt["after_image"].replace("{prompt}", row["question"]))
    assert [r["fits_context"] for r in data["prompts"]].count(False) == 1


def test_stop_cases_follow_the_python_session(written):
    _, data, _ = written
    for case in data["stops"]:
        text = "".join(case["pieces"][: case["max_new_tokens"]])
        for stop in case["stop_strings"]:  # ExecuTorchSession.answer: cut at the first stop string
            text = text.split(stop)[0]
        assert text == case["expected_text"], case["name"]


def test_answers_of_an_exported_artifact_become_stop_cases(tmp_path, written):
    bundle, _, _ = written
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "model.pte").write_bytes(b"not a program: the golden writer never opens artifacts")
    manifest["artifacts"] = [{"name": "executorch-fp32", "backend": "executorch", "file": "model.pte",
                              "parity": {"cases": [{"case": "case-00", "reference": " red circle", "artifact": " red circle"}]}}]
    finalize_manifest(copy, manifest)
    data = golden.write_golden(copy, tmp_path / "golden")
    case = data["stops"][0]
    assert case["expected_text"] == " red circle" and case["pieces"][-2:] == ["</s>", " after"]
    assert "".join(case["pieces"][:-2]) == " red circle"


def test_stats_and_number_formatting():
    assert golden.fixed(21.25, 1) == "21.3" and golden.fixed(2.5, 0) == "3" and golden.fixed(-1.04, 1) == "-1.0"
    assert golden.fixed(None, 2) == "-" and golden.fixed(-0.001, 1) == "0.0"
    derived = golden.derived_stats(golden.STATS_SAMPLES[0])
    assert derived["ttft_ms"] == 131 and derived["load_s"] == 1.345
    assert golden.stats_line(derived) == "prefill 31 tok @ 252.0 tok/s · first token 131 ms · decode 12 tok @ 15.4 tok/s · load 1.35 s"


def test_cli_writes_files_and_refuses_a_missing_bundle(tmp_path, written, capsys):
    bundle, _, _ = written
    assert golden.main(["--bundle", str(bundle), "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "golden.json").is_file() and (tmp_path / "g" / "manifest.json").is_file()
    assert golden.main(["--bundle", str(tmp_path / "nowhere"), "--out", str(tmp_path / "h")]) == 2
    assert "no such bundle folder" in capsys.readouterr().err
