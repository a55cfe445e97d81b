"""`mobilevlm bench BUNDLE`: every contender of a bundle, each in a fresh subprocess, same image, same
prompt, same thread count; one JSON record per (contender, target, threads) appended to results.jsonl.

Contenders: the PyTorch reference (the checkpoint the bundle was exported from, when it is on this
machine) and every artifact whose backend has a benchmark worker here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from mobilevlm.errors import MobileVLMError
from mobilevlm.export.bundle import git_commit, load_bundle, versions

from .machine import machine_facts

SCHEMA = "mobilevlm-bench/1"
TARGETS = ("host",)
# Why an artifact gets no timings here (its size and parity are still recorded).
NOT_MEASURED = {
    "coreml": "Core ML runs only on Apple hardware; timing our numpy MIL interpreter would be a misleading speed figure (size and parity only)",
}


def measured_backends() -> set[str]:
    """Backends with a contender module in benchmarks/contenders/."""
    return {p.stem for p in (Path(__file__).parent / "contenders").glob("*.py") if p.stem not in ("__init__", "pytorch")}


def contenders(bundle, model_dir: Path | None) -> list[tuple[str, str | None]]:
    """(contender, reason it is skipped or None)."""
    source = model_dir or Path(bundle.manifest["model"]["source"])
    found = [("pytorch", None if (source / "config.json").is_file() else f"reference checkpoint {source} is not on this machine (pass --model)")]
    backends = measured_backends()
    for artifact in bundle.artifacts():
        reason = None if artifact["backend"] in backends else NOT_MEASURED.get(artifact["backend"], f"no {artifact['backend']} benchmark contender")
        found.append((artifact["name"], reason))
    return found


def run_bench(
    bundle_dir: Path,
    target: str = "host",
    threads: tuple[int, ...] = (1,),
    prompt_lengths: tuple[int, ...] = (16, 64),
    repeats: int = 5,
    warmup: int = 1,
    decode_tokens: int = 32,
    model_dir: Path | None = None,
    only: tuple[str, ...] = (),
    timeout: float = 3600,
    log: Callable[[str], None] = print,
) -> list[dict]:
    if target not in TARGETS:
        raise MobileVLMError(f"unknown benchmark target {target!r}; expected one of {', '.join(TARGETS)}")
    bundle = load_bundle(bundle_dir)
    machine = machine_facts()
    base = {"schema": SCHEMA, "bundle": str(bundle_dir), "target": target, "emulated": False, "projected": False,
            "machine": machine, "versions": versions(), "git_commit": git_commit()}
    records = []
    for name, skipped in contenders(bundle, model_dir):
        if only and name not in only:
            continue
        artifact = bundle.artifact(name) if name != "pytorch" else None
        for n in threads:
            record = {**base, "contender": name, "backend": artifact["backend"] if artifact else "pytorch", "model_config": bundle.manifest["model"]["config"],
                      "quantization": artifact["quantization"]["recipe"] if artifact else "fp32 (eager)", "threads": n,
                      "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if artifact:
                record["parity"] = {k: artifact.get("parity", {}).get(k) for k in ("token_agreement", "answers_identical", "num_cases")}
                record["parity"]["accuracy"] = artifact.get("parity", {}).get("task", {}).get("artifact", {}).get("closed_ended_accuracy")
            if skipped:
                if artifact:  # not timed, but its size is known
                    record["file_mb"] = artifact.get("size_bytes", 0) / 1e6
                records.append({**record, "skipped": skipped})
                log(f"{name}: skipped ({skipped})")
                continue
            log(f"{name}, {n} thread(s): measuring ...")
            record.update(_run_worker(bundle_dir, name, n, prompt_lengths, repeats, warmup, decode_tokens, model_dir, timeout))
            records.append(record)
    return records


def _run_worker(bundle_dir, name, threads, prompt_lengths, repeats, warmup, decode_tokens, model_dir, timeout) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "mobilevlm.benchmarks.worker", "--bundle", str(bundle_dir), "--contender", name, "--out", str(out),
                   "--threads", str(threads), "--prompt-lengths", ",".join(map(str, prompt_lengths)), "--repeats", str(repeats),
                   "--warmup", str(warmup), "--decode-tokens", str(decode_tokens)]
        if model_dir:
            command += ["--model", str(model_dir)]
        env = {**__import__("os").environ, "OMP_NUM_THREADS": str(threads)}
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if result.returncode or not out.is_file():
            tail = [l for l in (result.stderr or "").splitlines() if l.strip()][-3:]
            return {"error": f"worker exited with {result.returncode}: {' | '.join(tail)}"}
        return {"metrics": json.loads(out.read_text())["metrics"]}


def append_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise MobileVLMError(f"{path}: no such results file")
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MobileVLMError(f"{path}:{number}: not a JSON record ({exc.msg})") from None
        if not isinstance(record, dict) or record.get("schema") != SCHEMA:
            raise MobileVLMError(f"{path}:{number}: field 'schema' must be {SCHEMA!r}")
        records.append(record)
    return records
