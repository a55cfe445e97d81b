"""Crash safety: a process killed at any moment leaves the previous state or nothing, never a partial
artifact under the real name, and `train --resume` continues to a loadable model.

The fast tests kill a forked writer at the worst moments (mid-file, between the two renames of an
overwrite); the slow ones SIGKILL a real `mobilevlm export` and `mobilevlm train` at random points.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def start_cli(*args: object) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "mobilevlm.cli", *map(str, args)], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )


def kill_after(process: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL the process group after `seconds` unless it ended first; True if it was killed."""
    try:
        process.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True


def die_in_child(work) -> int:
    """Run `work` in a forked child that SIGKILLs itself where `work` decides; the child's fate."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            work()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


# --- fast: the worst moments, in a forked child ---------------------------------------------------


def test_kill_mid_weights_leaves_no_checkpoint(tmp_path, micro_checkpoint):
    """Killed after half of model.safetensors is on disk: nothing under the real name."""
    import safetensors.torch

    from mobilevlm import load_model, save_pretrained

    model = load_model(micro_checkpoint)
    real_save = safetensors.torch.save_file

    def half_then_die(state, path, metadata=None):
        real_save(state, path, metadata=metadata)
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    def work():
        safetensors.torch.save_file = half_then_die
        save_pretrained(model, tmp_path / "model")

    status = die_in_child(work)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not (tmp_path / "model").exists()
    assert [p.name.startswith(".model.tmp-") for p in tmp_path.iterdir()] == [True]  # only the hidden temporary


def test_kill_between_the_renames_of_an_overwrite(tmp_path, micro_checkpoint):
    """Replacing a checkpoint takes two renames (old aside, new in); killed between them, the real name
    is absent rather than partial, and the previous checkpoint survives whole beside it."""
    from mobilevlm import load_model, save_pretrained

    model = load_model(micro_checkpoint)
    save_pretrained(model, tmp_path / "model")
    real_replace = os.replace

    def first_then_die(src, dst):
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)

    def work():
        os.replace = first_then_die
        save_pretrained(model, tmp_path / "model", overwrite=True)

    status = die_in_child(work)
    assert os.WIFSIGNALED(status)
    assert not (tmp_path / "model").exists()
    kept = [p for p in tmp_path.glob(".model.old-*/model")]
    assert len(kept) == 1 and load_model(kept[0]).config == model.config


def test_kill_mid_file_leaves_the_previous_file(tmp_path):
    from mobilevlm.fileio import atomic_file

    target = tmp_path / "result.json"
    target.write_text("previous")

    def work():
        with atomic_file(target, "w") as handle:
            handle.write("{\"half\": ")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    assert os.WIFSIGNALED(die_in_child(work))
    assert target.read_text() == "previous"


# --- slow: SIGKILL real commands at random points ---------------------------------------------------


@pytest.mark.slow
def test_killed_export_leaves_no_partial_bundle(tmp_path, micro_checkpoint):
    """Two exports killed at random moments (seeded) leave no bundle or a whole one; a rerun writes
    a bundle whose every checksum verifies."""
    from mobilevlm.export.bundle import load_bundle

    args = ("export", "--backend", "executorch", "--model", micro_checkpoint, "--quant", "fp32", "--parity-cases", "1", "--eval-scenes", "0", "--threads", "1")
    for seed in (1, 2):
        out = tmp_path / f"bundle-{seed}"
        killed = kill_after(start_cli(*args, "--out", out), random.Random(seed).uniform(3.0, 45.0))
        if killed:
            assert not out.exists(), f"seed {seed}: a killed export left {out}"
        else:
            load_bundle(out)
    out = tmp_path / "bundle-1"
    if not out.exists():
        process = start_cli(*args, "--out", out)
        assert process.wait(timeout=400) == 0, process.stderr.read().decode()
    bundle = load_bundle(out, verify=True)
    assert [a["name"] for a in bundle.artifacts()] == ["executorch-fp32"]


def assert_run_folder_consistent(run: Path) -> None:
    """Every checkpoint a killed run left under a real name loads; a finished stage has its marker."""
    from mobilevlm import load_model

    for stage in sorted((run / "stages").glob("[0-9][0-9]-*")) if (run / "stages").exists() else []:
        if stage.name.endswith(".partial"):
            assert (stage / "trainer_state.pt").is_file(), stage
            torch.load(stage / "trainer_state.pt", weights_only=True)
            load_model(stage / "model")
        elif stage.name.endswith(".reference"):
            load_model(stage)
        else:
            assert (stage / "stage.json").is_file(), f"{stage} is under its real name without stage.json"
            load_model(stage / "model")
    if (run / "model").exists():
        load_model(run / "model")


@pytest.mark.slow
def test_killed_training_resumes_to_a_loadable_model(tmp_path):
    """`train --recipe micro` SIGKILLed at three random moments (seeded), resumed each time; the run
    folder stays consistent throughout and the final model loads and answers."""
    from mobilevlm import generate, load_model, load_processor
    from mobilevlm.data import make_scene, render_scene

    run = tmp_path / "run"
    args = ("train", "--recipe", "micro", "--out", run, "--save-every", "2", "--threads", "1")
    for seed in (11, 12, 13):
        resume = ("--resume",) if run.exists() else ()
        killed = kill_after(start_cli(*args, *resume), random.Random(seed).uniform(2.0, 14.0))
        assert_run_folder_consistent(run)
        if not killed:
            break
    process = start_cli(*args, "--resume")
    assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-2000:]
    assert_run_folder_consistent(run)
    assert sorted(p.name for p in (run / "stages").iterdir() if not p.name.startswith(".")) == ["01-vision", "02-text", "03-align", "04-instruct", "05-dpo"]
    image = render_scene(make_scene(0), 64)
    answer = generate(load_model(run / "model"), load_processor(run / "model"), image, "What color is the circle?", max_new_tokens=3)
    assert isinstance(answer, str)
