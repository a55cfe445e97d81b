"""The emulator target: fast checks of its parts, and (slow) the promise that the aarch64 runtimes
under QEMU give the host's greedy tokens for the .pte and ONNX artifacts.

The slow tests need the cache built (`python -m mobilevlm.benchmarks.targets.emulator --build`, see
benchmarks/targets/emulator.py for how CI warms it) and skip with the reason when it is cold:

    pytest -m slow tests/benchmarks/test_emulator.py
"""

from __future__ import annotations

import shutil

import pytest

from mobilevlm.benchmarks.runner import EMULATED, run_bench
from mobilevlm.benchmarks.targets import emulator as emulator_target
from mobilevlm.benchmarks.targets.emulator import Emulator, cpu_features, host_pins
from mobilevlm.benchmarks.targets.stubs import stub_sources
from mobilevlm.errors import MobileVLMError
from mobilevlm.export import pipeline


def test_cpu_features_decode_hwcaps():
    # bits 0, 1 and 20 of AT_HWCAP; bit 1 of AT_HWCAP2
    assert cpu_features(1 | 2 | 1 << 20, 2) == ["fp", "asimd", "asimddp", "sve2"]
    assert cpu_features(0, 0) == []


def test_pins_follow_the_host():
    import torch

    pins = dict(p.split("==") for p in host_pins())
    assert pins["torch"] == torch.__version__.split("+")[0] and set(pins) == set(emulator_target.WHEELS)


def test_stub_exports_versioned_and_unversioned_symbols():
    asm, script = stub_sources({"libcudart.so.13": {"cudaMalloc": "FUNC", "cudaGetDeviceCount": "FUNC"}, None: {"cusparseLtInit": "FUNC", "nvshmemi_device_state": "OBJECT"}})
    assert script == "libcudart.so.13 { global: cudaGetDeviceCount; cudaMalloc; };\n"
    assert ".globl cusparseLtInit" in asm and ".set cudaMalloc, mobilevlm_stub_return" in asm
    assert ".type nvshmemi_device_state, %object" in asm and ".set nvshmemi_device_state" not in asm


def test_missing_qemu_and_unknown_cpu_are_one_line(tmp_path, monkeypatch, micro_bundle):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MobileVLMError, match="qemu-aarch64-static not found; install Debian's qemu-user-static"):
        run_bench(micro_bundle, target="emulator", emulator_cache=tmp_path / "cache", log=lambda s: None)
    assert not Emulator(tmp_path / "cache").is_ready()
    with pytest.raises(MobileVLMError, match="QEMU_CPU='cortex-x9' is not one of"):
        Emulator(tmp_path / "cache", cpu="cortex-x9").cpu_facts()


def cold_reason() -> str | None:
    if not shutil.which(emulator_target.QEMU):
        return f"{emulator_target.QEMU} is not installed (apt-get install qemu-user-static)"
    if not Emulator().is_ready():
        return f"emulator cache {Emulator().cache} is cold: python -m mobilevlm.benchmarks.targets.emulator --build"
    return None


@pytest.fixture(scope="module")
def warm():
    reason = cold_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory, micro_checkpoint):
    out = tmp_path_factory.mktemp("emu") / "onnx-bundle"
    pipeline.export_bundle(out, "onnx", ("fp32",), micro_checkpoint, num_parity_cases=1, eval_scenes=0, log=lambda s: None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("which", ["executorch", "onnx"])
def test_emulated_artifacts_give_the_host_tokens(warm, which, micro_bundle, request):
    bundle = micro_bundle if which == "executorch" else request.getfixturevalue("onnx_bundle")
    name = "executorch-fp32" if which == "executorch" else "onnx-fp32"
    lines: list[str] = []
    records = run_bench(bundle, target="emulator", repeats=5, decode_tokens=32, only=(name,), log=lines.append)
    [record] = records
    assert "error" not in record, record.get("error")
    assert record["target"] == "emulator" and record["emulated"] is True and record["contender"] == name
    emulator = record["emulator"]
    assert emulator["cpu"] == "cortex-a76" and "asimddp" in emulator["cpu_features"] and "sve" not in emulator["cpu_features"]
    assert "not phone times" in emulator["note"] and emulator["versions"]["torch"].startswith("2.13")
    check = record["host_check"]
    assert check["identical"] and len(check["emulated_tokens"]) == EMULATED["greedy_tokens"]
    assert check["emulated_tokens"] == check["host_tokens"] and check["first_top10_ids_identical"]
    assert check["first_top10_max_abs_logit_diff"] < 1e-3
    m = record["metrics"]  # capped for the emulator: one run of a few tokens
    assert m["decode_tok_s"]["n"] == 1 and m["decode_tokens"] <= 4 and m["decode_tok_s"]["median"] > 0
    assert any("identical" in line for line in lines)


@pytest.mark.parametrize(
    "device, cpu",
    [("snapdragon-888", "cortex-a76"), ("snapdragon-8-gen-3", "max,sve=off,sme=off"), ("tensor-g3", "max,sve=off,sme=off"),
     ("raspberry-pi-5", "cortex-a76"), ("apple-m4", "max,sve=off")],
)
def test_device_profiles_choose_the_emulated_cpu(device, cpu):
    from mobilevlm.benchmarks.devices import get_device

    assert emulator_target.cpu_for_device(get_device(device)) == cpu


def test_emulating_a_non_arm_device_or_another_target_is_one_line(micro_bundle):
    from mobilevlm.benchmarks.devices import get_device

    with pytest.raises(MobileVLMError, match="not an ARM64 device"):
        emulator_target.cpu_for_device(get_device("intel-i7-10750h"))
    with pytest.raises(MobileVLMError, match="--emulate picks the emulated CPU"):
        run_bench(micro_bundle, target="host", emulate="snapdragon-8-gen-3", log=lambda s: None)


@pytest.mark.slow
def test_emulating_an_armv9_phone_takes_the_i8mm_paths_and_gives_the_host_tokens(warm, micro_bundle):
    records = run_bench(micro_bundle, target="emulator", repeats=1, decode_tokens=4, only=("executorch-8da4w-g32",),
                        emulate="snapdragon-8-gen-3", log=lambda s: None)
    [record] = records
    assert "error" not in record, record.get("error")
    emulator = record["emulator"]
    assert emulator["cpu"] == "max,sve=off,sme=off" and emulator["device_profile"] == "snapdragon-8-gen-3"
    assert {"i8mm", "bf16", "asimddp"} <= set(emulator["cpu_features"]) and not {"sve", "sve2", "sme"} & set(emulator["cpu_features"])
    assert record["host_check"]["identical"]
