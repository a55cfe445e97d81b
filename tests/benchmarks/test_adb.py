"""The adb target against a fake `adb` on PATH: a shell script that logs its arguments, lists the devices
the test asks for, answers `cat status.json` with a state and serves a canned results.jsonl on `pull`."""

from __future__ import annotations

import json
import os
import stat

import pytest

from mobilevlm.benchmarks.runner import SCHEMA, run_bench
from mobilevlm.benchmarks.targets import adb as adb_target
from mobilevlm.cli import main
from mobilevlm.errors import MobileVLMError

FAKE_ADB = r"""#!/bin/sh
echo "$*" >> "$FAKE_ADB_LOG"
[ "$1" = "-s" ] && shift 2
case "$1" in
  devices) printf 'List of devices attached\n'; [ -n "$FAKE_ADB_DEVICES" ] && printf '%b' "$FAKE_ADB_DEVICES"; exit 0 ;;
  pull) cp "$FAKE_ADB_RESULTS" "$3"; exit $? ;;
  push) exit 0 ;;
  shell)
    case "$2" in
      "pm path"*) [ -n "$FAKE_ADB_NO_APP" ] || echo "package:/data/app/ai.mobilevlm.demo/base.apk"; exit 0 ;;
      "cat "*status.json) echo "$FAKE_ADB_STATUS"; exit 0 ;;
      "getprop ro.soc.model") echo "SM8650"; exit 0 ;;
      "getprop ro.product.cpu.abi") echo "arm64-v8a"; exit 0 ;;
      "cat /proc/cpuinfo") printf 'processor\t: 0\nFeatures\t: fp asimd asimddp\nprocessor\t: 1\n'; exit 0 ;;
      *) exit 0 ;;
    esac ;;
esac
exit 0
"""


def app_record(contender: str, **changes) -> dict:
    """A record as android_demo's BenchRecord.build writes it (fields trimmed)."""
    record = {"schema": SCHEMA, "bundle": "/sdcard/Android/data/ai.mobilevlm.demo/files/bundles/b", "target": "adb", "emulated": False,
              "projected": False, "machine": {"cpu": {"model": "SM8650", "machine": "arm64-v8a", "flags": ["asimddp"], "logical_cores": 8}},
              "contender": contender, "backend": "executorch", "quantization": "fp32", "threads": 7,
              "metrics": {"decode_tok_s": {"median": 40.0, "min": 39.0, "max": 41.0, "n": 3}, "load_s": 0.5}}
    return {**record, **changes}


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "adb"
    script.write_text(FAKE_ADB)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    log, results = tmp_path / "adb.log", tmp_path / "canned.jsonl"
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("ADB", raising=False)
    monkeypatch.delenv("ANDROID_SERIAL", raising=False)
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.setenv("FAKE_ADB_RESULTS", str(results))
    monkeypatch.setenv("FAKE_ADB_DEVICES", "R5CT1234\tdevice\n")
    monkeypatch.setenv("FAKE_ADB_STATUS", json.dumps({"state": "done", "records": 1}))
    monkeypatch.setattr(adb_target, "POLL_S", 0.01)
    results.write_text(json.dumps(app_record("executorch-fp32")) + "\n")
    return {"log": log, "results": results}


def calls(fake_adb) -> list[str]:
    return fake_adb["log"].read_text().splitlines()


def test_demo_app_mode(fake_adb, micro_bundle):
    records = run_bench(micro_bundle, target="adb", repeats=2, warmup=1, log=lambda s: None)
    log = calls(fake_adb)
    remote = f"{adb_target.APP_FILES}/bundles/{micro_bundle.name}"
    assert log[0] == "devices"
    assert f"-s R5CT1234 push {micro_bundle} {remote}" in log
    start = next(line for line in log if " am start " in line)
    assert start == (f"-s R5CT1234 shell am start -W -n ai.mobilevlm.demo/.MainActivity --ez benchmark true --es bundle {remote} "
                     "--ei repeats 2 --ei warmup 1")
    assert log.index(start) > log.index(f"-s R5CT1234 push {micro_bundle} {remote}")
    assert log[-1].startswith(f"-s R5CT1234 pull {adb_target.APP_FILES}/results/results.jsonl ")
    [record] = records
    assert record["schema"] == SCHEMA and record["target"] == "adb" and record["emulated"] is False
    assert record["contender"] == "executorch-fp32" and record["metrics"]["decode_tok_s"]["median"] == 40.0
    assert record["bundle"] == str(micro_bundle) and record["adb"] == {"serial": "R5CT1234", "mode": "demo app", "device_bundle": remote}


def test_one_artifact_per_app_start(fake_adb, micro_bundle):
    run_bench(micro_bundle, target="adb", only=("executorch-fp32",), log=lambda s: None)
    assert [l for l in calls(fake_adb) if " am start " in l][0].endswith("--es artifact executorch-fp32")
    with pytest.raises(MobileVLMError, match="--only nope: the bundle's artifacts are"):
        run_bench(micro_bundle, target="adb", only=("nope",), log=lambda s: None)


def test_runner_binary_mode(fake_adb, micro_bundle, tmp_path):
    runner = tmp_path / "llava_runner"
    runner.write_bytes(b"\x7fELF fake")
    fake_adb["results"].write_text(json.dumps({"schema": SCHEMA, "contender": "executorch-fp32", "metrics": {"load_s": 1.0}}) + "\n")
    records = run_bench(micro_bundle, target="adb", runner=runner, threads=(1, 4), repeats=3, warmup=0, log=lambda s: None)
    log = calls(fake_adb)
    binary, remote = f"{adb_target.RUNNER_DIR}/llava_runner", f"{adb_target.RUNNER_DIR}/bundles/{micro_bundle.name}"
    assert f"-s R5CT1234 push {runner} {binary}" in log and f"-s R5CT1234 shell chmod 755 {binary}" in log
    assert f"-s R5CT1234 shell {binary} --bundle {remote} --out {adb_target.RUNNER_DIR}/results.jsonl --threads 4 --repeats 3 --warmup 0" in log
    assert not any(" am start " in l for l in log)
    assert [r["threads"] for r in records] == [1, 4]
    for r in records:  # filled in from the device where the runner wrote no machine facts
        assert r["target"] == "adb" and r["machine"]["cpu"]["model"] == "SM8650" and r["machine"]["cpu"]["flags"] == ["asimd", "asimddp", "fp"]
        assert r["machine"]["cpu"]["logical_cores"] == 2 and r["adb"]["mode"] == "runner llava_runner"


def test_app_failure_and_bad_records(fake_adb, micro_bundle, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_STATUS", json.dumps({"state": "failed", "error": "model-fp32.pte: truncated"}))
    with pytest.raises(MobileVLMError, match="benchmark failed on R5CT1234: model-fp32.pte: truncated"):
        run_bench(micro_bundle, target="adb", log=lambda s: None)
    monkeypatch.setenv("FAKE_ADB_STATUS", json.dumps({"state": "done"}))
    fake_adb["results"].write_text(json.dumps(app_record("executorch-fp32", schema="other")) + "\n")
    with pytest.raises(MobileVLMError, match=r"results.jsonl:1: expected a 'mobilevlm-bench/1' record"):
        run_bench(micro_bundle, target="adb", log=lambda s: None)
    fake_adb["results"].write_text(json.dumps(app_record("executorch-fp32", emulated=True)) + "\n")
    with pytest.raises(MobileVLMError, match="claims target='adb', emulated=True"):
        run_bench(micro_bundle, target="adb", log=lambda s: None)
    monkeypatch.setenv("FAKE_ADB_NO_APP", "1")
    with pytest.raises(MobileVLMError, match="demo app ai.mobilevlm.demo is not installed on R5CT1234"):
        run_bench(micro_bundle, target="adb", log=lambda s: None)


def test_no_device(fake_adb, micro_bundle, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_DEVICES", "")
    with pytest.raises(MobileVLMError, match="no Android device connected"):
        run_bench(micro_bundle, target="adb", log=lambda s: None)
    assert calls(fake_adb) == ["devices"]  # nothing pushed
    monkeypatch.setenv("FAKE_ADB_DEVICES", "R5CT1234\tunauthorized\n")
    with pytest.raises(MobileVLMError, match="R5CT1234 is unauthorized"):
        run_bench(micro_bundle, target="adb", log=lambda s: None)
    monkeypatch.setenv("FAKE_ADB_DEVICES", "A\tdevice\nB\tdevice\n")
    with pytest.raises(MobileVLMError, match="2 devices connected .*ANDROID_SERIAL"):
        run_bench(micro_bundle, target="adb", log=lambda s: None)


def test_cli_no_adb_and_no_device_are_one_line(fake_adb, micro_bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_ADB_DEVICES", "")
    assert main(["bench", str(micro_bundle), "--target", "adb", "--results", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no Android device connected" in err and "Traceback" not in err
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["bench", str(micro_bundle), "--target", "adb"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no `adb` binary on PATH" in err
    assert not (tmp_path / "r.jsonl").exists()


def test_runner_needs_adb_target_and_a_file(micro_bundle, tmp_path):
    with pytest.raises(MobileVLMError, match="--runner names a binary for the adb target"):
        run_bench(micro_bundle, target="host", runner=tmp_path / "x")
    with pytest.raises(MobileVLMError, match="no such file"):
        adb_target.run_adb(None, micro_bundle, runner=tmp_path / "missing")
