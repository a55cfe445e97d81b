"""The benchmark harness on the micro bundle (host target), its records, its report, its errors."""

from __future__ import annotations

import json
import shutil

import pytest

from mobilevlm.benchmarks.machine import machine_facts
from mobilevlm.benchmarks.report import markdown_table
from mobilevlm.benchmarks.runner import SCHEMA, append_records, read_records, run_bench
from mobilevlm.errors import BundleError, MobileVLMError


@pytest.fixture(scope="module")
def records(micro_bundle, micro_checkpoint):
    return run_bench(micro_bundle, threads=(1,), prompt_lengths=(8, 32), repeats=2, warmup=1, decode_tokens=8, model_dir=micro_checkpoint, log=lambda s: None)


def test_every_contender_measured(records):
    assert [r["contender"] for r in records] == ["pytorch", "executorch-fp32", "executorch-8da4w-g32"]
    for r in records:
        assert r["schema"] == SCHEMA and r["target"] == "host" and not r["emulated"] and r["threads"] == 1
        m = r["metrics"]
        for key in ("image_encode_ms", "ttft_ms", "decode_tok_s"):
            assert 0 < m[key]["min"] <= m[key]["median"] <= m[key]["max"], key
        assert set(m["prefill_tok_s"]) == {"8", "32"}
        assert m["peak_rss_mb"] > 50 and m["file_mb"] > 0 and m["load_s"] > 0
        assert r["machine"]["memory_bandwidth_gbs"] > 0 and r["versions"]["torch"].startswith("2.13")
    assert records[1]["parity"]["token_agreement"] == 1.0


def test_records_round_trip_and_report(records, tmp_path):
    path = tmp_path / "results.jsonl"
    append_records(path, records)
    append_records(path, records[:1])
    assert len(read_records(path)) == 4
    table = markdown_table(read_records(path)[:3])
    assert "| executorch-8da4w-g32 | 8da4w-g32 |" in table and "Decode speed relative to the PyTorch reference" in table


def test_missing_reference_is_reported_as_skipped(micro_bundle, tmp_path):
    records = run_bench(micro_bundle, repeats=1, warmup=0, decode_tokens=2, model_dir=tmp_path / "gone", only=("pytorch",), log=lambda s: None)
    assert "not on this machine" in records[0]["skipped"]
    assert "skipped" in markdown_table(records)


def test_bad_inputs(micro_bundle, tmp_path):
    with pytest.raises(MobileVLMError, match="unknown benchmark target 'phone'"):
        run_bench(micro_bundle, target="phone")
    with pytest.raises(BundleError, match="no such bundle folder"):
        run_bench(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(micro_bundle, broken)
    (broken / "model-fp32.pte").write_bytes(b"\x00" * 100)
    with pytest.raises(BundleError, match="SHA-256 does not match"):
        run_bench(broken)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"schema": "other"}) + "\n")
    with pytest.raises(MobileVLMError, match="field 'schema'"):
        read_records(tmp_path / "bad.jsonl")


def test_corrupt_artifact_with_matching_checksum_fails_in_the_worker(micro_bundle, tmp_path):
    """A bundle whose artifact is corrupt but consistently re-hashed: the runtime refuses it and the
    record carries the error instead of numbers."""
    from mobilevlm.export.bundle import finalize_manifest

    broken = tmp_path / "broken"
    shutil.copytree(micro_bundle, broken)
    (broken / "model-fp32.pte").write_bytes(b"\x00" * 100)
    manifest = json.loads((broken / "manifest.json").read_text())
    finalize_manifest(broken, manifest)
    records = run_bench(broken, repeats=1, warmup=0, decode_tokens=2, only=("executorch-fp32",), log=lambda s: None)
    assert "error" in records[0] and "worker exited" in records[0]["error"]


def test_machine_facts():
    facts = machine_facts(probe_bandwidth=False)
    assert facts["cpu"]["logical_cores"] >= 1 and facts["memory_gib"] > 0
