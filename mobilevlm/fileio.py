"""Crash-safe writing: every file and folder the toolkit produces appears whole or not at all.

A folder is built in a hidden temporary sibling (same file system, so the final rename is atomic) and
renamed into place only when everything in it is written and flushed. If the process dies half-way,
what is left is a `.<name>.tmp-*` sibling, never a half-written artifact under the real name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import MobileVLMError


class OutputError(MobileVLMError):
    """An output path cannot be written (exists, not writable, no space)."""


@contextlib.contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on normal exit it becomes `target`, on error it is removed."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: already exists (pass --force / overwrite=True to replace it)")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    except OSError as exc:
        raise OutputError(f"{parent}: cannot create the output folder here ({exc.strerror})") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); the result is a normal folder
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, MobileVLMError):
            raise OutputError(f"{target}: writing failed ({exc.strerror or exc})") from exc
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Yield a file object for a temporary sibling of `target`; it replaces `target` on normal exit."""
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{target}: is a folder, expected a file path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"{target.parent}: cannot create the output file here ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, MobileVLMError):
            raise OutputError(f"{target}: writing failed ({exc.strerror or exc})") from exc
        raise


def disk_bytes(path: str | Path) -> int:
    """Bytes of a file, or of every file below a folder (artifacts such as .mlpackage and ONNX model
    folders are folders): what an app must download."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_json(path: str | Path, error: type[Exception]) -> Any:
    """The JSON document at `path`; text that is not UTF-8 JSON raises `error` naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None


def write_json(path: str | Path, data: Any) -> None:
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
