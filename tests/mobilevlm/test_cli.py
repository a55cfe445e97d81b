"""The `mobilevlm` command, run as a user runs it: a subprocess, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mobilevlm import generate, load_model, load_processor


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mobilevlm.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_generate_prints_the_reference_answer(micro_checkpoint, image_path):
    result = run_cli("generate", "--model", micro_checkpoint, "--image", image_path, "--prompt", "What color?", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    expected = generate(load_model(micro_checkpoint), load_processor(micro_checkpoint), image_path, "What color?", max_new_tokens=5)
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--image": "missing.png"}, "missing.png: no such image file"),
        ({"--model": "no-such-model"}, "no-such-model: no such checkpoint folder"),
        ({"--prompt": ""}, "prompt is empty"),
        ({"--top-p": "0"}, "--top-p must be in (0, 1]"),
    ],
)
def test_bad_input_is_one_line_without_traceback(micro_checkpoint, image_path, tmp_path, change, message):
    args = {"--model": micro_checkpoint, "--image": image_path, "--prompt": "hi", **change}
    if change.get("--image") == "missing.png":
        args["--image"] = tmp_path / "missing.png"
    flat = [x for pair in args.items() for x in pair]
    result = run_cli("generate", *flat)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(micro_checkpoint, tmp_path):
    result = run_cli("generate", "--debug", "--model", micro_checkpoint, "--image", tmp_path / "x.png", "--prompt", "hi")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_console_script_is_installed():
    """`pip install -e .` puts a `mobilevlm` script beside the interpreter."""
    from pathlib import Path

    script = Path(sys.executable).parent / "mobilevlm"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout
