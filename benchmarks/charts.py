"""PNG charts from result records (matplotlib, headless). Each function writes one file and returns its
path, or None when the records hold nothing to draw. Emulated and projected figures are drawn apart
from measured ones (hatched, and named so in the label), never as measured phone numbers.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

DPI = 120
MEASURED, EMULATED, PROJECTED = "#1f77b4", "#ff7f0e", "#2ca02c"


def kind(record: dict) -> str:
    return "projected" if record.get("projected") else "emulated" if record.get("emulated") else "measured"


def target_label(record: dict) -> str:
    k = kind(record)
    return record["target"] + ("" if k == "measured" else f" [{k}]")


def _median(metric) -> float | None:
    return metric.get("median") if isinstance(metric, dict) else None


def _err(metric) -> tuple[float, float]:
    if not isinstance(metric, dict) or metric.get("min") is None:
        return 0.0, 0.0
    return max(metric["median"] - metric["min"], 0.0), max(metric["max"] - metric["median"], 0.0)


def _style(record: dict) -> dict:
    k = kind(record)
    color = {"measured": MEASURED, "emulated": EMULATED, "projected": PROJECTED}[k]
    peer = record.get("contender", "").startswith("peer-")
    return {"color": color, "hatch": "//" if k != "measured" else ("xx" if peer else None), "edgecolor": "black", "linewidth": 0.6}


def _legend(ax, kinds: set[str], peers: bool = False) -> None:
    handles = [Patch(facecolor=c, edgecolor="black", hatch=None if k == "measured" else "//", label=k) for k, c in
               (("measured", MEASURED), ("emulated", EMULATED), ("projected", PROJECTED)) if k in kinds]
    if peers:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="xx", label="peer runtime (same weights)"))
    ax.figure.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)


def _row_label(record: dict) -> str:
    return f"{record['contender']} · {record['quantization']} · {record['threads']}t\n{target_label(record)}"


def _bars(ax, records: list[dict], values: list[float], errors: list[tuple[float, float]], unit: str, title: str) -> None:
    y = list(range(len(records)))
    for i, (r, v, e) in enumerate(zip(records, values, errors)):
        ax.barh(i, v, xerr=[[e[0]], [e[1]]], capsize=3, **_style(r))
    ax.set_yticks(y, [_row_label(r) for r in records], fontsize=8)
    if not ax.yaxis_inverted():  # a shared y axis is inverted once for both panels
        ax.invert_yaxis()
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 50:
        ax.set_xscale("log")
    top = max(v + e[1] for v, e in zip(values, errors)) if values else 1
    for i, (v, e) in enumerate(zip(values, errors)):
        ax.text(v + e[1], i, f"  {v:,.3g}", va="center", ha="left", fontsize=8)
    if ax.get_xscale() == "linear":
        ax.set_xlim(0, top * 1.25)
    else:
        ax.set_xlim(min(positive) / 2, top * 3)
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def _measured_rows(records: list[dict], projected: bool = False) -> list[dict]:
    """Records with numbers, measured first, then emulated (then projected when asked)."""
    rows = [r for r in records if "metrics" in r and _median(r["metrics"].get("decode_tok_s")) is not None and (projected or not r.get("projected"))]
    order = {"measured": 0, "emulated": 1, "projected": 2}
    return sorted(rows, key=lambda r: (order[kind(r)], r["target"], r["threads"], r["contender"].startswith("peer-"), r["contender"]))


def throughput_chart(records: list[dict], path: Path) -> Path | None:
    """Decode and prefill tokens/s per contender (backend and quantization), peers beside ours, one
    row per (contender, target, threads); whiskers span min-max of the repeats. Measured and emulated
    records only: projected ones have their own chart."""
    rows = _measured_rows(records)
    if not rows:
        return None
    lengths = sorted({int(n) for r in rows for n in r["metrics"].get("prefill_tok_s", {})})
    longest = str(lengths[-1]) if lengths else None
    height = max(3.0, 0.55 * len(rows) + 1.6)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, height), sharey=True, constrained_layout=True)
    _bars(left, rows, [_median(r["metrics"]["decode_tok_s"]) for r in rows], [_err(r["metrics"]["decode_tok_s"]) for r in rows],
          "tokens / s (higher is better)", "Decode")
    prefill = [r["metrics"].get("prefill_tok_s", {}).get(longest) if longest else None for r in rows]
    _bars(right, rows, [_median(p) or 0.0 for p in prefill], [_err(p) for p in prefill], "tokens / s (higher is better)",
          f"Prefill, {longest}-token prompt" if longest else "Prefill")
    right.tick_params(axis="y", labelleft=False)
    _legend(right, {kind(r) for r in rows}, any(r["contender"].startswith("peer-") for r in rows))
    fig.suptitle("Decode and prefill throughput per backend and quantization (median; whiskers: min-max)", fontsize=11)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def ttft_chart(records: list[dict], path: Path) -> Path | None:
    """Time to first token split into model load, image encode and prefill (+ first token), in
    seconds; measured, emulated and projected records in separate panels, each on its own scale
    (an emulated run is hundreds of times slower and would flatten the others)."""
    rows = [r for r in _measured_rows(records, projected=True) if _median(r["metrics"].get("ttft_ms")) is not None]
    if not rows:
        return None
    groups = [(k, [r for r in rows if kind(r) == k]) for k in ("measured", "emulated", "projected")]
    groups = [(k, g) for k, g in groups if g]
    colors = ("#9e9e9e", "#8c564b", "#17becf")
    names = ("model load", "image encode", "prefill + first token")
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 0.55 * len(rows) + 1.4 * len(groups) + 1.2), squeeze=False, constrained_layout=True,
                             gridspec_kw={"height_ratios": [len(g) + 1 for _, g in groups]})
    for ax, (k, group) in zip(axes[:, 0], groups):
        totals = []
        for i, r in enumerate(group):
            m = r["metrics"]
            encode = (_median(m.get("image_encode_ms")) or 0.0) / 1e3
            ttft = _median(m["ttft_ms"]) / 1e3
            start = 0.0
            for value, color in zip((m.get("load_s") or 0.0, encode, max(ttft - encode, 0.0)), colors):
                ax.barh(i, value, left=start, color=color, edgecolor="black", linewidth=0.6, hatch=None if k == "measured" else "//")
                start += value
            totals.append(start)
            ax.text(start, i, f" {start:,.3g} s" + ("" if m.get("load_s") else " (load not included)"), va="center", fontsize=8)
        ax.set_yticks(range(len(group)), [_row_label(r) for r in group], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(totals) * 1.35 or 1)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title({"measured": "Measured", "emulated": "Emulated (QEMU, not phone time)", "projected": "Projected (roofline model, not measured)"}[k],
                     fontsize=10, loc="left")
    axes[-1, 0].set_xlabel("seconds (lower is better)")
    handles = [Patch(facecolor=c, edgecolor="black", label=n) for c, n in zip(colors, names)]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle("Time to first token: model load, image encode, prefill (medians)", fontsize=11)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def size_accuracy_chart(records: list[dict], path: Path) -> Path | None:
    """Artifact size against its parity results (measured at export, the same on every target): the
    task accuracy where the bundle measured it, and greedy-token agreement with the PyTorch reference."""
    points: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: kind(r) != "measured"):  # measured records first: they win
        size = r.get("metrics", {}).get("file_mb") or r.get("file_mb")  # skipped (untimed) artifacts carry their size too
        if kind(r) == "projected" or not size or not r.get("parity") or r["contender"] in points:
            continue
        points[r["contender"]] = {"size": size, "accuracy": r["parity"].get("accuracy"), "agreement": r["parity"].get("token_agreement")}
    panels = [(key, label) for key, label in (("accuracy", "closed-ended accuracy at export, %"), ("agreement", "greedy-token agreement with PyTorch, %"))
              if any(p[key] is not None for p in points.values())]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False, constrained_layout=True)
    sizes = [p["size"] for p in points.values()]
    for ax, (key, label) in zip(axes[0], panels):
        shown = {name: p for name, p in points.items() if p[key] is not None}
        for name, p in shown.items():
            ax.scatter(p["size"], 100 * p[key], s=60, color=MEASURED, edgecolor="black", zorder=3)
            ax.annotate(name, (p["size"], 100 * p[key]), textcoords="offset points", xytext=(6, -12), fontsize=8)
        if max(sizes) / min(sizes) > 20:
            ax.set_xscale("log")
        ax.set_xlim(min(sizes) * 0.7, max(sizes) * 1.6)
        low = min(100 * p[key] for p in shown.values())
        ax.set_ylim(max(0, low - 10), min(100, max(100 * p[key] for p in shown.values()) + 8) + 2)
        ax.set_xlabel("artifact file size, MB")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Size against parity (each artifact against the PyTorch reference, up and to the left is better)", fontsize=11)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def projection_chart(records: list[dict], path: Path, validation=None) -> Path | None:
    """Left: projected decode tokens/s per device (whiskers: the runtime's largest held-out validation
    error). Right: the projection's error on every published figure (calibration and held-out)."""
    from .projection import validate

    rows = sorted((r for r in records if r.get("projected") and _median(r.get("metrics", {}).get("decode_tok_s"))),
                  key=lambda r: (r["contender"], r["quantization"], -r["metrics"]["decode_tok_s"]["median"]))
    validation = validation if validation is not None else validate()
    if not rows and not validation:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, max(5.0, 0.32 * max(len(rows), len(validation)) + 1.8)), constrained_layout=True,
                                      gridspec_kw={"width_ratios": [1, 1.1]})
    if rows:
        values = [r["metrics"]["decode_tok_s"]["median"] for r in rows]
        errors = [_err(r["metrics"]["decode_tok_s"]) for r in rows]
        for i, (r, v, e) in enumerate(zip(rows, values, errors)):
            left.barh(i, v, xerr=[[e[0]], [e[1]]], capsize=3, color=PROJECTED, hatch="//", edgecolor="black", linewidth=0.6)
            ttft = _median(r["metrics"].get("ttft_ms"))
            left.text(v + e[1], i, f" {v:.3g} tok/s" + (f", TTFT {ttft / 1e3:.2g} s" if ttft else ""), va="center", fontsize=7)
        left.set_yticks(range(len(rows)), [f"{r['target']} · {r['threads']}t\n{r['contender']} · {r['quantization']}" for r in rows], fontsize=7)
        left.invert_yaxis()
        left.set_xlim(0, max(v + e[1] for v, e in zip(values, errors)) * 1.6)
        left.set_xlabel("projected decode tokens / s (not measured)")
        left.grid(axis="x", alpha=0.3)
        left.set_title("Projected decode speed per device\nwhiskers: largest held-out validation error of the runtime profile", fontsize=10)
    else:
        left.text(0.5, 0.5, "no projected records\n(mobilevlm bench --project DEVICE,...)", ha="center", va="center", transform=left.transAxes)
        left.set_axis_off()
    errors = [100 * v.error for v in validation]
    colors = ["#bbbbbb" if v.figure.role == "calibration" else ("#2ca02c" if abs(e) <= 25 else "#d62728") for v, e in zip(validation, errors)]
    right.barh(range(len(validation)), errors, color=colors, edgecolor="black", linewidth=0.5)
    for i, (v, e) in enumerate(zip(validation, errors)):
        right.text(e, i, f" {e:+.0f}%" if e >= 0 else f"{e:+.0f}% ", va="center", ha="left" if e >= 0 else "right", fontsize=7)
    right.set_yticks(range(len(validation)), [f"{v.figure.id} ({v.figure.runtime})" for v in validation], fontsize=7)
    right.invert_yaxis()
    for x in (-25, 25):
        right.axvline(x, color="black", linestyle="--", linewidth=0.8)
    right.axvline(0, color="black", linewidth=0.8)
    bound = max(40, max(abs(e) for e in errors) * 1.35)
    right.set_xlim(-bound, bound)
    right.set_xlabel("projection error against the published figure, % (dashed: ±25%)")
    right.legend(handles=[Patch(facecolor="#bbbbbb", label="calibration (fitted: ~0 by construction)"),
                          Patch(facecolor="#2ca02c", label="held-out, within 25%"), Patch(facecolor="#d62728", label="held-out, over 25%")],
                 loc="lower right", fontsize=7)
    right.grid(axis="x", alpha=0.3)
    right.set_title("Validation of the roofline model on published figures", fontsize=10)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


CHARTS = {"throughput.png": throughput_chart, "ttft.png": ttft_chart, "size_vs_parity.png": size_accuracy_chart, "projection.png": projection_chart}


def write_charts(records: list[dict], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [p for name, draw in CHARTS.items() if (p := draw(records, out_dir / name)) is not None]
