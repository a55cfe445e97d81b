"""ExecuTorch export: the .pte runs in ExecuTorch's own MultimodalRunner and gives the reference's
answers; the manifest describes it; bad input fails cleanly and leaves no partial bundle."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest

from mobilevlm import generate_ids, load_model, load_processor
from mobilevlm.data import make_scene, render_scene
from mobilevlm.errors import ExportError, PromptError, TokenizerError
from mobilevlm.export import pipeline
from mobilevlm.export.bundle import load_bundle
from mobilevlm.export.executorch import ExecuTorchSession
from mobilevlm.fileio import OutputError


@pytest.fixture(scope="module")
def bundle(micro_bundle):
    return load_bundle(micro_bundle)


def test_manifest_describes_artifacts_and_parity(bundle):
    fp32, q4 = bundle.artifact("executorch-fp32"), bundle.artifact("executorch-8da4w-g32")
    assert fp32["parity"]["answers_identical"] == fp32["parity"]["num_cases"] == 4
    assert fp32["parity"]["token_agreement"] == 1.0
    assert fp32["parity"]["first_logit_max_abs_error"] < 1e-4
    assert q4["size_bytes"] < fp32["size_bytes"]
    assert 0 <= q4["parity"]["token_agreement"] <= 1 and "task" in q4["parity"]
    image_input = fp32["methods"]["vision_encoder"]["inputs"][0]
    assert image_input["dtype"] == "uint8" and image_input["shape"] == [1, 3, 32, 32] and image_input["normalized_inside"]
    prompt = bundle.manifest["prompt"]
    assert prompt["before_image_ids"][0] == prompt["bos_id"] and "{prompt}" in prompt["after_image"]
    assert len(bundle.manifest["parity"]["cases"]) == 4
    for case in bundle.manifest["parity"]["cases"]:
        assert bundle.path(case["image"]).is_file()


def test_runner_answers_a_new_question_like_the_reference(bundle, micro_checkpoint):
    session = ExecuTorchSession(bundle.root, bundle.artifact("executorch-fp32"), bundle.manifest)
    model, processor = load_model(micro_checkpoint), load_processor(micro_checkpoint)
    for seed, question in [(2_000_123_456, "How many objects are there?"), (2_000_000_077, "Describe the image.")]:
        image = render_scene(make_scene(seed), 100)
        reference = generate_ids(model, processor, image, question, max_new_tokens=10)
        answer = session.answer(image, question, 10)
        # a random model may emit bytes that are not UTF-8; then the runner's printed text is compared
        assert answer == (session.printed_text(reference.token_ids) if session.printed_form else reference.text)


def test_metadata_methods(bundle):
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(bundle.path("model-fp32.pte")))
    value = lambda name: program.load_method(name).execute([])  # noqa: E731
    assert value("get_max_seq_len") == [96] and value("get_max_context_len") == [96]
    assert value("get_eos_ids") == [2]
    assert set(program.method_names) >= {"vision_encoder", "token_embedding", "text_decoder", "get_max_seq_len", "get_eos_ids"}


def test_prompt_longer_than_the_exported_context(bundle):
    session = ExecuTorchSession(bundle.root, bundle.artifact("executorch-fp32"), bundle.manifest)
    with pytest.raises(PromptError, match="exported with a context of 96"):
        session.answer(render_scene(make_scene(2_000_000_001), 64), "word " * 120, 4)


def test_unknown_recipe_fails_before_any_work(tmp_path, micro_checkpoint):
    with pytest.raises(ExportError, match="unknown quantization recipe 'int3'"):
        pipeline.export_bundle(tmp_path / "b", "executorch", ("int3",), micro_checkpoint)
    with pytest.raises(ExportError, match="unknown backend 'tflite'"):
        pipeline.export_bundle(tmp_path / "b", "tflite", ("fp32",), micro_checkpoint)
    assert not (tmp_path / "b").exists()


def test_missing_tokenizer(tmp_path, micro_checkpoint):
    model_dir = tmp_path / "model"
    shutil.copytree(micro_checkpoint, model_dir)
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json: missing"):
        pipeline.export_bundle(tmp_path / "b", "executorch", ("fp32",), model_dir)


def test_existing_bundle_needs_force(tmp_path, micro_checkpoint):
    (tmp_path / "b").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        pipeline.export_bundle(tmp_path / "b", "executorch", ("fp32",), micro_checkpoint)


def test_interrupted_export_leaves_nothing(tmp_path, micro_checkpoint, monkeypatch):
    backend = pipeline.get_backend("executorch")  # the real one, looked up before the patch below

    def failing_backend():
        def export_then_die(model, processor, recipe, path, context):
            path.write_bytes(b"half a program")
            raise KeyboardInterrupt

        return dataclasses.replace(backend, export=export_then_die)

    monkeypatch.setitem(pipeline.BACKENDS, "executorch", failing_backend)
    with pytest.raises(KeyboardInterrupt):
        pipeline.export_bundle(tmp_path / "b", "executorch", ("fp32",), micro_checkpoint, eval_scenes=0, log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_broken_fp32_parity_fails_loudly_and_writes_nothing(tmp_path, micro_checkpoint, monkeypatch):
    monkeypatch.setattr(ExecuTorchSession, "answer", lambda self, image, prompt, n: "something else")
    with pytest.raises(ExportError, match="fp32 parity is broken: 0/2 answers"):
        pipeline.export_bundle(tmp_path / "b", "executorch", ("fp32",), micro_checkpoint, num_parity_cases=2, eval_scenes=0, log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_errors_are_one_line(tmp_path, micro_checkpoint):
    result = subprocess.run([sys.executable, "-m", "mobilevlm.cli", "export", "--model", str(micro_checkpoint), "--quant", "8da3w", "--out", str(tmp_path / "b")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown quantization recipe '8da3w'")
    assert "Traceback" not in result.stderr
