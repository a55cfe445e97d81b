"""Entry point of the emulated Python: import `mobilevlm` from this source tree, then run a module.

    qemu-aarch64-static <sysroot>/usr/bin/python3.11 emulated_entry.py mobilevlm.benchmarks.worker ARGS...

The sysroot has the aarch64 wheels but not `mobilevlm`, whose subpackages `mobilevlm.export` and
`mobilevlm.benchmarks` live in top-level folders mapped by `package-dir` in pyproject.toml (DESIGN.md).
This script reads that mapping and installs a finder for it, so the emulated worker runs exactly the
host's source files. Standard library only: it runs before anything else is importable.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import runpy
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class PackageDirFinder(importlib.abc.MetaPathFinder):
    def __init__(self, mapping: dict[str, Path]):
        self.mapping = mapping

    def find_spec(self, name, path=None, target=None):
        folder = self.mapping.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])


def main() -> None:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        package_dir = tomllib.load(handle)["tool"]["setuptools"]["package-dir"]
    sys.meta_path.insert(0, PackageDirFinder({name: ROOT / folder for name, folder in package_dir.items()}))
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
