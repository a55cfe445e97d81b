"""The `emulator` target: the benchmark worker inside an ARM64 user-mode emulator.

Purpose: proof that the aarch64 kernels (ExecuTorch's XNNPACK, ONNX Runtime's MLAS) execute our
artifacts and give the same greedy tokens as the host. Its times are the host running QEMU: labelled
emulated, never phone times (expect 300-1000x slower than the host).

What `Emulator.ensure()` builds once under the cache folder (`$MOBILEVLM_EMULATOR_CACHE`, default
`~/.cache/mobilevlm/emulator`), each step skipped when its stamp says it is done with the same inputs:

1. `sysroot/`: Debian arm64 python3.11 and its libraries (with libstdc++6, libatomic1, libgomp1),
   the closure computed by apt-cache, fetched with `apt-get download` and unpacked with `dpkg -x`. apt
   runs with `APT::Architecture=arm64` and private lists / archives / status, so the system's dpkg
   configuration is not touched. There is no binfmt_misc here: the sysroot's python is started by
   `qemu-aarch64-static` (Debian's qemu-user-static) with `QEMU_LD_PREFIX=<sysroot>`.
2. `site/`: aarch64 wheels from PyPI (`pip install --target --platform manylinux_2_28_aarch64
   --python-version 3.11 --only-binary=:all: --no-deps`) of the runtime packages the worker imports,
   pinned to the versions installed on the host, so both sides run the same library releases.
3. Stubs for the CUDA libraries PyPI's aarch64 torch (a CUDA build) links against (see stubs.py),
   linked with Debian's aarch64 binutils unpacked into `toolchain/`.
4. `sysroot/proc/cpuinfo`, written for the emulated CPU before each run: QEMU 7.2 passes the host's
   x86 /proc/cpuinfo through (ONNX Runtime's cpuinfo then crashes at import), but it opens paths under
   QEMU_LD_PREFIX first. Its Features line comes from the emulated CPU's AT_HWCAP / AT_HWCAP2.

The emulated CPU: `QEMU_CPU` (default cortex-a76: Armv8.2 with dotprod, no SVE, like a phone's big
core). QEMU's default `max` exposes SVE2/SME, which sends XNNPACK and ORT down paths that are 10-30x
slower under QEMU and which phones do not have. Records carry the CPU name and its features.

CI: the slow suite (tests/benchmarks/test_emulator.py, `pytest -m slow`) skips when the cache is cold.
A job warms it with `python -m mobilevlm.benchmarks.targets.emulator --build` (about 1 GB, a few
minutes; needs `apt-get install qemu-user-static` and network access to Debian and PyPI), and keeps
`~/.cache/mobilevlm/emulator` in its cache keyed on the host's pinned versions (`--print-key`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from mobilevlm.errors import MobileVLMError

from . import stubs

QEMU = "qemu-aarch64-static"
DEFAULT_CPU = "cortex-a76"
# QEMU 7.2 has no named model of an Armv9 phone core (Cortex-X2..X4, A710..A720: dotprod, i8mm, bf16;
# phone kernels do not enable SVE). `max` with SVE and SME switched off exposes exactly that ISA level
# (checked: its AT_HWCAP2 has i8mm and bf16, no sve / sme), so XNNPACK and ORT take their i8mm paths.
ARMV9_PHONE_CPU = "max,sve=off,sme=off"


def cpu_for_device(device) -> str:
    """The QEMU CPU whose features match a device profile's big cores (`benchmarks/devices`)."""
    from mobilevlm.errors import MobileVLMError

    features = set(device.features)
    if "asimd" not in features:
        raise MobileVLMError(f"emulator: {device.id} is not an ARM64 device (features {', '.join(sorted(features))}); the emulator runs aarch64 only")
    if "sme" in features:
        return "max,sve=off"  # Apple M4: SME without SVE for non-streaming code
    if "i8mm" in features:
        return ARMV9_PHONE_CPU
    if "asimddp" in features:
        return DEFAULT_CPU
    return "cortex-a72"  # Armv8.0: no dotprod
PYTHON = "python3.11"
PLATFORM = "manylinux_2_28_aarch64"
# pip takes --platform literally: name the older manylinux tags that glibc 2.36 also runs.
PLATFORMS = (PLATFORM, "manylinux_2_17_aarch64", "manylinux2014_aarch64")
DEBIAN_PACKAGES = (PYTHON, "libstdc++6", "libatomic1", "libgomp1")
TOOLCHAIN_PACKAGES = ("binutils-aarch64-linux-gnu",)
# What the worker imports for the executorch and onnx contenders (found with `python -X importtime`);
# executorch.runtime needs ruamel.yaml without declaring it. Versions come from the host.
WHEELS = ("torch", "executorch", "onnxruntime", "numpy", "pillow", "tokenizers", "safetensors", "ruamel.yaml", "torchao",
          "typing-extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "filelock", "tabulate",
          "flatbuffers", "packaging", "protobuf", "tqdm")
# The backends whose runtimes the sysroot holds.
BACKENDS = ("executorch", "onnx")
# MIDR of the CPU models QEMU 7.2 emulates (implementer, variant, part, revision), for /proc/cpuinfo.
MIDR = {"cortex-a53": (0x41, 0x0, 0xD03, 4), "cortex-a55": (0x41, 0x1, 0xD05, 0), "cortex-a57": (0x41, 0x1, 0xD07, 0),
        "cortex-a72": (0x41, 0x0, 0xD08, 3), "cortex-a76": (0x41, 0x4, 0xD0B, 1), "neoverse-n1": (0x41, 0x4, 0xD0C, 1),
        "a64fx": (0x46, 0x1, 0x001, 0), "max": (0x00, 0x0, 0x051, 0)}
# Linux arm64 hwcap bit names (arch/arm64/include/uapi/asm/hwcap.h), in bit order.
HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 "
         "asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 i8mm bf16 dgh "
          "rng bti mte ecv afp rpres mte3 sme sme_i16i64 sme_f64f64 sme_i8i32 sme_f16f32 sme_b16f32 sme_f32f32 sme_fa64 wfxt "
          "ebf16 sve_ebf16 cssc rprfm sve2p1 sme2 sme2p1 sme_i16i32 sme_bi32i32 sme_b16b16 sme_f16f16 mops hbc").split()
_HWCAP_PROBE = "import ctypes; f = ctypes.CDLL(None).getauxval; f.restype = ctypes.c_ulong; print(f(16), f(26))"


def default_cache() -> Path:
    if os.environ.get("MOBILEVLM_EMULATOR_CACHE"):
        return Path(os.environ["MOBILEVLM_EMULATOR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mobilevlm" / "emulator"


def host_pins() -> list[str]:
    """`name==version` of each wheel, the version the host has installed (local tags like +cpu dropped)."""
    pins = []
    for name in WHEELS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise MobileVLMError(f"emulator: {name} is not installed on the host; the emulator installs the host's version of it") from None
        pins.append(f"{name}=={version.split('+')[0]}")
    return pins


def cpu_features(hwcap: int, hwcap2: int) -> list[str]:
    return [n for i, n in enumerate(HWCAP) if hwcap >> i & 1] + [n for i, n in enumerate(HWCAP2) if hwcap2 >> i & 1]


class Emulator:
    def __init__(self, cache: Path | None = None, cpu: str | None = None, log: Callable[[str], None] = print):
        self.cache = Path(cache or default_cache())
        self.cpu = cpu or os.environ.get("QEMU_CPU") or DEFAULT_CPU
        self.log = log
        self.sysroot, self.site, self.toolchain = self.cache / "sysroot", self.cache / "site", self.cache / "toolchain"
        self.stubs_dir = self.sysroot / "usr" / "lib" / "aarch64-linux-gnu"

    # -- state ------------------------------------------------------------------------------------
    def _stamp(self, step: str) -> Path:
        return self.cache / "stamps" / f"{step}.json"

    def _done(self, step: str, inputs) -> bool:
        path = self._stamp(step)
        return path.is_file() and json.loads(path.read_text()) == inputs

    def _mark(self, step: str, inputs) -> None:
        self._stamp(step).parent.mkdir(parents=True, exist_ok=True)
        self._stamp(step).write_text(json.dumps(inputs))

    def steps(self) -> dict:
        return {"sysroot": list(DEBIAN_PACKAGES), "toolchain": list(TOOLCHAIN_PACKAGES), "wheels": host_pins()}

    def is_ready(self) -> bool:
        """Whether every step is built for the host's current pins (the slow tests skip otherwise)."""
        steps = self.steps()
        return all(self._done(step, inputs) for step, inputs in steps.items()) and self._done("stubs", steps["wheels"])

    def qemu(self) -> str:
        found = shutil.which(QEMU)
        if not found:
            raise MobileVLMError(f"emulator: {QEMU} not found; install Debian's qemu-user-static (apt-get install qemu-user-static)")
        return found

    # -- build ------------------------------------------------------------------------------------
    def ensure(self) -> "Emulator":
        """Build whatever is missing (idempotent); raises MobileVLMError with the failing step."""
        self.qemu()
        steps = self.steps()
        todo = [s for s in ("sysroot", "toolchain", "wheels") if not self._done(s, steps[s])]
        if not self._done("stubs", steps["wheels"]):
            todo.append("stubs")
        for i, step in enumerate(todo, 1):
            self.log(f"emulator: [{i}/{len(todo)}] {step} ...")
            getattr(self, f"_build_{step}")(steps.get(step, steps["wheels"]))
            self._mark(step, steps.get(step, steps["wheels"]))
        if todo:
            self.log(f"emulator: ready in {self.cache}")
        return self

    def _apt(self, arch: str | None) -> list[str]:
        state = self.cache / "apt" / (arch or "host")
        for sub in ("lists/partial", "archives/partial", "cache"):
            (state / sub).mkdir(parents=True, exist_ok=True)
        options = ["-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache::Archives={state / 'archives'}",
                   "-o", f"Dir::Cache={state / 'cache'}", "-o", "Dir::State::Status=/dev/null", "-o", "Debug::NoLocking=1"]
        if arch:
            options += ["-o", f"APT::Architecture={arch}", "-o", "APT::Architectures::=" + arch]
        return options

    def _run(self, command: list[str], what: str, **kwargs) -> str:
        try:
            result = subprocess.run(command, capture_output=True, text=True, **kwargs)
        except FileNotFoundError:
            raise MobileVLMError(f"emulator: {what}: {command[0]} not found") from None
        if result.returncode:
            tail = " | ".join([l for l in (result.stderr or result.stdout).splitlines() if l.strip()][-3:])
            raise MobileVLMError(f"emulator: {what} failed: {tail}")
        return result.stdout

    def _debs(self, packages, arch: str | None, folder: Path, closure: bool = True) -> list[Path]:
        """Download `packages` (with their dependency closure when asked) for `arch` into folder, with
        private apt state."""
        options = self._apt(arch)
        self._run(["apt-get", *options, "update"], f"apt-get update ({arch or 'host'} lists)")
        listing = self._run(["apt-cache", *options, "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                             "--no-breaks", "--no-replaces", "--no-enhances", *packages], f"resolving {' '.join(packages)}")
        names = sorted({l.strip() for l in listing.splitlines() if l.strip() and not l.startswith((" ", "<"))})
        missing = [p for p in packages if p not in names]
        if missing:
            raise MobileVLMError(f"emulator: Debian has no {arch or 'host'} package {', '.join(missing)}")
        if not closure:
            names = list(packages)
        folder.mkdir(parents=True, exist_ok=True)
        self.log(f"emulator:   downloading {len(names)} {arch or 'host'} packages")
        self._run(["apt-get", *options, "download", *names], "apt-get download", cwd=folder)
        return sorted(folder.glob("*.deb"))

    def _unpack(self, debs: list[Path], root: Path) -> None:
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        for deb in debs:
            self._run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")

    def _build_sysroot(self, packages) -> None:
        debs = self._debs(list(packages), "arm64", self.cache / "debs" / "arm64")
        self._unpack(debs, self.sysroot)
        self.log(f"emulator:   {PYTHON} in the sysroot: " + self.python_output(["-c", "import sys, platform; print(sys.version.split()[0], platform.machine())"]).strip())

    def _build_toolchain(self, packages) -> None:
        # only the package itself: its libraries (zlib, zstd, jansson) are the host's own
        self._unpack(self._debs(list(packages), None, self.cache / "debs" / "host", closure=False), self.toolchain)

    def _build_wheels(self, pins) -> None:
        staging = self.cache / "site.partial"
        pins = list(pins)
        self.log(f"emulator:   pip install --target ({len(pins)} aarch64 wheels, torch is ~430 MB)")
        for _ in range(len(pins) + 1):
            if staging.exists():
                shutil.rmtree(staging)
            result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(staging), *(f"--platform={p}" for p in PLATFORMS),
                                     "--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:", "--no-deps", "--no-compile", *pins],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                break
            match = re.search(r"No matching distribution found for (\S+)==(\S+)", result.stderr)
            if not match:
                tail = " | ".join([l for l in result.stderr.splitlines() if l.strip() and not l.startswith("WARNING")][-3:])
                raise MobileVLMError(f"emulator: pip install of the aarch64 wheels failed: {tail}")
            # The host may hold a release PyPI has no aarch64 wheel of (a local mirror): take the newest one
            # not above it, say so, and record the versions actually installed.
            name, version = match.groups()
            if f"{name}=={version}" not in pins:
                raise MobileVLMError(f"emulator: no aarch64 wheel of {name} {version} or older on PyPI")
            self.log(f"emulator:   {name} {version} has no {PLATFORM} wheel on PyPI; taking the newest release <= {version}")
            pins[pins.index(f"{name}=={version}")] = f"{name}<={version}"
        else:
            raise MobileVLMError("emulator: pip could not resolve the aarch64 wheels")
        if self.site.exists():
            shutil.rmtree(self.site)
        staging.rename(self.site)

    def installed_versions(self) -> dict:
        """Versions of the wheels in the emulator (from their .dist-info folders)."""
        out = {}
        for info in self.site.glob("*.dist-info"):
            name, _, version = info.name[: -len(".dist-info")].rpartition("-")
            out[name.lower().replace("_", "-")] = version
        return out

    def _build_stubs(self, _pins) -> None:
        written = self.cache / "stamps" / "stub-files.json"
        if written.is_file():  # earlier stubs would count as present libraries
            for name in json.loads(written.read_text()):
                (self.stubs_dir / name).unlink(missing_ok=True)
        plan = stubs.plan_stubs(self.site, self.sysroot, self.sysroot / "usr" / "bin" / PYTHON)
        for soname, nodes in sorted(plan.items()):
            stubs.build_stub(soname, nodes, self.stubs_dir, self.toolchain)
        written.parent.mkdir(parents=True, exist_ok=True)
        written.write_text(json.dumps(sorted(plan)))
        self.log(f"emulator:   {len(plan)} stub libraries ({sum(len(s) for n in plan.values() for s in n.values())} symbols): {', '.join(sorted(plan))}")

    # -- run --------------------------------------------------------------------------------------
    def env(self, threads: int = 1) -> dict:
        return {**os.environ, "QEMU_LD_PREFIX": str(self.sysroot), "QEMU_CPU": self.cpu, "PYTHONPATH": str(self.site),
                "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONDONTWRITEBYTECODE": "1"}

    def python(self) -> list[str]:
        return [self.qemu(), str(self.sysroot / "usr" / "bin" / PYTHON)]

    def python_output(self, args: list[str], timeout: float = 600) -> str:
        return self._run([*self.python(), *args], f"{PYTHON} under {QEMU}", env=self.env(), timeout=timeout)

    def cpu_facts(self) -> dict:
        """Name, MIDR and features (from AT_HWCAP / AT_HWCAP2) of the emulated CPU; writes the sysroot's
        proc/cpuinfo to match, one entry per host core (the emulated process sees the host's cores)."""
        model = self.cpu.split(",")[0]  # a model name, optionally with properties (max,sve=off)
        if model not in MIDR:
            raise MobileVLMError(f"emulator: QEMU_CPU={self.cpu!r} is not one of the CPU models this target knows ({', '.join(MIDR)})")
        hwcap, hwcap2 = (int(x) for x in self.python_output(["-c", _HWCAP_PROBE]).split())
        features = cpu_features(hwcap, hwcap2)
        implementer, variant, part, revision = MIDR[model]
        entry = (f"BogoMIPS\t: 50.00\nFeatures\t: {' '.join(features)}\nCPU implementer\t: 0x{implementer:02x}\n"
                 f"CPU architecture: 8\nCPU variant\t: 0x{variant:x}\nCPU part\t: 0x{part:03x}\nCPU revision\t: {revision}\n\n")
        proc = self.sysroot / "proc"
        proc.mkdir(exist_ok=True)
        (proc / "cpuinfo").write_text("".join(f"processor\t: {i}\n{entry}" for i in range(os.cpu_count() or 1)))
        for i in range(os.cpu_count() or 1):  # where oneDNN's xbyak and Arm Compute Library look first
            regs = self.sysroot / "sys" / "devices" / "system" / "cpu" / f"cpu{i}" / "regs" / "identification"
            regs.mkdir(parents=True, exist_ok=True)
            (regs / "midr_el1").write_text(f"0x{implementer << 24 | variant << 20 | 0xF << 16 | part << 4 | revision:016x}\n")
        qemu_version = self._run([self.qemu(), "--version"], "qemu version").splitlines()[0]
        midr = implementer << 24 | variant << 20 | 0xF << 16 | part << 4 | revision
        return {"qemu": qemu_version, "cpu": self.cpu, "midr": f"0x{midr:08x}", "cpu_features": features,
                "hwcap": hex(hwcap), "hwcap2": hex(hwcap2), "sysroot_python": PYTHON}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (once) the ARM64 emulator sysroot of `mobilevlm bench --target emulator`.")
    parser.add_argument("--build", action="store_true", help="build what is missing")
    parser.add_argument("--status", action="store_true", help="print whether the cache is ready")
    parser.add_argument("--print-key", action="store_true", help="print a CI cache key for the host's pins")
    parser.add_argument("--cache", type=Path, help="cache folder (default: $MOBILEVLM_EMULATOR_CACHE or ~/.cache/mobilevlm/emulator)")
    args = parser.parse_args(argv)
    emulator = Emulator(args.cache)
    try:
        if args.print_key:
            print(hashlib.sha256(json.dumps(emulator.steps()).encode()).hexdigest()[:16])
        if args.build:
            emulator.ensure()
            print(json.dumps(emulator.cpu_facts()))
        if args.status or not (args.build or args.print_key):
            print(f"{emulator.cache}: {'ready' if emulator.is_ready() else 'not built (run with --build)'}")
    except MobileVLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
