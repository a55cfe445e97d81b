"""The roofline projection: byte and MAC counts, the device data, the calibration, and its errors on
the published figures (the documented errors are asserted, so a change that worsens them fails)."""

from __future__ import annotations

import json

import pytest

from mobilevlm.benchmarks.devices import DATA, device_table_markdown, get_device, load_devices
from mobilevlm.benchmarks.projection import (
    ANE_DRAM_FRACTION, COREML_DEVICES, PROFILES, PUBLISHED, LLAMA_3_2_1B, calibrate, coreml_weight_format, decode_count, held_out_error,
    host_calibration, memory_gbs, project, project_records, validate, validation_markdown, vision_macs, weight_format,
)
from mobilevlm.config import PRESETS
from mobilevlm.errors import MobileVLMError

# Signed error of each projection against its published figure, in percent, as documented in the report
# (python -m mobilevlm.benchmarks.projection). Calibration figures are ~0 by construction.
DOCUMENTED = {
    "sd888-paper-decode": -34.4,  # the MobileVLM paper's own SD888 figure is 1.5x llama.cpp's for the same setup
    "sd778g-encode": +24.2, "sd778g-prefill": -23.6, "sd778g-decode": -5.2,
    "sd778g-v2-encode": +11.1, "sd778g-v2-prefill": -14.9, "sd778g-v2-decode": +1.9,
    "i7-10750h-v2-encode": -16.6, "i7-10750h-v2-prefill": +21.8, "i7-10750h-v2-decode": +5.7,
    "orin-gpu-decode-2": -0.4,
    "op12-3b-spinquant-prefill": +1.4, "op12-3b-spinquant-decode": +1.5, "op12-1b-qat-lora-decode": +9.6,
    "op12-1b-bf16-decode": -15.4, "op12-1b-bf16-prefill": +10.0, "op12-3b-bf16-decode": -17.8, "op12-3b-bf16-prefill": +8.7,
    "op12-llama3-8b-decode": -6.0, "s24-llama3-8b-decode": -6.6, "s22-llama3-8b-decode": -15.7,
    # Core ML on the Neural Engine (coreml-llm-cli, Llama 2 7B), calibrated on M1 Max, version 1 of its model
    "m2-ane-llama2-7b-decode": +17.6, "m3-ane-llama2-7b-decode": -0.1, "m3max-ane-llama2-7b-decode": +17.3, "m4-ane-llama2-7b-decode": -4.7,
    "m1max-ane-llama2-7b-v2-decode": -29.2,  # the tool's later model version is 1.41x faster on the same chip: software, not device
}
# explained in the report: two published SD888 figures disagree by 1.5x; coreml-llm-cli's second model version
# runs 1.41x faster than the version the Core ML profile is calibrated on, on the same M1 Max
OVER_25 = {"sd888-paper-decode", "m1max-ane-llama2-7b-v2-decode"}


@pytest.fixture(scope="module")
def rows():
    return {r.figure.id: r for r in validate()}


def test_every_published_figure_is_projected_with_its_documented_error(rows):
    assert set(rows) == {f.id for f in PUBLISHED}
    for figure_id, row in rows.items():
        if row.figure.role == "calibration":
            assert abs(row.error) < 0.005, figure_id
        else:
            assert row.error * 100 == pytest.approx(DOCUMENTED[figure_id], abs=1.0), figure_id
    assert set(DOCUMENTED) == {f.id for f in PUBLISHED if f.role == "held-out"}


def test_held_out_errors_within_25_percent_except_the_explained_one(rows):
    over = {i for i, r in rows.items() if abs(r.error) > 0.25}
    assert over == OVER_25
    # the figures the issue names: MobileVLM 1.7B on SD888 (4 threads), Orin (GPU), 778G, i7-10750H
    for figure_id in ("sd888-encode", "sd888-prefill", "sd888-decode", "orin-gpu-decode", "sd778g-decode", "i7-10750h-decode"):
        assert abs(rows[figure_id].error) <= 0.25
    # two independent public phone LLM sources beyond MobileVLM's: ExecuTorch's Llama figures, held out
    executorch = [r for r in rows.values() if r.figure.runtime == "executorch-xnnpack" and r.figure.role == "held-out"]
    assert len(executorch) >= 9 and max(abs(r.error) for r in executorch) < 0.2


def test_calibrated_efficiencies_are_physical():
    for name in PROFILES:
        eff = calibrate(name)
        assert 0 < eff.gemm < 1 and 0 < eff.encode < 1 and 0 < eff.bandwidth <= 1, (name, eff)
        assert eff.calibrated_on and all(f.role == "calibration" for f in PUBLISHED if f.id in eff.calibrated_on)
    text = validation_markdown()
    assert "sd888-paper-decode" in text and "**over 25%**" in text and "ExecuTorch examples/models/llama/README.md" in text


def test_bytes_per_weight_of_each_recipe():
    assert weight_format("q4_0").linear_bits == 4.5 and weight_format("q8_0").linear_bits == 8.5
    assert weight_format("q4_k_m").linear_bits == pytest.approx(4.8, abs=0.05)
    assert weight_format("8da4w-g32").linear_bits == 5.0 and weight_format("8da4w").linear_bits == 4.25
    assert weight_format("int4-b32-sym").linear_bits == 5.0 and weight_format("int4-b128-acc4").linear_bits == 4.28125
    assert weight_format("int8-emb4-opset21").linear_bits == 8 and weight_format("palettize4-g16").linear_bits == 4
    assert weight_format("fp16-opset18-ort").linear_bits == 16 and weight_format("fp16").kv_bytes == 2
    assert weight_format("fp32 (eager)").linear_bits == 32 and weight_format("8da4w-g64-emb4-vis8").vision_compute == "int8"
    with pytest.raises(MobileVLMError, match="unknown quantization recipe 'q3_zz'"):
        weight_format("q3_zz")


def test_counts_match_published_sizes():
    # ExecuTorch's Llama 3.2 1B SpinQuant .pte is 1,083 MiB: blocks 8da4w g32 + 8-bit head + 8-bit embedding table
    t = LLAMA_3_2_1B
    fmt = weight_format("et-spinquant")
    table = t.vocab_size * t.hidden_size
    file_bytes = decode_count(t, fmt, 0).weight_bytes + table * fmt.embedding_bits / 8
    assert file_bytes / 2**20 == pytest.approx(1083, rel=0.03)
    # MobileVLM 1.7B decoder at q4_k_s: about 0.76 GB of weights read per token, KV cache on top
    text = PRESETS["mobilevlm-1.7b"].text
    count = decode_count(text, weight_format("q4_k_s"), 250)
    assert 0.74e9 < count.weight_bytes < 0.78e9 and count.kv_bytes == 2 * 24 * 2048 * 250 * 2
    # CLIP ViT-L/14-336 up to the second-to-last layer: about 0.18 TMAC
    assert 1.7e11 < vision_macs(PRESETS["mobilevlm-1.7b"]) < 2.0e11


def test_projection_scales_with_the_device():
    fast = project("mobilevlm-v2-1.7b", "8da4w-g32", "snapdragon-8-elite", 6, "executorch-xnnpack")
    slow = project("mobilevlm-v2-1.7b", "8da4w-g32", "raspberry-pi-5", 4, "executorch-xnnpack")
    assert fast.decode_tok_s > 2 * slow.decode_tok_s and fast.ttft_s < slow.ttft_s
    assert fast.prompt_tokens == 64 + 144 and fast.decode_bound == "memory"
    one, four = (project("mobilevlm-v2-1.7b", "q4_0", "sd888", n, "llama.cpp-cpu-arm").prefill_tok_s[64] for n in (1, 4))
    # one thread runs on the X1; four threads of ggml's even split run at the A78's pace: 4 x A78 / 1 x X1
    assert four / one == pytest.approx(4 * 32 * 2.42 / (64 * 2.84), rel=0.1)


def test_devices_and_their_sources():
    devices = load_devices()
    for required in ("snapdragon-888", "snapdragon-8-gen-2", "snapdragon-8-gen-3", "snapdragon-8-elite", "dimensity-9300", "tensor-g3",
                     "apple-a17-pro", "apple-a18-pro", "apple-m4", "jetson-agx-orin", "raspberry-pi-5", "intel-i7-10750h", "snapdragon-778g",
                     "apple-m1-max", "apple-m2", "apple-m3", "apple-m3-max"):
        assert required in devices
    assert get_device("SD888").id == "snapdragon-888" and get_device("Qualcomm Snapdragon 8 Gen 3").id == "snapdragon-8-gen-3"
    sd888 = get_device("snapdragon-888")
    assert [c.name for c, _ in sd888.cores_used(2)] == ["cortex-x1", "cortex-a78"]
    # ggml's even split: four threads run at the pace of the slowest of the four cores used
    assert sd888.peak_macs_per_s("int8", 4, static_split=True) == 4 * 32 * 2.42e9
    assert sd888.peak_macs_per_s("int8", 4) == (64 * 2.84 + 3 * 32 * 2.42) * 1e9
    table = device_table_markdown()
    assert table.count("\n") == len(devices) + 1 and "estimated:" in table


def test_bad_inputs(tmp_path):
    with pytest.raises(MobileVLMError, match="unknown device 'pixel-99'; expected one of snapdragon-888"):
        get_device("pixel-99")
    with pytest.raises(MobileVLMError, match="unknown runtime 'tflite'"):
        project("mobilevlm-1.7b", "q4_0", "sd888", 4, "tflite")
    with pytest.raises(MobileVLMError, match="unknown model 'gpt-5'"):
        project("gpt-5", "q4_0", "sd888", 4, "llama.cpp-cpu-arm")
    with pytest.raises(MobileVLMError, match="has no GPU throughput"):
        project("mobilevlm-1.7b", "q4_0", "raspberry-pi-5", 1, "llama.cpp-cuda")
    with pytest.raises(MobileVLMError, match="threads must be at least 1"):
        project("mobilevlm-1.7b", "q4_0", "sd888", 0, "llama.cpp-cpu-arm")
    with pytest.raises(MobileVLMError, match="unknown device 'nope'"):
        project_records([], ["nope"])
    data = json.loads(DATA.read_text())
    del data["devices"]["raspberry-pi-5"]["memory"]["source"]
    bad = tmp_path / "devices.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(MobileVLMError, match=r"devices.raspberry-pi-5.memory: missing 'source'"):
        load_devices(bad)
    data = json.loads(DATA.read_text())
    data["devices"]["raspberry-pi-5"]["memory"]["bandwidth_gbs"] = 99
    bad.write_text(json.dumps(data))
    with pytest.raises(MobileVLMError, match="disagrees with mt_s x bus_bits"):
        load_devices(bad)
    bad.write_text("{")
    with pytest.raises(MobileVLMError, match="not valid JSON"):
        load_devices(bad)


def _host_record(contender: str, backend: str, quantization: str, decode: float) -> dict:
    from mobilevlm.benchmarks.runner import SCHEMA

    spread = {"median": decode, "min": decode, "max": decode, "n": 3}
    return {"schema": SCHEMA, "bundle": "b", "target": "host", "emulated": False, "projected": False, "contender": contender, "backend": backend,
            "quantization": quantization, "threads": 2, "machine": {"cpu": {"model": "x"}, "memory_bandwidth_gbs": 20.0},
            "model_config": PRESETS["mobilevlm-v2-1.7b"].to_dict(),
            "metrics": {"decode_tok_s": spread, "prefill_tok_s": {"64": {**spread, "median": 50.0}}, "prompt_tokens": 200, "decode_tokens": 32,
                        "image_encode_ms": spread, "ttft_ms": spread, "file_mb": 900.0}}


def test_host_calibration_and_the_peer_ratio():
    ours = _host_record("executorch-8da4w-g32", "executorch", "8da4w-g32", 10.0)
    peer = _host_record("peer-executorch-llm-8da4w", "executorch", "8da4w-g32", 8.0)
    calibration = {c["contender"]: c for c in host_calibration([ours, peer])}
    gbs = calibration["executorch-8da4w-g32"]["decode_gbs"]
    assert 8 < gbs < 11 and calibration["executorch-8da4w-g32"]["bandwidth_vs_probe"] == pytest.approx(gbs / 20.0)
    alone = project_records([ours], ["sd8g3"], threads=(6,))
    paired = project_records([ours, peer], ["sd8g3"], threads=(6,))
    assert len(alone) == 1 and len(paired) == 2
    mine = next(r for r in paired if r["contender"] == "executorch-8da4w-g32")
    assert "scaled by 1.25" in mine["projection"]["note"]
    assert mine["metrics"]["decode_tok_s"]["median"] > alone[0]["metrics"]["decode_tok_s"]["median"]
    assert mine["projected"] and mine["target"] == "snapdragon-8-gen-3"


def test_record_config_from_the_bundle_manifest(tmp_path):
    from mobilevlm.benchmarks.projection import record_config

    record = _host_record("executorch-8da4w-g32", "executorch", "8da4w-g32", 10.0)
    del record["model_config"]
    record["bundle"] = str(tmp_path)
    assert record_config(record) is None  # no manifest on this machine: the record is not projected
    assert project_records([record], ["sd888"]) == []
    (tmp_path / "manifest.json").write_text(json.dumps({"model": {"config": PRESETS["mobilevlm-1.7b"].to_dict()}}))
    assert record_config(record) == PRESETS["mobilevlm-1.7b"]
    assert len(project_records([record], ["sd888", "rpi5"], threads=(2, 4))) == 4


# --- Core ML on the Apple Neural Engine ----------------------------------------------------------------

APPLE = ("apple-a17-pro", "apple-a18-pro", "apple-m4", "apple-m1-max", "apple-m2", "apple-m3", "apple-m3-max")


def test_apple_devices_have_neural_engine_figures_with_sources():
    for key in APPLE:
        npu = get_device(key).npu
        assert npu["fp16_tops"] > 0 and npu["source"], key
        # an fp16 rate derived from an int8 TOPS figure says so; a measured Neural Engine bandwidth names its measurement
        assert npu.get("int8_tops") is None or npu.get("fp16_estimated"), key
        if npu.get("ane_bandwidth_gbs"):
            assert "anemll-bench" in npu["ane_bandwidth_source"].lower(), key
    # the Neural Engine's own ceiling, not DRAM, limits Core ML's reads; unmeasured (iPhones): a fraction of DRAM
    ane = PROFILES["coreml-ane"]
    assert memory_gbs(get_device("m3max"), ane) == 120.22 and get_device("m3max").memory_gbs == 409.6
    assert memory_gbs(get_device("a17pro"), ane) == pytest.approx(ANE_DRAM_FRACTION * 51.2)
    assert memory_gbs(get_device("m3max"), PROFILES["executorch-xnnpack"]) == 409.6
    table = device_table_markdown()
    assert "120.22 GB/s measured" in table and "17.5 TOPS fp16" in table


def test_neural_engine_bandwidth_without_a_source_is_rejected(tmp_path):
    data = json.loads(DATA.read_text())
    del data["devices"]["apple-m3"]["npu"]["ane_bandwidth_source"]
    bad = tmp_path / "devices.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(MobileVLMError, match=r"devices.apple-m3.npu: ane_bandwidth_gbs needs 'ane_bandwidth_source'"):
        load_devices(bad)
    with pytest.raises(MobileVLMError, match="raspberry-pi-5 has no Neural Engine fp16 throughput"):
        project("mobilevlm-1.7b", "int4", "raspberry-pi-5", 1, "coreml-ane")


def test_coreml_recipe_bytes():
    # fp16 per-block scales; int4 adds a 4-bit zero point per block; vision / embedding int8 per-block 32 when compressed
    assert coreml_weight_format("int4-b32").linear_bits == 4 + 20 / 32 and coreml_weight_format("int4").head_bits == 4.625
    assert coreml_weight_format("int8-b64").linear_bits == 8.25 and coreml_weight_format("palettize4-g16").linear_bits == 4
    assert coreml_weight_format("palettize4").vision_bits == 8.5 and coreml_weight_format("fp16").vision_bits == 16
    assert all(coreml_weight_format(r).compute == "fp16" and coreml_weight_format(r).kv_bytes == 2 for r in ("fp16", "int8", "int4", "palettize4"))
    with pytest.raises(MobileVLMError, match="unknown Core ML recipe 'int3'"):
        coreml_weight_format("int3")


def test_coreml_validation_errors_calibration_and_held_out_kept_apart(rows):
    coreml = {i: r for i, r in rows.items() if r.figure.runtime == "coreml-ane"}
    calibration = [i for i, r in coreml.items() if r.figure.role == "calibration"]
    held = {i: r for i, r in coreml.items() if r.figure.role == "held-out"}
    assert calibration == ["m1max-ane-llama2-7b-decode"] and len(held) == 5
    assert set(calibrate("coreml-ane").calibrated_on) == set(calibration)
    # held-out figures are on other chips than the calibration, or another model version, and their errors are computed
    assert {r.figure.device for r in held.values()} >= {"apple-m2", "apple-m3", "apple-m3-max", "apple-m4"}
    for r in held.values():
        assert r.error == pytest.approx(r.projected / r.figure.value - 1) and r.projected > 0
    assert held_out_error("coreml-ane", "decode_tok_s") == pytest.approx(max(abs(r.error) for r in held.values()))
    # device scaling: the M3 Max's Neural Engine reads at 2.2x the M1 Max's, but the 64-wide calls are partly compute
    assert rows["m3max-ane-llama2-7b-decode"].projected / rows["m1max-ane-llama2-7b-decode"].projected < 120.22 / 54.62
    eff = calibrate("coreml-ane")
    assert eff.bandwidth == 1.0 and 0.2 < eff.gemm < 1
    assert "github.com/smpanaro/coreml-llm-cli" in validation_markdown()


def _coreml_record(threads: int = 1, quantization: str = "int4-b32") -> dict:
    from mobilevlm.benchmarks.runner import SCHEMA

    # what the runner writes for a Core ML artifact: no metrics (NOT_MEASURED), its size, the model config
    return {"schema": SCHEMA, "bundle": "bundles/v2", "target": "host", "emulated": False, "projected": False, "contender": f"model-{quantization}-coreml",
            "backend": "coreml", "quantization": quantization, "threads": threads, "machine": {"cpu": {"model": "x"}, "memory_bandwidth_gbs": 20.0},
            "model_config": PRESETS["mobilevlm-v2-1.7b"].to_dict(), "file_mb": 1234.5, "parity": {"token_agreement": 1.0},
            "skipped": "Core ML runs only on Apple hardware"}


def test_coreml_record_is_projected_onto_apple_devices_and_labelled():
    records = [_coreml_record(1), _coreml_record(2), _coreml_record(1, "fp16")]
    out = project_records(records, ["sd8g3", "a17pro", "A18 Pro", "m3max"], threads=(4,))
    coreml = [r for r in out if r["backend"] == "coreml"]
    # one record per artifact and Apple device (not per thread count), none on the Snapdragon
    assert sorted((r["contender"], r["target"]) for r in coreml) == sorted(
        (c, d) for c in ("model-int4-b32-coreml", "model-fp16-coreml") for d in ("apple-a17-pro", "apple-a18-pro", "apple-m3-max"))
    assert len(out) == len(coreml)  # a record without metrics gets no CPU projection
    for r in coreml:
        assert r["projected"] is True and r["machine"]["cpu"]["model"].endswith("(projected)")
        p = r["projection"]
        assert p["runtime"] == "coreml-ane" and p["calibrated_on"] == ["m1max-ane-llama2-7b-decode"]
        assert "no host measurement" in p["note"] and "Neural Engine" in p["note"]
        assert r["metrics"]["file_mb"] == 1234.5 and r["metrics"]["load_s"] is None
        band = p["max_held_out_error"]["decode_tok_s"]
        decode = r["metrics"]["decode_tok_s"]
        assert band == pytest.approx(0.292, abs=0.01) and decode["min"] == pytest.approx(decode["median"] * (1 - band))
        assert r["metrics"]["ttft_ms"]["median"] > r["metrics"]["image_encode_ms"]["median"] > 0
        assert r["metrics"]["prompt_tokens"] == 64 + PRESETS["mobilevlm-v2-1.7b"].num_image_tokens
    by = {(r["quantization"], r["target"]): r["metrics"]["decode_tok_s"]["median"] for r in coreml}
    # int4 reads about a third of fp16's bytes; A18 Pro has 17% more bandwidth than A17 Pro; M3 Max's Neural Engine reads faster still
    assert 2.5 < by["int4-b32", "apple-a17-pro"] / by["fp16", "apple-a17-pro"] < 3.5
    assert by["int4-b32", "apple-a18-pro"] / by["int4-b32", "apple-a17-pro"] == pytest.approx(60.0 / 51.2, rel=0.02)
    assert by["int4-b32", "apple-m3-max"] > by["int4-b32", "apple-a18-pro"]
    # the hand computation: decode = bytes / Neural Engine GB/s + MACs / (fp16 peak x GEMM efficiency)
    eff = calibrate("coreml-ane")
    count = decode_count(PRESETS["mobilevlm-v2-1.7b"].text, coreml_weight_format("int4-b32"), 64 + 144 + 16)
    expected = 1 / (count.bytes / (ANE_DRAM_FRACTION * 51.2e9) + count.macs / (17.5e12 / 2 * eff.gemm))
    assert by["int4-b32", "apple-a17-pro"] == pytest.approx(expected, rel=1e-6)


def test_coreml_records_go_to_the_default_apple_devices_and_need_a_config():
    out = project_records([_coreml_record()], ["sd888"])
    assert [r["target"] for r in out] == list(COREML_DEVICES)
    record = _coreml_record()
    del record["model_config"]
    record["bundle"] = "/nonexistent/bundle"
    assert project_records([record], ["a17pro"]) == []  # no config on this machine: nothing to project from
    assert project_records([{**_coreml_record(), "error": "corrupt artifact"}], ["a17pro"]) == []
    assert project_records([{**_coreml_record(), "quantization": "int3"}], ["a17pro"]) == []
