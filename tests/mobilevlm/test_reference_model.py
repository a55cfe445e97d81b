"""The shipped reference model (mobilevlm/reference_model/, trained by `mobilevlm train --recipe tiny`):
it loads from the package, is the default of every command, and answers held-out test questions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mobilevlm import generate, load_model, load_processor
from mobilevlm.data import render_scene
from mobilevlm.data.splits import iter_instructions
from mobilevlm.data.text import normalize_answer
from mobilevlm.export.pipeline import default_model_dir

SHIPPED = default_model_dir()


@pytest.fixture(scope="module")
def shipped():
    return load_model(SHIPPED), load_processor(SHIPPED)


def test_shipped_model_is_small_and_documents_its_training():
    size = sum(p.stat().st_size for p in SHIPPED.iterdir() if p.is_file())
    assert size < 30e6
    report = json.loads((SHIPPED / "training.json").read_text())
    assert report["recipe"] == "tiny" and report["command"].startswith("mobilevlm train --recipe tiny")
    assert report["eval"]["closed_ended"]["accuracy"] > 0.5


def test_answers_a_generated_test_question(shipped):
    """A test-split scene nobody trained on: the counting question, whose answer is in the scene graph."""
    model, processor = shipped
    samples = list(iter_instructions("test", start=7, count=1))
    sample = next(s for s in samples if s.qtype == "count")
    answer = generate(model, processor, render_scene(sample.scene, model.config.vision.image_size), sample.prompt, max_new_tokens=16)
    assert normalize_answer(answer) == normalize_answer(sample.answer)


def test_most_held_out_answers_are_right(shipped):
    """Not one lucky answer: well over chance on 40 held-out questions (yes/no and open ones mixed)."""
    model, processor = shipped
    samples = list(iter_instructions("test", start=100, count=5))[:40]
    right = sum(
        normalize_answer(generate(model, processor, render_scene(s.scene, model.config.vision.image_size), s.prompt, max_new_tokens=16)) == normalize_answer(s.answer)
        for s in samples
    )
    assert right >= 0.5 * len(samples)


def test_commands_default_to_the_shipped_model(tmp_path):
    scene = tmp_path / "scene.png"
    subprocess.run([sys.executable, "-m", "mobilevlm.cli", "scene", "--split", "test", "--index", "7", "--out", str(scene)], check=True, capture_output=True, timeout=120)
    result = subprocess.run([sys.executable, "-m", "mobilevlm.cli", "generate", "--image", str(scene), "--prompt", "How many objects are there?"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
