"""Reports built from result records only: a Markdown table per (target, threads)."""

from __future__ import annotations

from collections import defaultdict


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


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
        out.append(f"CPU: {rows[0]['machine']['cpu']['model']}; memory bandwidth {rows[0]['machine'].get('memory_bandwidth_gbs', '-')} GB/s; figures are median (min-max)\n")
        head = ["contender", "quantization", "file MB", "load s", "image encode ms", "time to first token ms"]
        head += [f"prefill tok/s @{n}" for n in lengths] + ["decode tok/s", "peak RSS MB", "token agreement"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in rows:
            if "metrics" not in r:
                reason = r.get("skipped") or r.get("error")
                out.append(f"| {r['contender']} | {r['quantization']} | " + " | ".join(["-"] * (len(head) - 3)) + f" | {'skipped' if 'skipped' in r else 'failed'}: {reason} |")
                continue
            m = r["metrics"]
            agreement = r.get("parity", {}).get("token_agreement")
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
