"""Roofline projection of a model's latency on a device, validated against published measurements.

    decode s/token = (weight bytes + KV-cache bytes read per token) / (device GB/s x bandwidth eff.)
                     + decode MACs / (peak MACs/s of the cores used x gemv eff.)
    prefill s      = prompt MACs / (peak x gemm eff.) + weight bytes / effective bandwidth
    image encode s = vision MACs / (peak at the vision precision x encode eff.)
    TTFT           = image encode + prefill of the whole prompt (image tokens included)

Bytes come from the model config and the quantization recipe (`counting.weight_format`: bits per weight
including scales, per tensor class: block linears, output head, one embedding row, vision weights).
Peaks come from the device profile (cores used fastest first, per-cycle MACs of each core type).

Core ML (`coreml-ane`) runs on the Apple Neural Engine: peak = the Neural Engine's fp16 rate, and the
decode read stream is limited by the Neural Engine's own measured bandwidth (ANEMLL-bench), not by the
DRAM's; Core ML artifacts cannot run off Apple hardware, so their projection is made from the model
config and the recipe alone (no host measurement exists to scale it).

The efficiency factors belong to a runtime (`PROFILES`), not to a device: they are solved from the
published figures marked `calibration` (`published.py`) (geometric mean when several), and every other
published figure is `held-out`: `validate()` projects each and reports the error. The projection of
one of our own artifacts uses the profile of its runtime family, scaled by how our artifact compares
with that runtime on this host when both were measured here (`host_calibration`, from results.jsonl).

    python -m mobilevlm.benchmarks.projection        # the validation table and the device table
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from mobilevlm.config import MobileVLMConfig
from mobilevlm.errors import MobileVLMError

from .counting import (  # noqa: F401  (re-exported: the projection's public names)
    LLAMA_2_7B, LLAMA_3_2_1B, LLAMA_3_2_3B, LLAMA_3_8B, TEXT_MODELS, DecodeCount, WeightFormat, block_linear_params, coreml_weight_format,
    decode_count, model_config, prefill_macs, vision_macs, weight_format,
)
from .devices import Device, get_device
from .published import COREML_LLM_CLI, EXECUTORCH_LLAMA, LLAMA_CPP_MOBILEVLM, PUBLISHED, PublishedFigure  # noqa: F401


# --- runtime profiles --------------------------------------------------------------------------------


# ANEMLL-bench (github.com/Anemll/anemll-bench, Results.MD) measured the base M1's Neural Engine at
# 60.87 GB/s of its 68.25 GB/s DRAM (LPDDR4X-4266 x 128 bit): where a device's Neural Engine bandwidth
# has not been measured (every iPhone), this fraction of its DRAM bandwidth stands in.
ANE_DRAM_FRACTION = 0.89


@dataclass(frozen=True)
class RuntimeProfile:
    name: str
    processor: str  # cpu | gpu
    description: str
    i8mm: bool  # whether its int8 kernels use SMMLA on cores that have it
    static_split: bool = False  # equal work per thread + barrier: every thread runs at the slowest core's pace
    overhead_ms: float = 0.0  # fixed per decoded token (documented where used)
    fixed_bandwidth: float | None = None  # bandwidth efficiency set, not solved (the device figure is already a measured rate)


PROFILES: dict[str, RuntimeProfile] = {
    "llama.cpp-cpu-arm": RuntimeProfile("llama.cpp-cpu-arm", "cpu", "llama.cpp / ggml ARM NEON kernels of early 2024 (the MobileVLM figures): q4_K x q8_K "
                                        "dot products, prefill as repeated dot products (no GEMM tiling, no i8mm), f16 CLIP; ggml splits each "
                                        "matmul evenly over the threads and waits at a barrier", False, static_split=True),
    "llama.cpp-cpu-x86": RuntimeProfile("llama.cpp-cpu-x86", "cpu", "llama.cpp / ggml AVX2 kernels of early 2024: a different code path from ARM's, "
                                        "so its own efficiencies", False, static_split=True),
    "llama.cpp-cuda": RuntimeProfile("llama.cpp-cuda", "gpu", "llama.cpp CUDA backend of early 2024 on a Jetson GPU (all layers offloaded)", False),
    "executorch-xnnpack": RuntimeProfile("executorch-xnnpack", "cpu", "ExecuTorch 0.4+ with XNNPACK and KleidiAI: 8da4w GEMM / GEMV with i8mm, fp32 KV cache, custom SDPA", True),
    "coreml-ane": RuntimeProfile("coreml-ane", "ane", "Core ML on the Apple Neural Engine: fp16 arithmetic (weight-only compression decompressed on the fly), "
                                 "fp16 KV cache; reads stream at the Neural Engine's measured bandwidth (ANEMLL-bench) where known, else at "
                                 f"{ANE_DRAM_FRACTION} x DRAM; the GEMM efficiency is solved from decode figures (no published prefill figure)", False,
                                 fixed_bandwidth=1.0),
}

# Which runtime profile projects an artifact of each of our backends. ONNX Runtime has no published
# phone figure here: its artifacts borrow the XNNPACK profile (labelled as a proxy in the record).
BACKEND_PROFILE = {"executorch": "executorch-xnnpack", "gguf": "llama.cpp-cpu-arm", "llama.cpp": "llama.cpp-cpu-arm", "onnx": "executorch-xnnpack",
                   "coreml": "coreml-ane"}
PROXY_BACKENDS = {"onnx"}
# Backends that cannot be timed on this host (benchmarks/runner.py NOT_MEASURED): their records carry no
# metrics and are projected from the model config and recipe alone, onto Apple devices only.
UNMEASURED_BACKENDS = {"coreml"}
COREML_DEVICES = ("apple-a17-pro", "apple-a18-pro", "apple-m4")  # when no requested device has a Neural Engine figure
COREML_NOTE = ("projected only: Core ML runs on Apple hardware alone, so no host measurement of this artifact exists (nothing scales it); "
               "assumes Core ML places the programs on the Neural Engine (a decoder with a flexible sequence length (RangeDim) may be "
               "placed on the GPU or CPU instead); its prefill and image-encode figures have no published check (the profile's GEMM "
               "efficiency is solved from decode figures)")


@dataclass(frozen=True)
class Efficiency:
    bandwidth: float  # fraction of theoretical DRAM GB/s reached by the decode read stream
    gemm: float  # fraction of peak MACs in prefill
    encode: float  # fraction of peak MACs in the image encoder
    calibrated_on: tuple[str, ...]


def _peak(device: Device, profile: RuntimeProfile, precision: str, threads: int, i8mm: bool) -> float:
    if profile.processor == "ane":
        npu = device.npu or {}
        if not npu.get("fp16_tops"):
            raise MobileVLMError(f"device {device.id} has no Neural Engine fp16 throughput in the device data; runtime {profile.name} needs one")
        return npu["fp16_tops"] * 1e12 / 2  # MACs/s; our Core ML recipes compress weights only, arithmetic is fp16
    if profile.processor == "gpu":
        gpu = device.gpu or {}
        if not gpu.get("fp16_dense_tflops"):
            raise MobileVLMError(f"device {device.id} has no GPU throughput in the device data; runtime {profile.name} needs one")
        return gpu["fp16_dense_tflops"] * 1e12 / 2  # MACs/s, int8 and fp16 both run as fp16 tensor-core math here
    return device.peak_macs_per_s(precision, threads, i8mm and profile.i8mm, profile.static_split)


def memory_gbs(device: Device, profile: RuntimeProfile) -> float:
    """The GB/s the runtime's read stream is limited by: DRAM, or the Neural Engine's own ceiling."""
    if profile.processor != "ane":
        return device.memory_gbs
    measured = (device.npu or {}).get("ane_bandwidth_gbs")
    return min(measured, device.memory_gbs) if measured else device.memory_gbs * ANE_DRAM_FRACTION


def runtime_weight_format(recipe: str, runtime: str) -> WeightFormat:
    """Core ML recipes on the Core ML profile count Core ML's bytes (fp16 scales); every other name as `weight_format`."""
    if PROFILES[runtime].processor == "ane":
        try:
            return coreml_weight_format(recipe)
        except MobileVLMError:
            pass
    return weight_format(recipe)


def _parts(figure_or_args, eff: Efficiency | None = None) -> dict:
    """The times of each term for a figure under given efficiencies (None: unit efficiency)."""
    f = figure_or_args
    text, config = model_config(f.model)
    fmt = runtime_weight_format(f.recipe, f.runtime)
    device, profile = get_device(f.device), PROFILES[f.runtime]
    bw = memory_gbs(device, profile) * 1e9 * (eff.bandwidth if eff else 1.0)
    gemm = _peak(device, profile, fmt.compute, f.threads, fmt.i8mm) * (eff.gemm if eff else 1.0)
    out = {}
    if f.metric == "encode_s":
        out["compute"] = vision_macs(config) / (_peak(device, profile, fmt.vision_compute, f.threads, fmt.i8mm) * (eff.encode if eff else 1.0))
        out["memory"] = 0.0
    elif f.metric == "prefill_tok_s":
        out["compute"] = prefill_macs(text, f.tokens) / gemm
        out["memory"] = decode_count(text, fmt, 0).weight_bytes / bw
    else:
        count = decode_count(text, fmt, f.tokens)
        out["compute"] = f.positions * count.macs / gemm  # decode matmuls run at the prefill kernels' efficiency
        out["memory"] = count.bytes / bw
        out["overhead"] = profile.overhead_ms / 1e3
    return out


def _measured_seconds(f: PublishedFigure) -> float:
    return f.value if f.metric == "encode_s" else (f.tokens / f.value if f.metric == "prefill_tok_s" else 1 / f.value)


def _geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


@lru_cache(maxsize=None)
def calibrate(runtime: str) -> Efficiency:
    """Solve the runtime's efficiencies from its `calibration` figures: compute efficiencies first
    (prefill and encode are compute-bound), then bandwidth from decode time minus its compute part;
    alternate twice because prefill also reads the weights once."""
    figures = [f for f in PUBLISHED if f.runtime == runtime and f.role == "calibration"]
    if not figures:
        raise MobileVLMError(f"runtime {runtime!r} has no calibration figure")
    profile = PROFILES[runtime]
    eff = Efficiency(profile.fixed_bandwidth or 0.5, 0.1, 0.1, tuple(f.id for f in figures))
    for _ in range(3):
        gemm = [f for f in figures if f.metric == "prefill_tok_s"]
        encode = [f for f in figures if f.metric == "encode_s"]
        decode = [f for f in figures if f.metric == "decode_tok_s"]
        g = _geomean([(_parts(f, Efficiency(eff.bandwidth, 1, 1, ()))["compute"]) / (_measured_seconds(f) - _parts(f, eff)["memory"]) for f in gemm]) if gemm else eff.gemm
        if profile.fixed_bandwidth is not None:
            # bandwidth known: the decode time left after the reads is compute, which gives the GEMM efficiency
            g = _geomean([_decode_gemm(f, eff.bandwidth) for f in decode]) if decode and not gemm else g
            e = _geomean([_parts(f)["compute"] / _measured_seconds(f) for f in encode]) if encode else g
            eff = Efficiency(eff.bandwidth, g, e, eff.calibrated_on)
            continue
        # no published encode figure for a runtime: its vision encoder is GEMM work, so the GEMM efficiency stands in
        e = _geomean([_parts(f)["compute"] / _measured_seconds(f) for f in encode]) if encode else g
        bws = []
        for f in decode:
            parts = _parts(f, Efficiency(1.0, g, e, ()))
            left = _measured_seconds(f) - parts["compute"] - parts.get("overhead", 0)
            if left <= 0:
                raise MobileVLMError(f"{f.id}: compute alone explains the measured decode time; the profile cannot be calibrated on it")
            bws.append(parts["memory"] / left)
        b = _geomean(bws) if bws else eff.bandwidth
        eff = Efficiency(b, g, e, eff.calibrated_on)
    return eff


def _decode_gemm(f: PublishedFigure, bandwidth: float) -> float:
    parts = _parts(f, Efficiency(bandwidth, 1, 1, ()))
    left = _measured_seconds(f) - parts["memory"] - parts.get("overhead", 0)
    if left <= 0:
        raise MobileVLMError(f"{f.id}: the reads alone explain the measured decode time; the profile's GEMM efficiency cannot be solved from it")
    return parts["compute"] / left


# --- projection ----------------------------------------------------------------------------------------


@dataclass
class Projection:
    device: str
    runtime: str
    model: str
    recipe: str
    threads: int
    encode_s: float | None
    prefill_tok_s: dict[int, float]
    decode_tok_s: float
    ttft_s: float | None
    prompt_tokens: int
    decode_bound: str  # memory | compute
    bytes_per_token: float
    efficiency: Efficiency
    notes: list[str] = field(default_factory=list)


def project(model: str | MobileVLMConfig, recipe: str, device: str, threads: int, runtime: str,
            context: int = 256, prompt_lengths: tuple[int, ...] = (16, 64), text_prompt_tokens: int = 64,
            bandwidth_scale: float = 1.0, model_name: str | None = None, decode_positions: int = 1) -> Projection:
    """Project one model (a preset / text-model name or a config) at one recipe on one device."""
    if runtime not in PROFILES:
        raise MobileVLMError(f"unknown runtime {runtime!r}; expected one of {', '.join(PROFILES)}")
    dev = get_device(device)
    if isinstance(model, MobileVLMConfig):
        text, config, name = model.text, model, model_name or "bundle model"
    else:
        (text, config), name = model_config(model), model
    fmt, profile, eff = runtime_weight_format(recipe, runtime), PROFILES[runtime], calibrate(runtime)
    bw = memory_gbs(dev, profile) * 1e9 * eff.bandwidth * bandwidth_scale
    gemm = _peak(dev, profile, fmt.compute, threads, fmt.i8mm) * eff.gemm
    count = decode_count(text, fmt, context)
    t_mem, t_cmp = count.bytes / bw, decode_positions * count.macs / gemm
    decode_s = t_mem + t_cmp + profile.overhead_ms / 1e3
    weight_s = decode_count(text, fmt, 0).weight_bytes / bw
    prefill = {n: n / (prefill_macs(text, n) / gemm + weight_s) for n in prompt_lengths}
    encode_s = ttft = None
    prompt = text_prompt_tokens
    if config is not None:
        encode_s = vision_macs(config) / (_peak(dev, profile, fmt.vision_compute, threads, fmt.i8mm) * eff.encode)
        prompt = text_prompt_tokens + config.num_image_tokens
        ttft = encode_s + prefill_macs(text, prompt) / gemm + weight_s
    notes = []
    if profile.processor == "ane":
        notes.append(f"Neural Engine at {memory_gbs(dev, profile):.3g} GB/s " + ("(measured)" if (dev.npu or {}).get("ane_bandwidth_gbs") else f"({ANE_DRAM_FRACTION} x DRAM, not measured)")
                     + "; the thread count does not apply")
    if dev.kind != "laptop" and profile.processor == "cpu" and threads > dev.cores:
        notes.append(f"{threads} threads on {dev.cores} cores: extra threads add nothing")
    return Projection(dev.id, runtime, name, recipe, threads, encode_s, prefill, 1 / decode_s, ttft, prompt,
                      "memory" if t_mem >= t_cmp else "compute", count.bytes, eff, notes)


def project_figure(f: PublishedFigure) -> float:
    p = project(f.model, f.recipe, f.device, f.threads, f.runtime, context=max(f.tokens, 1), prompt_lengths=(max(f.tokens, 1),), decode_positions=f.positions)
    if f.metric == "encode_s":
        return p.encode_s
    if f.metric == "prefill_tok_s":
        return p.prefill_tok_s[f.tokens]
    return p.decode_tok_s


@dataclass(frozen=True)
class ValidationRow:
    figure: PublishedFigure
    projected: float

    @property
    def error(self) -> float:
        """Signed relative error of the projection against the published figure."""
        return self.projected / self.figure.value - 1


def validate(figures: tuple[PublishedFigure, ...] = PUBLISHED) -> list[ValidationRow]:
    return list(_validate(figures))


@lru_cache(maxsize=8)
def _validate(figures: tuple[PublishedFigure, ...]) -> tuple[ValidationRow, ...]:
    return tuple(ValidationRow(f, project_figure(f)) for f in figures)


UNITS = {"decode_tok_s": "tok/s", "prefill_tok_s": "tok/s", "encode_s": "s"}


def validation_markdown(rows: list[ValidationRow] | None = None) -> str:
    rows = rows if rows is not None else validate()
    out = ["| figure | model | recipe | device | threads | runtime | metric | published | projected | error | role |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r.figure
        flag = "" if abs(r.error) <= 0.25 else " **over 25%**"
        out.append(f"| {f.id} | {f.model} | {f.recipe} | {f.device} | {f.threads} | {f.runtime} | {f.metric} | {f.value:g} {UNITS[f.metric]} "
                   f"| {r.projected:.3g} {UNITS[f.metric]} | {100 * r.error:+.1f}%{flag} | {f.role} |")
    out.append("")
    for runtime in PROFILES:
        eff = calibrate(runtime)
        held = [abs(r.error) for r in rows if r.figure.runtime == runtime and r.figure.role == "held-out"]
        summary = f"max held-out error {100 * max(held):.0f}%" if held else "no held-out figure"
        out.append(f"- `{runtime}`: bandwidth efficiency {eff.bandwidth:.3f}, GEMM efficiency {eff.gemm:.3f}, encode efficiency {eff.encode:.3f} "
                   f"(calibrated on {', '.join(eff.calibrated_on)}); {summary}")
    sources = sorted({r.figure.source for r in rows})
    out += ["", "Sources: " + "; ".join(sources)]
    return "\n".join(out)


def held_out_error(runtime: str, metric: str | None = None) -> float | None:
    """The largest held-out error of a runtime profile (for one metric, or any): the band a projection carries."""
    errors = [abs(r.error) for r in validate() if r.figure.runtime == runtime and r.figure.role == "held-out" and (metric is None or r.figure.metric == metric)]
    return max(errors) if errors else None


# --- host calibration (from results.jsonl records) -------------------------------------------------------


def record_config(record: dict) -> MobileVLMConfig | None:
    """The model config of a record: its `model_config` field, else its bundle's manifest when the bundle is on this machine."""
    data = record.get("model_config")
    if data is None:
        manifest = Path(record.get("bundle", "")) / "manifest.json"
        if not manifest.is_file():
            return None
        data = json.loads(manifest.read_text()).get("model", {}).get("config")
    return MobileVLMConfig.from_dict(data, source=f"{record.get('bundle', 'record')}: model config") if data else None


CACHE_RESIDENT_BYTES = 64e6


def host_calibration(records: list[dict]) -> list[dict]:
    """What each measured contender reaches on this host: decode GB/s against the host's probed
    memory bandwidth (benchmarks/machine.py), and prefill GMAC/s. Records of other targets, projected
    or emulated records, skipped or failed ones are left out."""
    out = []
    for r in records:
        if r.get("projected") or r.get("emulated") or r.get("target") != "host" or "metrics" not in r:
            continue
        config = record_config(r)
        if config is None:
            continue
        try:
            fmt = weight_format(r["quantization"])
        except MobileVLMError:
            continue
        m = r["metrics"]
        context = int(m.get("prompt_tokens", 0)) + int(m.get("decode_tokens", 0)) // 2
        decode = m["decode_tok_s"]["median"]
        gbs = decode * decode_count(config.text, fmt, context).bytes / 1e9
        probe = r.get("machine", {}).get("memory_bandwidth_gbs")
        prefill = {int(n): v["median"] * prefill_macs(config.text, int(n)) / int(n) / 1e9 for n, v in m.get("prefill_tok_s", {}).items()}
        weights = decode_count(config.text, fmt, 0).weight_bytes
        out.append({"contender": r["contender"], "backend": r["backend"], "quantization": r["quantization"], "threads": r["threads"],
                    "decode_gbs": gbs, "probe_gbs": probe, "bandwidth_vs_probe": gbs / probe if probe else None,
                    "prefill_gmacs": prefill, "weight_mb": weights / 1e6,
                    # weights that fit in the last-level cache never stream from DRAM: not a bandwidth measurement
                    "cache_resident": weights < CACHE_RESIDENT_BYTES})
    return out


# --- projected records ------------------------------------------------------------------------------------


def _spread(value: float | None, band: float | None) -> dict | None:
    if value is None:
        return None
    band = band or 0.0
    return {"median": value, "min": value * (1 - band), "max": value * (1 + band), "n": 0}


def projected_record(base: dict, projection: Projection, note: str = "") -> dict:
    """A record in the results schema for one projection: `projected: true`, target = the device;
    min / max are the projection widened by its runtime's largest held-out validation error."""
    dev = get_device(projection.device)
    band_decode = held_out_error(projection.runtime, "decode_tok_s")
    band_prefill = held_out_error(projection.runtime, "prefill_tok_s")
    band_encode = held_out_error(projection.runtime, "encode_s")
    metrics = {
        "image_encode_ms": _spread(projection.encode_s * 1e3 if projection.encode_s is not None else None, band_encode),
        "ttft_ms": _spread(projection.ttft_s * 1e3 if projection.ttft_s is not None else None, max(filter(None, [band_prefill, band_encode]), default=None)),
        "prompt_tokens": projection.prompt_tokens,
        "decode_tok_s": _spread(projection.decode_tok_s, band_decode),
        "prefill_tok_s": {str(n): _spread(v, band_prefill) for n, v in projection.prefill_tok_s.items()},
        "load_s": None, "peak_rss_mb": None, "file_mb": base.get("metrics", {}).get("file_mb", base.get("file_mb")),
    }
    from .runner import SCHEMA

    return {
        "schema": SCHEMA, "bundle": base.get("bundle", "-"), "target": dev.id, "emulated": False, "projected": True,
        "machine": {"cpu": {"model": f"{dev.name} (projected)", "machine": "projection", "flags": list(dev.features), "logical_cores": dev.cores},
                    "memory_gib": None, "memory_bandwidth_gbs": dev.memory_gbs},
        "versions": base.get("versions", {}), "git_commit": base.get("git_commit"),
        "contender": base.get("contender", projection.model), "backend": base.get("backend", projection.runtime),
        "quantization": projection.recipe, "threads": projection.threads, "parity": base.get("parity"),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "projection": {"runtime": projection.runtime, "device": dev.id, "model": projection.model, "decode_bound": projection.decode_bound,
                       "bytes_per_token": projection.bytes_per_token,
                       "efficiency": {"bandwidth": projection.efficiency.bandwidth, "gemm": projection.efficiency.gemm, "encode": projection.efficiency.encode},
                       "calibrated_on": list(projection.efficiency.calibrated_on),
                       "max_held_out_error": {"decode_tok_s": band_decode, "prefill_tok_s": band_prefill, "encode_s": band_encode},
                       "note": "; ".join(filter(None, [note, *projection.notes]))},
        "metrics": metrics,
    }


def project_records(records: list[dict], devices: list[str], threads: tuple[int, ...] | None = None) -> list[dict]:
    """Projected records for every measured host record whose backend has a runtime profile, on each device,
    and for every Core ML record (not measurable here) on the Apple devices (`_project_unmeasured`).

    When ExecuTorch's or llama.cpp's own export of the same weights was measured on this host too
    (a record whose contender starts with `peer-`), our artifact's bandwidth efficiency is scaled by
    its host ratio to that peer: the device efficiency is the published runtime's, the difference
    between our artifact and that runtime is what this host measured."""
    calibrations = {c["contender"]: c for c in host_calibration(records)}
    out = []
    for device in devices:
        get_device(device)  # an unknown device fails before any work
    out += _project_unmeasured(records, devices)
    for r in records:
        if r.get("projected") or r.get("emulated") or "metrics" not in r or r.get("target") != "host" or r.get("backend") in UNMEASURED_BACKENDS:
            continue
        runtime = BACKEND_PROFILE.get(r["backend"])
        config = record_config(r)
        if runtime is None or config is None:
            continue
        try:
            weight_format(r["quantization"])
        except MobileVLMError:
            continue
        scale, note = 1.0, "no peer of this runtime measured on the host: the published runtime's efficiency is used as is"
        mine = calibrations.get(r["contender"])
        peers = [c for c in calibrations.values() if c["contender"].startswith("peer-") and BACKEND_PROFILE.get(c["backend"]) == runtime]
        if mine and peers and mine["bandwidth_vs_probe"] and peers[0]["bandwidth_vs_probe"] and not mine["cache_resident"]:
            scale = mine["bandwidth_vs_probe"] / peers[0]["bandwidth_vs_probe"]
            note = f"bandwidth efficiency scaled by {scale:.2f}, this artifact's host decode GB/s relative to {peers[0]['contender']}"
        if r["backend"] in PROXY_BACKENDS:
            note = f"proxy: no published {r['backend']} phone figure, projected with the {runtime} profile; " + note
        m = r["metrics"]
        lengths = tuple(int(n) for n in m.get("prefill_tok_s", {})) or (16, 64)
        for device in devices:
            for n in threads or (4,):
                p = project(config, r["quantization"], device, n, runtime, context=int(m.get("prompt_tokens", 64)) + int(m.get("decode_tokens", 32)) // 2,
                            prompt_lengths=lengths, text_prompt_tokens=max(int(m.get("prompt_tokens", 64)) - config.num_image_tokens, 1),
                            bandwidth_scale=scale, model_name=Path(r.get("bundle", "")).name or "bundle")
                out.append(projected_record(r, p, note))
    return out


def _project_unmeasured(records: list[dict], devices: list[str]) -> list[dict]:
    """Projected records for artifacts this host cannot time (Core ML): from the record's model config
    and recipe alone, onto the requested devices that have a Neural Engine figure, else onto
    COREML_DEVICES. One record per artifact and device (the runner writes one skipped record per
    thread count; the Neural Engine has no thread count). Prompt: 64 text tokens after the image,
    32 decoded tokens (the bench defaults)."""
    out, seen = [], set()
    for r in records:
        if r.get("projected") or r.get("emulated") or r.get("target") != "host" or r.get("backend") not in UNMEASURED_BACKENDS or "error" in r:
            continue
        if r["contender"] in seen:
            continue
        runtime, config = BACKEND_PROFILE[r["backend"]], record_config(r)
        if config is None:
            continue
        try:
            runtime_weight_format(r["quantization"], runtime)
        except MobileVLMError:
            continue
        seen.add(r["contender"])
        profile = PROFILES[runtime]
        targets = [d for d in devices if _has_npu(get_device(d))] or list(COREML_DEVICES)
        for device in dict.fromkeys(get_device(d).id for d in targets):
            p = project(config, r["quantization"], device, 1, runtime, context=64 + config.num_image_tokens + 16, prompt_lengths=(16, 64),
                        text_prompt_tokens=64, model_name=Path(r.get("bundle", "")).name or "bundle")
            record = projected_record(r, p, COREML_NOTE if profile.processor == "ane" else "projected only: no host measurement exists")
            record["threads"] = r.get("threads", 1)
            out.append(record)
    return out


def _has_npu(device: Device) -> bool:
    return bool((device.npu or {}).get("fp16_tops"))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .devices import device_table_markdown

    parser = argparse.ArgumentParser(description="Print the projection's validation against published figures, and the device table.")
    parser.add_argument("--devices", action="store_true", help="also print the device table with sources")
    args = parser.parse_args(argv)
    print(validation_markdown())
    if args.devices:
        print("\n" + device_table_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
