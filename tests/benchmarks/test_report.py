"""Reports and charts from recorded results: synthetic records in the results schema (measured,
emulated, peer and projected), the Markdown report, the PNG charts, and bad results files."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mobilevlm.benchmarks.projection import project_records
from mobilevlm.benchmarks.report import load_results, markdown_table, projection_table, report_main, write_report
from mobilevlm.benchmarks.runner import SCHEMA, append_records
from mobilevlm.config import PRESETS
from mobilevlm.errors import MobileVLMError


def spread(median: float, lo: float = 0.95, hi: float = 1.05) -> dict:
    return {"median": median, "min": median * lo, "max": median * hi, "n": 5}


def record(contender: str, backend: str, quantization: str, decode: float, prefill: float, encode_ms: float, file_mb: float,
           agreement: float | None = 1.0, accuracy: float | None = None, target: str = "host", emulated: bool = False, threads: int = 2) -> dict:
    out = {
        "schema": SCHEMA, "bundle": "runs/bundle-v2-1.7b", "target": target, "emulated": emulated, "projected": False,
        "machine": {"cpu": {"model": "Test CPU", "machine": "x86_64", "flags": ["avx2"], "logical_cores": 2}, "memory_gib": 16, "memory_bandwidth_gbs": 20.0},
        "versions": {"torch": "2.13.0"}, "git_commit": "abc", "contender": contender, "backend": backend, "quantization": quantization,
        "threads": threads, "timestamp": "2026-01-01T00:00:00Z",
        "model_config": PRESETS["mobilevlm-v2-1.7b"].to_dict(),
        "parity": None if backend == "pytorch" else {"token_agreement": agreement, "answers_identical": True, "num_cases": 4, "accuracy": accuracy},
        "metrics": {"image_encode_ms": spread(encode_ms), "ttft_ms": spread(encode_ms + 3000 * 64 / prefill), "prompt_tokens": 190,
                    "decode_tok_s": spread(decode), "decode_tokens": 32,
                    "prefill_tok_s": {"16": spread(prefill * 0.7), "64": spread(prefill)},
                    "load_s": 1.5, "peak_rss_mb": 2000.0, "file_mb": file_mb},
    }
    if backend == "pytorch":  # as the runner writes it: the reference has no parity section
        del out["parity"]
    return out


@pytest.fixture
def records() -> list[dict]:
    measured = [
        record("pytorch", "pytorch", "fp32 (eager)", 2.1, 40.0, 3100.0, 6800.0),
        record("executorch-fp32", "executorch", "fp32", 2.4, 55.0, 2900.0, 6790.0, agreement=1.0, accuracy=0.62),
        record("executorch-8da4w-g32", "executorch", "8da4w-g32", 9.5, 80.0, 2950.0, 1900.0, agreement=0.97, accuracy=0.60),
        record("peer-llama.cpp-q4_0", "llama.cpp", "q4_0", 8.7, 45.0, 4100.0, 1050.0, agreement=0.93, accuracy=0.58),
        record("executorch-8da4w-g32", "executorch", "8da4w-g32", 0.02, 0.3, 900000.0, 1900.0, target="emulator", emulated=True, threads=1),
    ]
    return measured + project_records(measured, ["snapdragon-8-gen-3", "sd888", "raspberry-pi-5"], threads=(4,))


def test_projected_records_are_labelled(records):
    projected = [r for r in records if r["projected"]]
    assert {r["target"] for r in projected} == {"snapdragon-8-gen-3", "snapdragon-888", "raspberry-pi-5"}
    # pytorch eager is not projected (no phone runtime), the emulated record is not a source either
    assert {r["contender"] for r in projected} == {"executorch-fp32", "executorch-8da4w-g32", "peer-llama.cpp-q4_0"}
    for r in projected:
        assert r["schema"] == SCHEMA and not r["emulated"] and r["machine"]["cpu"]["model"].endswith("(projected)")
        d = r["metrics"]["decode_tok_s"]
        assert d["min"] < d["median"] < d["max"] and r["projection"]["calibrated_on"]
    ours = next(r for r in projected if r["contender"] == "executorch-8da4w-g32" and r["target"] == "snapdragon-8-gen-3")
    # our artifact measured against the peer on the host scales the device's bandwidth efficiency only for
    # a peer of the same runtime family: the llama.cpp peer does not scale an ExecuTorch artifact
    assert "no peer of this runtime" in ours["projection"]["note"]
    slow = next(r for r in projected if r["contender"] == "executorch-8da4w-g32" and r["target"] == "raspberry-pi-5")
    assert slow["metrics"]["decode_tok_s"]["median"] < ours["metrics"]["decode_tok_s"]["median"]


def test_markdown_report(records, tmp_path):
    table = markdown_table(records)
    assert "| executorch-8da4w-g32 | 8da4w-g32 |" in table and "Decode speed relative to the PyTorch reference" in table
    assert "on emulator (emulated)" in table and "not phone times" in table
    assert "on snapdragon-888 (projected)" in table and "not measured" in table
    assert "| snapdragon-8-gen-3 | executorch-8da4w-g32 | 8da4w-g32 | 4 |" in projection_table(records)
    files = write_report(records, tmp_path / "out")
    report = files[0].read_text()
    assert files[0].name == "report.md"
    for heading in ("## Measured and emulated", "## Projected (roofline model, not measured)", "## Validation of the projection", "## Charts"):
        assert heading in report
    assert "python -m mobilevlm.benchmarks.projection" in report


def test_charts_are_written_and_non_trivial(records, tmp_path):
    files = write_report(records, tmp_path / "out")
    charts = {p.name: p for p in files if p.suffix == ".png"}
    assert set(charts) == {"throughput.png", "ttft.png", "size_vs_parity.png", "projection.png"}
    for path in charts.values():
        assert path.stat().st_size > 20_000, path
        with Image.open(path) as image:
            width, height = image.size
            assert width >= 800 and height >= 400, (path, image.size)
            colors = image.convert("RGB").resize((200, 100)).getcolors(maxcolors=100_000)
            assert len(colors) > 20, f"{path} looks blank"


def test_report_main_round_trip(records, tmp_path):
    path = tmp_path / "results.jsonl"
    append_records(path, records)
    files = report_main(path)
    assert files[0] == tmp_path / "results-report" / "report.md" and all(p.is_file() for p in files)
    assert len(load_results(path)) == len(records)


def test_report_with_only_measured_records(records, tmp_path):
    files = write_report([r for r in records if not r["projected"]], tmp_path / "out")
    assert "## Projected" not in files[0].read_text()
    assert any(p.name == "projection.png" for p in files)  # still shows the validation panel


def test_bad_results_files(records, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(MobileVLMError, match=r"bad.jsonl:2: not a JSON record"):
        report_main(bad)
    with pytest.raises(MobileVLMError, match="no such results file"):
        report_main(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(MobileVLMError, match="no records"):
        report_main(empty)
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"schema": SCHEMA, "target": "host"}) + "\n")
    with pytest.raises(MobileVLMError, match="record 1 has no field 'contender'"):
        report_main(partial)
