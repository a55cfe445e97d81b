"""Device profiles: CPU clusters, SIMD features, memory bandwidth, NPU / GPU figures, each with its
public source (devices.json beside this file).

    get_device("sd888").peak_macs_per_s("int8", threads=4)   # fastest cores first
    get_device("snapdragon-8-gen-3").memory_gbs              # theoretical DRAM GB/s

The data file is checked when loaded: every device names a source for its CPU and memory figures,
every cluster names a known core, and the memory bandwidth agrees with transfers/s x bus width.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mobilevlm.errors import MobileVLMError

DATA = Path(__file__).with_name("devices.json")
FORMAT = "mobilevlm-devices/1"
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Core:
    name: str
    fp32_fma: int
    fp16_fma: int
    int8_mac: int
    int8_mac_i8mm: int | None

    def macs_per_cycle(self, precision: str, i8mm: bool = False) -> int:
        if precision == "int8":
            return self.int8_mac_i8mm if i8mm and self.int8_mac_i8mm else self.int8_mac
        return {"fp32": self.fp32_fma, "fp16": self.fp16_fma, "bf16": self.fp16_fma}[precision]


@dataclass(frozen=True)
class Cluster:
    core: Core
    count: int
    ghz: float


@dataclass(frozen=True)
class Device:
    id: str
    name: str
    kind: str
    clusters: tuple[Cluster, ...]
    features: tuple[str, ...]
    memory_type: str
    memory_gbs: float
    raw: dict

    @property
    def cores(self) -> int:
        return sum(c.count for c in self.clusters)

    def cores_used(self, threads: int) -> list[tuple[Core, float]]:
        """The cores `threads` threads run on: fastest cluster first (what a scheduler does for a
        busy thread pool), one thread per core; more threads than cores add nothing."""
        if threads < 1:
            raise MobileVLMError(f"threads must be at least 1, got {threads}")
        ranked = sorted(self.clusters, key=lambda c: c.core.int8_mac * c.ghz, reverse=True)
        used: list[tuple[Core, float]] = []
        for cluster in ranked:
            for _ in range(cluster.count):
                if len(used) < threads:
                    used.append((cluster.core, cluster.ghz))
        return used

    def peak_macs_per_s(self, precision: str, threads: int, i8mm: bool = False, static_split: bool = False) -> float:
        """Peak multiply-accumulates per second of `threads` CPU cores (no efficiency applied).

        `static_split`: the runtime hands every thread an equal share and waits for all of them
        (ggml's thread pool), so each thread runs at the pace of the slowest core used."""
        if precision not in ("fp32", "fp16", "bf16", "int8"):
            raise MobileVLMError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        use_i8mm = i8mm and "i8mm" in self.features
        per_core = [core.macs_per_cycle(precision, use_i8mm) * ghz * 1e9 for core, ghz in self.cores_used(threads)]
        return len(per_core) * min(per_core) if static_split else sum(per_core)

    @property
    def gpu(self) -> dict | None:
        return self.raw.get("gpu")

    @property
    def npu(self) -> dict | None:
        return self.raw.get("npu")

    def describe_cpu(self) -> str:
        return " + ".join(f"{c.count}x {c.core.name} {c.ghz:g} GHz" for c in self.clusters)


def _check(data: dict, path: Path) -> None:
    if data.get("format") != FORMAT:
        raise MobileVLMError(f"{path}: field 'format' must be {FORMAT!r}")
    cores = data.get("cores", {})
    for key, device in data.get("devices", {}).items():
        where = f"{path}: devices.{key}"
        for part in ("cpu", "memory"):
            if not isinstance(device.get(part), dict) or not device[part].get("source"):
                raise MobileVLMError(f"{where}.{part}: missing 'source' (every figure names its public source)")
        for i, cluster in enumerate(device["cpu"].get("clusters", [])):
            if cluster.get("core") not in cores:
                raise MobileVLMError(f"{where}.cpu.clusters[{i}]: unknown core {cluster.get('core')!r}; expected one of {', '.join(cores)}")
        memory = device["memory"]
        computed = memory["mt_s"] * memory["bus_bits"] / 8 / 1000
        if abs(computed - memory["bandwidth_gbs"]) > 0.03 * computed:
            raise MobileVLMError(f"{where}.memory: bandwidth_gbs {memory['bandwidth_gbs']} disagrees with mt_s x bus_bits / 8 = {computed:.1f} GB/s")
        for part in ("npu", "gpu"):
            if device.get(part) and not device[part].get("source"):
                raise MobileVLMError(f"{where}.{part}: missing 'source'")
        npu = device.get("npu") or {}
        if npu.get("ane_bandwidth_gbs") and not npu.get("ane_bandwidth_source"):
            raise MobileVLMError(f"{where}.npu: ane_bandwidth_gbs needs 'ane_bandwidth_source' (a measured Neural Engine bandwidth names its measurement)")


@lru_cache(maxsize=4)
def load_devices(path: Path = DATA) -> dict[str, Device]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MobileVLMError(f"{path}: no such device data file") from None
    except json.JSONDecodeError as exc:
        raise MobileVLMError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    _check(data, Path(path))
    cores = {name: Core(name, c["fp32_fma"], c["fp16_fma"], c["int8_mac"], c.get("int8_mac_i8mm")) for name, c in data["cores"].items()}
    devices = {}
    for key, d in data["devices"].items():
        clusters = tuple(Cluster(cores[c["core"]], c["count"], c["ghz"]) for c in d["cpu"]["clusters"])
        devices[key] = Device(key, d["name"], d["kind"], clusters, tuple(d["cpu"].get("features", ())), d["memory"]["type"], d["memory"]["bandwidth_gbs"], d)
    return devices


def _normal(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def get_device(name: str, path: Path = DATA) -> Device:
    """A device by id, alias or display name (case-insensitive); an unknown one is an error listing the known ids."""
    devices = load_devices(path)
    wanted = _normal(name)
    for key, device in devices.items():
        if wanted in {key, _normal(device.name), *(_normal(a) for a in device.raw.get("aliases", ()))}:
            return device
    raise MobileVLMError(f"unknown device {name!r}; expected one of {', '.join(devices)}")


def core_table(path: Path = DATA) -> dict[str, dict]:
    return json.loads(Path(path).read_text())["cores"]


def device_table_markdown(path: Path = DATA) -> str:
    """One row per device with its figures and sources: what the projection believes about each device."""
    rows = ["| device | CPU | SIMD | memory | GB/s | NPU / GPU | sources (estimated: why) |", "|---|---|---|---|---|---|---|"]
    for device in load_devices(path).values():
        d = device.raw
        accel = []
        if d.get("npu"):
            accel.append(f"{d['npu']['name']}" + (f" {d['npu']['int8_tops']} TOPS int8" if d["npu"].get("int8_tops") else "")
                         + (f" {d['npu']['fp16_tops']:g} TOPS fp16" if d["npu"].get("fp16_tops") else "")
                         + (f", {d['npu']['ane_bandwidth_gbs']:g} GB/s measured" if d["npu"].get("ane_bandwidth_gbs") else ""))
        if d.get("gpu"):
            accel.append(d["gpu"]["name"] + (f" ({d['gpu']['fp32_tflops']} fp32 TFLOPS)" if d["gpu"].get("fp32_tflops") else ""))
        sources = []
        for part in ("cpu", "memory", "npu", "gpu"):
            if d.get(part):
                sources.append(f"{part}: {d[part]['source']}" + (f" (estimated: {d[part]['estimated']})" if d[part].get("estimated") else "")
                               + (f" (fp16 estimated: {d[part]['fp16_estimated']})" if d[part].get("fp16_estimated") else "")
                               + (f" (Neural Engine GB/s: {d[part]['ane_bandwidth_source']})" if d[part].get("ane_bandwidth_source") else ""))
        memory = d["memory"]
        rows.append(f"| {device.name} | {device.describe_cpu()} | {', '.join(device.features)} | {memory['type']} {memory['mt_s']} MT/s x {memory['bus_bits']} bit "
                    f"| {device.memory_gbs:g} | {'; '.join(accel) or '-'} | {'<br>'.join(sources)} |")
    return "\n".join(rows)
