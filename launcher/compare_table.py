"""launcher.compare's output: the comparison from launcher.compare_stats as a table, markdown, csv
or json, and one line per setup saying how it compares with the first."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from launcher.compare_stats import higher_is_better


def _target_name(t: float, metric: str) -> str:
    return f"{t * 100:g}%" if higher_is_better(metric) and 0 < t <= 1 else f"{t:g}"


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "int":
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    if kind == "lr":
        return f"{value:.3g}"
    if kind == "sec":
        return f"{value:.1f}"
    return f"{value:.4f}"


def _cell(stat: dict[str, Any], n: int, kind: str) -> str:
    if stat["n"] == 0:
        return "-"
    text = _fmt(stat["mean"], kind)
    if n > 1:
        text += f" ± {_fmt(stat['std'], kind)}"
    if stat["n"] < n:
        text += f" ({stat['n']}/{n})"
    return text


def _tables(result: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    metric, targets = result["metric"], result["targets"]
    names = [_target_name(t, metric) for t in targets]
    head = ["run", "n", f"best {metric}", f"final {metric}", *[f"epochs to {n}" for n in names],
            "wall s", "final lr"]
    head2 = ["run", *[f"steps to {n}" for n in names], *[f"seconds to {n}" for n in names]]
    rows, rows2 = [], []
    for g in result["groups"]:
        s, n = g["stats"], g["n"]
        rows.append([g["label"], str(n), _cell(s["best"], n, "val"), _cell(s["final"], n, "val"),
                     *[_cell(s[f"epochs_to/{t:g}"], n, "int") for t in targets],
                     _cell(s["wall_seconds"], n, "sec"), _cell(s["final_lr"], n, "lr")])
        rows2.append([g["label"], *[_cell(s[f"steps_to/{t:g}"], n, "int") for t in targets],
                      *[_cell(s[f"seconds_to/{t:g}"], n, "sec") for t in targets]])
    return [(head, rows), (head2, rows2)]


def ratio_lines(result: dict[str, Any]) -> list[str]:
    """"fast vs baseline: 3.0x fewer epochs to 80% (4 vs 12), ..." for each group after the first."""
    metric = result["metric"]
    lines = []
    groups = {g["label"]: g for g in result["groups"]}
    for r in result["ratios"]:
        base, other = groups[r["baseline"]]["stats"], groups[r["group"]]["stats"]
        parts = []
        for t in result["targets"]:
            name = _target_name(t, metric)
            key = f"epochs_to/{t:g}"
            b, o = base[key]["mean"], other[key]["mean"]
            if b is None and o is None:
                continue
            if b is None:
                parts.append(f"reached {name} (baseline did not)")
            elif o is None:
                parts.append(f"did not reach {name} (baseline did, in {_fmt(b, 'int')} epochs)")
            else:
                ratio = r[key]
                word = "as many" if abs(ratio - 1) < 0.05 else (
                    f"{ratio:.1f}x fewer" if ratio > 1 else f"{1 / ratio:.1f}x more")
                secs = r[f"seconds_to/{t:g}"]
                speed = "" if not secs else (f", {secs:.1f}x less time" if secs >= 1 else f", {1 / secs:.1f}x more time")
                parts.append(f"{word} epochs to {name} ({_fmt(o, 'int')} vs {_fmt(b, 'int')}{speed})")
        if r["best_difference"] is not None:
            parts.append(f"best {metric} {other['best']['mean']:.4f} vs {base['best']['mean']:.4f} "
                         f"({r['best_difference']:+.4f})")
        lines.append(f"{r['group']} vs {r['baseline']}: " + ("; ".join(parts) or "no common numbers"))
    return lines


def render(result: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(result, indent=2)
    tables = _tables(result)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        keys = list(result["groups"][0]["stats"]) if result["groups"] else []
        writer.writerow(["run", "n", "seeds", *[f"{k}{suffix}" for k in keys for suffix in ("", "_std", "_min", "_max")]])
        for g in result["groups"]:
            cells = [g["label"], g["n"], " ".join(str(s) for s in g["seeds"])]
            for k in keys:
                st = g["stats"][k]
                cells += ["" if st[x] is None else f"{st[x]:.6g}" for x in ("mean", "std", "min", "max")]
            writer.writerow(cells)
        return buf.getvalue().rstrip("\n")
    out = []
    for head, rows in tables:
        if fmt == "markdown":
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join("---" for _ in head) + "|")
            out += ["| " + " | ".join(r) + " |" for r in rows]
        else:
            widths = [max(len(x) for x in col) for col in zip(head, *rows)]
            out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
            out.append("  ".join("-" * w for w in widths))
            out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        out.append("")
    seeds_note = [f"{g['label']}: seeds {', '.join(str(s) for s in g['seeds'])}" for g in result["groups"] if g["n"] > 1]
    if seeds_note:
        out.append(("mean ± std over seeds; " if fmt == "table" else "Mean ± std over seeds; ") + "; ".join(seeds_note))
        out.append("")
    lines = ratio_lines(result)
    if fmt == "markdown":
        lines = [f"- {line}" for line in lines]
    out += lines
    return "\n".join(out).rstrip("\n")
