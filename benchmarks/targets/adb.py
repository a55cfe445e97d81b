"""The `adb` target: a bundle benchmarked on a connected Android device.

Two ways to run it, both ending in records of the same schema as the host's (`mobilevlm-bench/1`):

- the demo app's benchmark mode (default; android_demo/README.md "Benchmark mode"): the bundle is pushed
  to the app's files folder, `am start ... --ez benchmark true` starts it, `status.json` is polled until
  "done" or "failed", and `results.jsonl` (one record per artifact, written by the app) is pulled;
- a runner binary named with `--runner` (e.g. a command-line ExecuTorch runner built for Android):
  pushed to /data/local/tmp/mobilevlm with the bundle and run once per thread count as
  `RUNNER --bundle DIR --out FILE --threads N --repeats R --warmup W [--artifact NAME]`; it must write
  JSON records of the same schema to FILE, one per line. Records that lack `machine` get the device's
  facts read with getprop and /proc/cpuinfo.

The device is the one `adb devices` lists (or $ANDROID_SERIAL when several are connected); adb is
`$ADB` or the first `adb` on PATH. No adb, no device, an unauthorized device, a missing app: one line.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from mobilevlm.errors import MobileVLMError

APP = "ai.mobilevlm.demo"
APP_FILES = f"/sdcard/Android/data/{APP}/files"
RUNNER_DIR = "/data/local/tmp/mobilevlm"
POLL_S = 2.0


class Adb:
    def __init__(self, serial: str | None = None):
        self.binary = os.environ.get("ADB") or shutil.which("adb")
        if not self.binary:
            raise MobileVLMError("adb target: no `adb` binary on PATH (install Android platform-tools, or set $ADB to it)")
        self.serial = serial or os.environ.get("ANDROID_SERIAL")

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        command = [self.binary, *(["-s", self.serial] if self.serial else []), *args]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MobileVLMError(f"adb {args[0]}: no answer after {timeout:.0f} s") from None
        except OSError as exc:
            raise MobileVLMError(f"adb target: cannot run {self.binary}: {exc.strerror}") from None
        if check and result.returncode:
            tail = " | ".join(l for l in (result.stderr or result.stdout).splitlines() if l.strip())[-300:]
            raise MobileVLMError(f"adb {' '.join(args[:2])} failed on {self.serial}: {tail or f'exit status {result.returncode}'}")
        return result

    def shell(self, *words: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return self("shell", " ".join(shlex.quote(w) for w in words), timeout=timeout, check=check)

    def device(self) -> str:
        """The serial of the one usable device, or a clear error."""
        listing = self("devices", timeout=60).stdout
        states = dict(line.split()[:2] for line in listing.splitlines()[1:] if len(line.split()) >= 2)
        if self.serial:
            if self.serial not in states:
                raise MobileVLMError(f"adb target: device {self.serial} is not connected (`adb devices` lists {', '.join(states) or 'none'})")
        else:
            if not states:
                raise MobileVLMError("adb target: no Android device connected (`adb devices` lists none; connect one with USB debugging on)")
            if len(states) > 1:
                raise MobileVLMError(f"adb target: {len(states)} devices connected ({', '.join(states)}); choose one with ANDROID_SERIAL")
            self.serial = next(iter(states))
        if states[self.serial] != "device":
            raise MobileVLMError(f"adb target: device {self.serial} is {states[self.serial]} (accept the USB debugging prompt on the phone)")
        return self.serial

    def push(self, local: Path, remote: str) -> None:
        self.shell("rm", "-rf", remote)
        self.shell("mkdir", "-p", str(Path(remote).parent))
        self("push", str(local), remote, timeout=3600)

    def device_facts(self) -> dict:
        """`machine` facts in the shape of benchmarks/machine.py, read with getprop and /proc/cpuinfo."""
        prop = lambda key: self.shell("getprop", key, check=False).stdout.strip() or None  # noqa: E731
        cpuinfo = self.shell("cat", "/proc/cpuinfo", check=False).stdout
        flags = sorted({f for line in cpuinfo.splitlines() if line.lower().startswith("features") for f in line.partition(":")[2].split()})
        cores = sum(1 for line in cpuinfo.splitlines() if line.startswith("processor"))
        memory = next((int(l.split()[1]) for l in self.shell("cat", "/proc/meminfo", check=False).stdout.splitlines() if l.startswith("MemTotal:")), None)
        return {"cpu": {"model": prop("ro.soc.model") or prop("ro.board.platform"), "machine": prop("ro.product.cpu.abi"), "flags": flags, "logical_cores": cores},
                "memory_gib": round(memory / 2**20, 1) if memory else None, "os": f"Android {prop('ro.build.version.release')}",
                "device": {"manufacturer": prop("ro.product.manufacturer"), "model": prop("ro.product.model")}}


def parse_records(text: str, source: str) -> list[dict]:
    from mobilevlm.benchmarks.runner import SCHEMA, json_lines

    records = []
    for number, record in json_lines(text, source):
        if not isinstance(record, dict) or record.get("schema") != SCHEMA or not record.get("contender"):
            raise MobileVLMError(f"{source}:{number}: expected a {SCHEMA!r} record with a 'contender'")
        records.append(record)
    if not records:
        raise MobileVLMError(f"{source}: the device wrote no records")
    return records


def _wait_for_app(adb: Adb, status_path: str, timeout: float, log: Callable[[str], None]) -> dict:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        text = adb.shell("cat", status_path, check=False).stdout.strip()
        try:
            status = json.loads(text) if text.startswith("{") else {}
        except json.JSONDecodeError:
            status = {}
        if status.get("state") in ("done", "failed"):
            return status
        if status.get("state") != last:
            last = status.get("state")
            log(f"adb: app state {last or 'starting'}")
        time.sleep(POLL_S)
    raise MobileVLMError(f"adb target: the app's benchmark did not finish in {timeout:.0f} s (logcat tag MobileVLMBench)")


def run_adb(bundle, bundle_dir: Path, runner: Path | None = None, repeats: int = 3, warmup: int = 1, threads: tuple[int, ...] = (1,),
            only: tuple[str, ...] = (), timeout: float = 3600, log: Callable[[str], None] = print) -> list[dict]:
    if runner is not None and not Path(runner).is_file():
        raise MobileVLMError(f"--runner {runner}: no such file")
    names = [a["name"] for a in bundle.artifacts()]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise MobileVLMError(f"--only {', '.join(unknown)}: the bundle's artifacts are {', '.join(names)}")
    adb = Adb()
    serial = adb.device()
    name = Path(bundle_dir).resolve().name
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        pulled = Path(tmp) / "results.jsonl"
        if runner is None:
            if not adb.shell("pm", "path", APP, check=False).stdout.strip():
                raise MobileVLMError(f"adb target: the demo app {APP} is not installed on {serial} (build and install android_demo/, or name a runner binary with --runner)")
            remote = f"{APP_FILES}/bundles/{name}"
            log(f"adb: pushing {bundle_dir} to {serial}:{remote}")
            adb.push(Path(bundle_dir), remote)
            for artifact in only or (None,):
                adb.shell("rm", "-f", f"{APP_FILES}/results/status.json")
                extras = ["--ez", "benchmark", "true", "--es", "bundle", remote, "--ei", "repeats", str(repeats), "--ei", "warmup", str(warmup)]
                extras += ["--es", "artifact", artifact] if artifact else []
                log(f"adb: starting the demo app's benchmark mode{f' for {artifact}' if artifact else ''}")
                adb.shell("am", "start", "-W", "-n", f"{APP}/.MainActivity", *extras)
                status = _wait_for_app(adb, f"{APP_FILES}/results/status.json", timeout, log)
                if status["state"] == "failed":
                    raise MobileVLMError(f"adb target: the app's benchmark failed on {serial}: {status.get('error')}")
                adb("pull", f"{APP_FILES}/results/results.jsonl", str(pulled))
                records += [{**r, "adb": {"serial": serial, "mode": "demo app", "device_bundle": remote}}
                            for r in parse_records(pulled.read_text(), f"{serial}:{APP_FILES}/results/results.jsonl")]
        else:
            remote, binary, out = f"{RUNNER_DIR}/bundles/{name}", f"{RUNNER_DIR}/{Path(runner).name}", f"{RUNNER_DIR}/results.jsonl"
            log(f"adb: pushing {runner} and {bundle_dir} to {serial}:{RUNNER_DIR}")
            adb.push(Path(runner), binary)
            adb.shell("chmod", "755", binary)
            adb.push(Path(bundle_dir), remote)
            facts = adb.device_facts()
            for n in threads:
                for artifact in only or (None,):
                    adb.shell("rm", "-f", out)
                    command = [binary, "--bundle", remote, "--out", out, "--threads", str(n), "--repeats", str(repeats), "--warmup", str(warmup)]
                    log(f"adb: {' '.join(command)}")
                    result = adb.shell(*command, *(["--artifact", artifact] if artifact else []), timeout=timeout, check=False)
                    if result.returncode:
                        tail = " | ".join(l for l in (result.stderr or result.stdout).splitlines() if l.strip())[-300:]
                        raise MobileVLMError(f"adb target: {Path(runner).name} exited with {result.returncode} on {serial}: {tail}")
                    adb("pull", out, str(pulled))
                    for r in parse_records(pulled.read_text(), f"{serial}:{out}"):
                        records.append({"target": "adb", "emulated": False, "projected": False, "machine": facts, "threads": n, **r,
                                        "adb": {"serial": serial, "mode": f"runner {Path(runner).name}", "device_bundle": remote}})
    for record in records:
        if record.get("target") != "adb" or record.get("emulated") or record.get("projected"):
            raise MobileVLMError(f"adb target: a record from {serial} claims target={record.get('target')!r}, emulated={record.get('emulated')!r}")
        record["bundle"] = str(bundle_dir)
    log(f"adb: {len(records)} record(s) from {serial}")
    return records
