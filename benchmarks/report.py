"""Reports built from result records only: a Markdown table per (target, threads), the projected
figures with their validation, and PNG charts (benchmarks/charts.py).

    mobilevlm report results.jsonl [--out DIR]      ->  DIR/report.md + DIR/*.png

Measured, emulated and projected records are told apart everywhere: an emulated time is QEMU's,
a projected one is the roofline model's (benchmarks/projection.py), neither is a phone measurement.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from mobilevlm.errors import MobileVLMError

NOTES = {
    "emulated": "Emulated: times under QEMU user-mode emulation of an ARM64 CPU, hundreds of times slower than a phone; they prove the ARM kernels run, they are not phone times.",
    "projected": "Projected: computed by the roofline model (benchmarks/projection.py) from the device profile, not measured; min-max is the projection widened by its runtime profile's largest held-out validation error.",
}


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if 0 < abs(value) < 10 ** (1 - digits):  # emulated runs: 0.3 tok/s must not print as 0
        digits = max(digits, 2 - math.floor(math.log10(abs(value))))
    return f"{value:,.{digits}f}"


def _median(metric: dict | None) -> float | None:
    return None if not metric else metric.get("median")


def _range(metric: dict | None, digits: int = 1) -> str:
    if not metric:
        return "-"
    return f"{_fmt(metric['median'], digits)} ({_fmt(metric['min'], digits)}-{_fmt(metric['max'], digits)})"


def markdown_table(records: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        label = record["target"] + (" (emulated)" if record.get("emulated") else "") + (" (projected)" if record.get("projected") else "")
        groups[(label, record["threads"], record["bundle"])].append(record)
    out = []
    for (target, threads, bundle), rows in groups.items():
        lengths = sorted({int(n) for r in rows for n in r.get("metrics", {}).get("prefill_tok_s", {})})
        out.append(f"### {bundle} on {target}, {threads} thread(s)\n")
        for key in ("emulated", "projected"):
            if rows[0].get(key):
                out.append(f"> {NOTES[key]}\n")
        out.append(f"CPU: {rows[0]['machine']['cpu']['model']}; memory bandwidth {rows[0]['machine'].get('memory_bandwidth_gbs', '-')} GB/s; figures are median (min-max)\n")
        head = ["contender", "quantization", "file MB", "load s", "image encode ms", "time to first token ms"]
        head += [f"prefill tok/s @{n}" for n in lengths] + ["decode tok/s", "peak RSS MB", "token agreement"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in rows:
            if "metrics" not in r:
                reason = r.get("skipped") or r.get("error")
                size = _fmt(r["file_mb"]) if r.get("file_mb") else "-"
                out.append(f"| {r['contender']} | {r['quantization']} | {size} | " + " | ".join(["-"] * (len(head) - 4)) + f" | {'skipped' if 'skipped' in r else 'failed'}: {reason} |")
                continue
            m = r["metrics"]
            agreement = (r.get("parity") or {}).get("token_agreement")
            cells = [r["contender"], r["quantization"], _fmt(m["file_mb"]), _fmt(m["load_s"], 2), _range(m["image_encode_ms"], 2), _range(m["ttft_ms"], 1)]
            cells += [_range(m["prefill_tok_s"].get(str(n)), 0) for n in lengths]
            cells += [_range(m["decode_tok_s"], 1), _fmt(m["peak_rss_mb"], 0), "reference" if r["backend"] == "pytorch" else (f"{100 * agreement:.1f}%" if agreement is not None else "-")]
            out.append("| " + " | ".join(cells) + " |")
        reference = next((r for r in rows if r["backend"] == "pytorch" and "metrics" in r), None)
        if reference:
            base = _median(reference["metrics"]["decode_tok_s"])
            ratios = [f"{r['contender']} {_median(r['metrics']['decode_tok_s']) / base:.2f}x" for r in rows if "metrics" in r and r is not reference]
            if ratios:
                out.append(f"\nDecode speed relative to the PyTorch reference: {', '.join(ratios)}\n")
        out.append("")
    return "\n".join(out)


def projection_table(records: list[dict]) -> str:
    """One row per projected record: device, artifact, projected figures and how far to trust them."""
    rows = [r for r in records if r.get("projected") and "metrics" in r]
    if not rows:
        return ""
    out = ["| device | contender | quantization | threads | decode tok/s | prefill tok/s | image encode s | TTFT s | decode bound | runtime profile | largest held-out error (decode) | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, p = r["metrics"], r.get("projection", {})
        lengths = sorted(m.get("prefill_tok_s", {}), key=int)
        prefill = m["prefill_tok_s"][lengths[-1]] if lengths else None
        band = (p.get("max_held_out_error") or {}).get("decode_tok_s")
        encode, ttft = _median(m.get("image_encode_ms")), _median(m.get("ttft_ms"))
        out.append(f"| {r['target']} | {r['contender']} | {r['quantization']} | {r['threads']} | {_range(m['decode_tok_s'])} "
                   f"| {_fmt(_median(prefill), 0)}{f' @{lengths[-1]}' if lengths else ''} | {_fmt(encode / 1e3 if encode else None, 2)} "
                   f"| {_fmt(ttft / 1e3 if ttft else None, 2)} | {p.get('decode_bound', '-')} | {p.get('runtime', '-')} "
                   f"| {f'{100 * band:.0f}%' if band is not None else '-'} | {p.get('note', '')} |")
    return "\n".join(out)


def load_results(path: Path) -> list[dict]:
    """Records of a results.jsonl; a bad line is an error naming the file and the line."""
    from .runner import read_records

    records = read_records(Path(path))
    for number, record in enumerate(records, 1):
        for key in ("target", "contender", "backend", "quantization", "threads", "bundle", "machine"):
            if key not in record:
                raise MobileVLMError(f"{path}: record {number} has no field {key!r}")
    return records


def write_report(records: list[dict], out_dir: Path, title: str = "Benchmark report") -> list[Path]:
    """report.md and the PNG charts into out_dir; returns the files written (report.md first)."""
    from .charts import write_charts
    from .projection import validation_markdown

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = write_charts(records, out_dir)
    measured = [r for r in records if not r.get("projected")]
    text = [f"# {title}", "", f"{len(records)} record(s): {sum(1 for r in records if not r.get('projected') and not r.get('emulated'))} measured, "
            f"{sum(1 for r in records if r.get('emulated'))} emulated, {sum(1 for r in records if r.get('projected'))} projected.", ""]
    if measured:
        text += ["## Measured and emulated", "", markdown_table(measured), ""]
    projected = projection_table(records)
    if projected:
        text += ["## Projected (roofline model, not measured)", "", f"> {NOTES['projected']}", "", projected, ""]
    text += ["## Validation of the projection on published figures", "",
             "Reproduce: `python -m mobilevlm.benchmarks.projection --devices`", "", validation_markdown(), ""]
    if charts:
        text += ["## Charts", ""] + [f"![{p.stem}]({p.name})" for p in charts] + [""]
    report = out_dir / "report.md"
    report.write_text("\n".join(text))
    return [report, *charts]


def report_main(results_path: Path, out_dir: Path | None = None) -> list[Path]:
    """`mobilevlm report results.jsonl [--out DIR]`: DIR defaults to a `report` folder beside the results file."""
    results_path = Path(results_path)
    records = load_results(results_path)
    if not records:
        raise MobileVLMError(f"{results_path}: no records")
    return write_report(records, out_dir or results_path.with_name(results_path.stem + "-report"), title=f"Benchmark report: {results_path.name}")
