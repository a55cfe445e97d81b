"""Shared driver of the fuzz harnesses: libFuzzer through atheris when it is installed, else a plain
random-mutation loop over the same seeds (so a harness always runs, if less cleverly).

Every harness defines `test_one_input(data: bytes)`, which must return normally or raise a
`MobileVLMError` (a clean, one-line refusal); anything else is a crash and ends the run with the input
saved. Seeds are valid files built in code, so the fuzzer starts from the format it attacks.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

try:
    import atheris
except ImportError:  # the fallback below needs nothing but the standard library
    atheris = None


def clean(target: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """`target`, with a clean refusal (MobileVLMError) counted as a pass."""

    from mobilevlm.errors import MobileVLMError  # imported late: harnesses instrument mobilevlm first

    def test_one_input(data: bytes) -> None:
        try:
            target(data)
        except MobileVLMError:
            pass

    return test_one_input


def main(target: Callable[[bytes], None], seeds: Callable[[], Iterable[bytes]]) -> None:
    """Fuzz `target` (wrapped by `clean`) with libFuzzer's command line: `-runs=N`,
    `-max_total_time=S`, corpus folders. Without a corpus folder the built-in seeds are used."""
    test_one_input = clean(target)
    args = list(sys.argv)
    folders = [a for a in args[1:] if not a.startswith("-")]
    if not folders:
        folders = [str(scratch())]
        args.append(folders[0])
    corpus = Path(folders[0])
    if not corpus.is_file() and (not corpus.exists() or not any(corpus.iterdir())):  # a new corpus starts from the seeds
        corpus.mkdir(parents=True, exist_ok=True)
        for index, seed in enumerate(seeds()):
            (corpus / f"seed-{index:03d}").write_bytes(seed)
    if atheris is not None and os.environ.get("MOBILEVLM_FUZZ_FALLBACK") != "1":
        atheris.Setup(args, test_one_input)
        atheris.Fuzz()
    else:
        fallback(test_one_input, args)


def _option(args: list[str], name: str, default: int) -> int:
    for arg in args:
        if arg.startswith(f"-{name}="):
            return int(arg.split("=", 1)[1])
    return default


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random edit: flip, insert, delete, truncate, duplicate a slice, or splice in magic numbers."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        at = rng.randrange(len(buffer) + 1)
        if kind == 0 and buffer:
            buffer[min(at, len(buffer) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buffer[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 2:
            del buffer[at : at + rng.randint(1, 16)]
        elif kind == 3:
            del buffer[at:]
        elif kind == 4 and buffer:
            start = rng.randrange(len(buffer))
            buffer[at:at] = buffer[start : start + rng.randint(1, 64)]
        else:
            magic = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"-1", b"1e308", b"NaN", b"../", b"\x00"])
            buffer[at : at + len(magic)] = magic
    return bytes(buffer)


def fallback(test_one_input: Callable[[bytes], None], args: list[str]) -> None:
    """Mutate the corpus at random for -runs inputs or -max_total_time seconds; stop at the first crash,
    writing it to crash-<n> as libFuzzer would."""
    paths = [Path(a) for a in args[1:] if not a.startswith("-")]
    corpus = [f.read_bytes() for p in paths for f in ([p] if p.is_file() else sorted(p.iterdir())) if f.is_file()] or [b""]
    runs, seconds = _option(args, "runs", 10_000), _option(args, "max_total_time", 0)
    rng = random.Random(_option(args, "seed", 0))
    started = time.time()
    for run in range(runs):
        if seconds and time.time() - started > seconds:
            break
        data = mutate(rng.choice(corpus), rng)
        try:
            test_one_input(data)
        except Exception:
            crash = Path(f"crash-{run}")
            crash.write_bytes(data)
            traceback.print_exc()
            print(f"==CRASH== input written to {crash}", file=sys.stderr)
            sys.exit(1)
    print(f"Done {run + 1} runs in {time.time() - started:.0f} s (fallback driver, no crash)", file=sys.stderr)


def instrumented(*packages: str):
    """Coverage instrumentation for imports of `packages` under atheris (libFuzzer then steers by
    their branches); a no-op for the fallback driver."""
    import contextlib

    if atheris is None:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=list(packages))


def micro_config():
    """A model small enough to build in milliseconds (the shape of tests/conftest.py's micro model)."""
    from mobilevlm.config import MobileVLMConfig, ProjectorConfig, TextConfig, VisionConfig

    return MobileVLMConfig(
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64),
        projector=ProjectorConfig("ldpv2", pool_size=2),
        text=TextConfig(vocab_size=384, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=96),
        prompt_template="tiny",
    ).validate()


def scratch() -> Path:
    """A private folder for the files a harness writes, under $TMPDIR, removed at exit (libFuzzer may
    end the process without running Python's exit handlers, so set TMPDIR to a folder you clean)."""
    import atexit
    import shutil

    folder = Path(tempfile.mkdtemp(prefix="mobilevlm-fuzz-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder
