"""The fuzz harnesses in fuzz/, each run for a bounded short time (CI's share of fuzzing; SECURITY.md
has the command for long runs), and the regression tests of what fuzzing found."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESSES = ("fuzz_image", "fuzz_checkpoint", "fuzz_manifest", "fuzz_tokenizer")


def run_harness(name: str, cwd: Path, *options: str, fallback: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOBILEVLM_FUZZ_FALLBACK": "1" if fallback else "0", "TMPDIR": str(cwd)}
    command = [sys.executable, str(ROOT / "fuzz" / f"{name}.py"), "-seed=1", *options]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", HARNESSES)
def test_harness_runs_clean_for_a_bounded_time(name: str, tmp_path):
    """300 inputs or 20 s, whichever first: a crash (an exception that is not a MobileVLMError) fails."""
    result = run_harness(name, tmp_path, "-runs=300", "-max_total_time=20")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(tmp_path.glob("crash-*"))
    assert "Done" in result.stderr  # it really ran (libFuzzer's or the fallback's summary)


def test_fallback_driver_runs_without_atheris(tmp_path):
    result = run_harness("fuzz_manifest", tmp_path, "-runs=200", fallback=True)
    assert result.returncode == 0 and "fallback driver" in result.stderr, result.stderr[-3000:]


def test_fallback_driver_reports_a_crash(tmp_path, monkeypatch):
    """The fallback stops at the first exception that is not a clean refusal and saves the input."""
    sys.path.insert(0, str(ROOT / "fuzz"))
    try:
        from _driver import clean, fallback
    finally:
        sys.path.pop(0)

    def target(data: bytes) -> None:
        if len(data) > 3:
            raise KeyError("boom")

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        fallback(clean(target), ["prog", "-runs=500"])
    assert list(tmp_path.glob("crash-*"))


# --- regressions: each input here once crashed a reader --------------------------------------------


def test_empty_pickle_with_opt_in_is_a_clean_error(tmp_path, micro_checkpoint):
    """fuzz_checkpoint: an empty model.pt made torch.load raise with an empty message, and formatting
    its first line raised IndexError instead of a CheckpointError."""
    import shutil

    from mobilevlm import load_model
    from mobilevlm.errors import CheckpointError

    folder = Path(shutil.copytree(micro_checkpoint, tmp_path / "ckpt"))
    (folder / "model.safetensors").unlink()
    (folder / "model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.pt: cannot be read as a weights-only torch file"):
        load_model(folder, allow_pickle=True)


def test_manifest_path_with_a_nul_byte_is_a_clean_error(tmp_path):
    """Found reviewing what fuzz_manifest can reach: a path holding "\\u0000" made Path.resolve raise
    ValueError (embedded null byte) instead of a BundleError."""
    import json

    from mobilevlm.errors import BundleError
    from mobilevlm.export.bundle import FORMAT, FORMAT_VERSION, load_bundle

    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": {}, "preprocessing": {}, "prompt": {},
                "tokenizer": {}, "artifacts": [], "files": {"a\u0000b": {"sha256": ""}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="must be a relative path inside the bundle"):
        load_bundle(tmp_path)
