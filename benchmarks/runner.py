"""`mobilevlm bench BUNDLE`: every contender of a bundle, each in a fresh subprocess, same image, same
prompt, same thread count; one JSON record per (contender, target, threads) appended to results.jsonl.

Contenders: the PyTorch reference (the checkpoint the bundle was exported from, when it is on this
machine) and every artifact whose backend has a benchmark worker here.

Targets (benchmarks/targets/): `host` runs the worker with this Python; `emulator` runs the same worker
inside qemu-aarch64 (few prompts and tokens: QEMU is 300-1000x slower), labels the records emulated and
compares each artifact's greedy tokens with the host's; `adb` hands the bundle to an Android device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from mobilevlm.errors import MobileVLMError
from mobilevlm.export.bundle import git_commit, load_bundle, versions

from .machine import machine_facts
from .targets import TARGETS

SCHEMA = "mobilevlm-bench/1"
# Under QEMU one forward of a 10M-parameter model takes seconds: one timed run, no warm-up, one
# prefill length, a few decode tokens; the greedy tokens compared with the host's.
EMULATED = {"repeats": 1, "warmup": 0, "prompt_lengths": 1, "decode_tokens": 4, "greedy_tokens": 4}
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
    runner: Path | None = None,
    emulator_cache: Path | None = None,
    peers: tuple[str, ...] = (),
    peer_cache: Path | None = None,
    emulate: str | None = None,
) -> list[dict]:
    if target not in TARGETS:
        raise MobileVLMError(f"unknown benchmark target {target!r}; expected one of {', '.join(TARGETS)}")
    if peers:
        from .peers import parse_peers

        peers = parse_peers(",".join(peers))
        if target != "host":
            raise MobileVLMError(f"--peers are measured on the host target (not {target})")
    emulated_cpu = None
    if emulate:
        if target != "emulator":
            raise MobileVLMError(f"--emulate picks the emulated CPU of the emulator target (not {target})")
        from .devices import get_device
        from .targets.emulator import cpu_for_device

        emulated_cpu = cpu_for_device(get_device(emulate))
    if runner is not None and target != "adb":
        raise MobileVLMError("--runner names a binary for the adb target (--target adb)")
    bundle = load_bundle(bundle_dir)
    if target == "adb":
        from .targets.adb import run_adb

        return run_adb(bundle, Path(bundle_dir), runner=runner, repeats=repeats, warmup=warmup, threads=threads, only=only, timeout=timeout, log=log)
    base = {"schema": SCHEMA, "bundle": str(bundle_dir), "target": target, "emulated": target == "emulator", "projected": False,
            "machine": machine_facts(), "versions": versions(), "git_commit": git_commit()}
    python, env, emulator, greedy = [sys.executable], {}, None, 0
    if target == "emulator":
        from .targets.emulator import BACKENDS, Emulator

        emulator = Emulator(emulator_cache, cpu=emulated_cpu, log=log).ensure()
        base["emulator"] = {**emulator.cpu_facts(), "versions": emulator.installed_versions(), "device_profile": emulate,
                            "note": "times are this host running QEMU user-mode emulation: they prove the aarch64 kernels run, they are not phone times"}
        python, env = [*emulator.python(), str(Path(__file__).parent / "targets" / "emulated_entry.py")], emulator.env()
        repeats, warmup = min(repeats, EMULATED["repeats"]), min(warmup, EMULATED["warmup"])
        prompt_lengths, decode_tokens = prompt_lengths[: EMULATED["prompt_lengths"]], min(decode_tokens, EMULATED["decode_tokens"])
        greedy = EMULATED["greedy_tokens"]
        log(f"emulator: {base['emulator']['cpu']} ({' '.join(base['emulator']['cpu_features'])}); {repeats} run, {warmup} warm-up, "
            f"prefill at {','.join(map(str, prompt_lengths))}, {decode_tokens} decode tokens, {greedy} greedy tokens compared with the host")
    records = []
    for name, skipped in contenders(bundle, model_dir):
        if only and name not in only:
            continue
        artifact = bundle.artifact(name) if name != "pytorch" else None
        if emulator and not skipped:
            if artifact is None:
                skipped = "the emulator target runs the bundle's artifacts on aarch64 kernels; the eager reference is measured by the host target"
            elif artifact["backend"] not in BACKENDS:
                skipped = f"the emulator sysroot has no aarch64 runtime for {artifact['backend']} (it has {', '.join(BACKENDS)})"
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
            log(f"{name}, {n} thread(s){' (emulated)' if emulator else ''}: measuring ...")
            args = _worker_args(bundle_dir, name, n, prompt_lengths, repeats, warmup, decode_tokens, model_dir) + (["--greedy-tokens", str(greedy)] if greedy else [])
            result = _run_worker(python, args, {**env, "OMP_NUM_THREADS": str(n)}, timeout)
            if emulator and "error" not in result:
                log(f"{name}: greedy tokens on the host ...")
                host = _run_worker([sys.executable], _worker_args(bundle_dir, name, n, prompt_lengths, repeats, warmup, decode_tokens, model_dir)
                                   + ["--greedy-tokens", str(greedy), "--greedy-only"], {"OMP_NUM_THREADS": str(n)}, timeout)
                result.update(_compare_tokens(name, host, result.pop("greedy")))
                log(f"{name}: emulated tokens {result['host_check']['emulated_tokens']} vs host {result['host_check']['host_tokens']}: "
                    + ("identical" if result["host_check"]["identical"] else "DIFFERENT"))
            record.update(result)
            records.append(record)
    if peers:
        records += _bench_peers(bundle, bundle_dir, base, peers, model_dir, threads, prompt_lengths, repeats, warmup, decode_tokens, timeout, log, peer_cache)
    return records


def _bench_peers(bundle, bundle_dir, base, tools, model_dir, threads, prompt_lengths, repeats, warmup, decode_tokens, timeout, log, cache) -> list[dict]:
    """The same weights through other tools (benchmarks/peers/), measured like the contenders."""
    from .peers import build_peers

    source = Path(model_dir) if model_dir else Path(bundle.manifest["model"]["source"])
    records = []
    for peer in build_peers(tools, source, bundle.manifest["prompt"]["context_length"], log=log, cache=cache):
        about = {"tool": peer.tool, "quant": peer.quant, "checkpoint": str(source)}
        about.update({k: v for k, v in peer.info.items() if k not in ("tool", "quant", "checkpoint", "metadata")})
        if peer.folder:
            about["folder"] = str(peer.folder)
        for n in threads:
            record = {**base, "contender": peer.name, "backend": peer.backend, "model_config": bundle.manifest["model"]["config"],
                      "quantization": peer.quant, "threads": n, "peer": about, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if peer.skipped:
                records.append({**record, "skipped": peer.skipped})
                log(f"{peer.name}: skipped ({peer.skipped})")
                continue
            scope = peer.info.get("scope", "")
            log(f"{peer.name}, {n} thread(s){' (' + scope + ' only)' if scope == 'text decoder' else ''}: measuring ...")
            args = _worker_args(bundle_dir, peer.name, n, prompt_lengths, repeats, warmup, decode_tokens, None) + ["--peer-dir", str(peer.folder)]
            record.update(_run_worker([sys.executable], args, {"OMP_NUM_THREADS": str(n)}, timeout))
            records.append(record)
    return records


def _compare_tokens(name: str, host: dict, emulated: dict) -> dict:
    if "error" in host:
        return {"error": f"host reference tokens: {host['error']}"}
    check = {"case": emulated["case"], "host_tokens": host["greedy"]["tokens"], "emulated_tokens": emulated["tokens"]}
    check["identical"] = check["host_tokens"] == check["emulated_tokens"]
    host_top, emulated_top = host["greedy"].get("first_top10"), emulated.get("first_top10")
    if host_top and emulated_top:
        check["first_top10_ids_identical"] = host_top["ids"] == emulated_top["ids"]
        check["first_top10_max_abs_logit_diff"] = max(abs(a - b) for a, b in zip(host_top["values"], emulated_top["values"]))
    out = {"host_check": check}
    if not check["identical"]:
        out["error"] = f"{name}: greedy tokens under the emulator {check['emulated_tokens']} differ from the host's {check['host_tokens']}"
    return out


def _worker_args(bundle_dir, name, threads, prompt_lengths, repeats, warmup, decode_tokens, model_dir) -> list[str]:
    args = ["mobilevlm.benchmarks.worker", "--bundle", str(Path(bundle_dir).resolve()), "--contender", name, "--threads", str(threads),
            "--prompt-lengths", ",".join(map(str, prompt_lengths)), "--repeats", str(repeats), "--warmup", str(warmup), "--decode-tokens", str(decode_tokens)]
    return args + (["--model", str(Path(model_dir).resolve())] if model_dir else [])


def _run_worker(python: list[str], args: list[str], env: dict, timeout: float) -> dict:
    """Run the worker (`python -m` on the host; the emulated entry script under QEMU) in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [*python, *(["-m"] if python == [sys.executable] else []), *args, "--out", str(out)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if result.returncode or not out.is_file():
            tail = [l for l in (result.stderr or "").splitlines() if l.strip()][-3:]
            return {"error": f"worker exited with {result.returncode}: {' | '.join(tail)}"}
        data = json.loads(out.read_text())
        return {k: data[k] for k in ("metrics", "greedy") if k in data}


def append_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def json_lines(text: str, source: str) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-empty line of a JSON-lines text; a bad line names its place."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MobileVLMError(f"{source}:{number}: not a JSON record ({exc.msg})") from None
        yield number, value


def read_records(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise MobileVLMError(f"{path}: no such results file")
    records = []
    for number, record in json_lines(Path(path).read_text(), str(path)):
        if not isinstance(record, dict) or record.get("schema") != SCHEMA:
            raise MobileVLMError(f"{path}:{number}: field 'schema' must be {SCHEMA!r}")
        records.append(record)
    return records
