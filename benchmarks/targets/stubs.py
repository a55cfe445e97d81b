"""Stub shared libraries for the CUDA libraries that PyPI's aarch64 `torch` links against.

PyPI's aarch64 torch wheel is a CUDA build: `libtorch_cpu.so` and `libtorch_python.so` list
`libcudart.so.13`, `libcudnn.so.9`, ... as NEEDED, so the dynamic loader refuses to load them without
those files (and without the version nodes they reference, e.g. `cudaMalloc@libcudart.so.13`). The
CPU-only aarch64 wheel lives on download.pytorch.org, which this machine cannot reach, and the real
NVIDIA wheels are gigabytes. So for every NEEDED library that neither the sysroot nor the wheels provide
we write an aarch64 library with the same SONAME, the same version nodes and every symbol the importing
libraries take from it. Every stub function returns a pointer to a message: a non-zero value, so a
status-returning CUDA call reports failure (CUDA is then "not available", which is true under the
emulator), and a string-returning one (`cudaGetErrorString`) returns a readable string. Nothing on the
CPU path calls them.

The stubs are assembled and linked by GNU binutils for aarch64 (Debian's binutils-aarch64-linux-gnu),
unpacked into the emulator cache with `apt-get download` + `dpkg -x`, not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from mobilevlm.errors import MobileVLMError

MESSAGE = "mobilevlm emulator: CUDA stub library, no CUDA device"


def elf_files(root: Path) -> list[Path]:
    out = []
    for path in root.rglob("*.so*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    out.append(path)
    return out


def _readelf(args: list[str], path: Path) -> str:
    try:
        return subprocess.run(["readelf", "-W", *args, str(path)], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        raise MobileVLMError("emulator: stubs: `readelf` not found (install binutils)") from None


def needed(path: Path) -> list[str]:
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _readelf(["-d"], path))


def version_files(path: Path) -> dict[str, str]:
    """Version name -> the library it is needed from (the .gnu.version_r section)."""
    out, current = {}, None
    for line in _readelf(["-V"], path).splitlines():
        match = re.search(r"File: (\S+)\s+Cnt:", line)
        if match:
            current = match.group(1)
            continue
        match = re.search(r"Name: (\S+)\s+Flags:", line)
        if match and current:
            out[match.group(1)] = current
    return out


def dynamic_symbols(path: Path) -> list[tuple[str, str | None, str, str, bool]]:
    """(name, version or None, type, binding, defined) of each dynamic symbol."""
    out = []
    for line in _readelf(["--dyn-syms"], path).splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[0].endswith(":") and parts[7]:
            name, _, version = parts[7].partition("@")
            version = re.sub(r"\s*\(\d+\)$", "", version.lstrip("@")) or None
            out.append((name, version, parts[3], parts[4], parts[6] != "UND"))
    return out


def missing_libraries(site: Path, sysroot: Path) -> dict[str, list[Path]]:
    """NEEDED names that no file under the sysroot or the wheels provides -> the libraries needing them."""
    present = {p.name for root in (site, sysroot) for p in root.rglob("*.so*")}
    missing: dict[str, list[Path]] = {}
    for path in elf_files(site):
        for name in needed(path):
            if name not in present:
                missing.setdefault(name, []).append(path)
    return missing


def plan_stubs(site: Path, sysroot: Path, interpreter: Path) -> dict[str, dict[str | None, dict[str, str]]]:
    """soname -> version node (None: unversioned) -> symbol -> type, for every missing library.

    A versioned import names its library (through .gnu.version_r). An unversioned one (cuSPARSELt,
    cuFile, NVSHMEM export no versions) is given to the importer's missing libraries that it takes no
    versioned symbol from, when no library of the wheels defines it; weak ones are left undefined."""
    missing = missing_libraries(site, sysroot)
    importers = sorted({p for paths in missing.values() for p in paths})
    symbols = {p: dynamic_symbols(p) for p in elf_files(site)}
    # Python's C API comes from the interpreter binary, C and C++ runtime symbols from the sysroot.
    provided = [*symbols.values(), *(dynamic_symbols(p) for p in [*elf_files(sysroot), interpreter])]
    defined = {name for rows in provided for name, _, _, _, is_defined in rows if is_defined}
    plan: dict[str, dict[str | None, dict[str, str]]] = {soname: {} for soname in missing}
    for path in importers:
        files = version_files(path)
        own = [soname for soname in needed(path) if soname in missing]
        versioned = {files[v] for _, v, _, _, d in symbols[path] if not d and v in files}
        unversioned_to = [s for s in own if s not in versioned] or own[:1]
        for name, version, kind, binding, is_defined in symbols[path]:
            if is_defined:
                continue
            if version and files.get(version) in plan:
                plan[files[version]].setdefault(version, {})[name] = kind
            elif version is None and binding != "WEAK" and name not in defined:
                for soname in unversioned_to:
                    plan[soname].setdefault(None, {})[name] = kind
    return plan


def stub_sources(nodes: dict[str | None, dict[str, str]]) -> tuple[str, str]:
    """(assembly, version script) of a stub exporting `nodes` (version node -> symbol -> type)."""
    kinds = {name: kind for symbols in nodes.values() for name, kind in symbols.items()}
    asm = [".text", ".balign 4", "mobilevlm_stub_return:", "  adrp x0, mobilevlm_stub_message",
           "  add x0, x0, :lo12:mobilevlm_stub_message", "  ret"]
    for name in sorted(n for n, k in kinds.items() if k != "OBJECT"):
        asm += [f".globl {name}", f".type {name}, %function", f".set {name}, mobilevlm_stub_return"]
    asm += [".data", ".balign 16", ".skip 16", "mobilevlm_stub_message:", f'  .asciz "{MESSAGE}"']
    for name in sorted(n for n, k in kinds.items() if k == "OBJECT"):
        asm += [".balign 16", f".globl {name}", f".type {name}, %object", f".size {name}, 256", f"{name}:", "  .skip 256"]
    # Symbols named in no node (the unversioned imports) stay exported with the base version.
    script = [f"{v} {{ global:{''.join(f' {n};' for n in sorted(nodes[v]))} }};" for v in sorted(v for v in nodes if v)] or ["{ };"]
    return "\n".join(asm) + "\n", "\n".join(script) + "\n"


def build_stub(soname: str, nodes: dict[str | None, dict[str, str]], out_dir: Path, toolchain: Path) -> Path:
    """Assemble and link the stub into out_dir/soname with the aarch64 binutils under `toolchain`."""
    tools = toolchain / "usr" / "bin"
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(str(p) for p in (toolchain / "usr" / "lib").glob("*-linux-gnu"))}
    work = out_dir / f".{soname}.build"
    work.mkdir(parents=True, exist_ok=True)
    asm, script = stub_sources(nodes)
    (work / "stub.s").write_text(asm)
    (work / "stub.map").write_text(script)
    for command in ([str(tools / "aarch64-linux-gnu-as"), "-o", str(work / "stub.o"), str(work / "stub.s")],
                    [str(tools / "aarch64-linux-gnu-ld"), "-shared", "-soname", soname, "--version-script", str(work / "stub.map"),
                     "-o", str(out_dir / soname), str(work / "stub.o")]):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode:
            raise MobileVLMError(f"emulator: building the stub {soname} failed: {' '.join(command[:1])}: {result.stderr.strip()[-500:]}")
    return out_dir / soname
