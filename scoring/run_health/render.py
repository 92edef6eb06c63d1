"""Run health as text: today-vs-baseline bars per distribution, for a terminal and for a
Prefect markdown artifact alike, drawn from the ``run_health`` table's rows."""

from __future__ import annotations

import math

import pyarrow as pa

BAR_WIDTH = 20
_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(share: float, width: int = BAR_WIDTH) -> str:
    """``share`` (0..1) as a bar of ``width`` characters, in eighths of a character."""
    eighths = round(max(0.0, min(1.0, share)) * width * 8)
    full, rest = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[rest] if rest else "")).ljust(width)


def reports_from_rows(rows: pa.Table) -> list[dict]:
    """One report per run in ``rows`` (``run_health`` rows), oldest first: its decision, the
    distributions (with or without a baseline) and the figures."""
    reports: dict[str, dict] = {}
    for row in sorted(rows.to_pylist(), key=lambda r: (r["recorded_at"], r["run_id"])):
        report = reports.setdefault(row["run_id"], {
            "table": row["table"], "run_id": row["run_id"], "model": row["model"],
            "decision": row["decision"], "on_drift": row["on_drift"],
            "baseline_runs": row["baseline_runs"], "recorded_at": row["recorded_at"],
            "drift": [], "figures": []})
        if row["kind"] == "distribution":
            report["drift"].append(row)
        elif row["kind"] == "figure":
            report["figures"].append((row["measure"], row["value"], row["baseline_value"]))
    return list(reports.values())


def _headline(report: dict) -> str:
    flagged = [d["measure"] for d in report["drift"] if d.get("flagged")]
    baseline = (f"against the last {report['baseline_runs']} run(s)" if report["baseline_runs"]
                else "no baseline yet")
    drifted = f"; drifted: {', '.join(flagged)}" if flagged else ""
    return (f"{report['table']} run {report['run_id']} ({report['model']}): "
            f"{report['decision']} ({report['on_drift']}), {baseline}{drifted}")


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}"


def distribution_lines(d: dict) -> list[str]:
    """A distribution's heading and one line of bars per bin: today, then the baseline."""
    flag = "  << drifted" if d.get("flagged") else ""
    figures = (f"PSI {_number(d.get('psi'))}  JS {_number(d.get('js'))}  "
               f"p {_number(d.get('p_value'))}" if d.get("psi") is not None else "no baseline")
    lines = [f"{d['measure']}  n={d.get('n')}  {figures}{flag}"]
    bins, today, baseline = d.get("bins") or [], d.get("today") or [], d.get("baseline") or []
    width = max((len(b) for b in bins), default=0)
    for i, label in enumerate(bins):
        line = f"  {label.ljust(width)}  today {bar(today[i])} {today[i]:6.1%}"
        if baseline:
            line += f"   baseline {bar(baseline[i])} {baseline[i]:6.1%}"
        lines.append(line.rstrip())
    return lines


def health_text(report: dict) -> str:
    """A run's health for a terminal: headline, figures, then every distribution's bars."""
    lines = [_headline(report), ""]
    for name, value, baseline in report["figures"]:
        lines.append(f"  {name:<40} {_number(value):>10}   baseline {_number(baseline):>10}")
    for d in sorted(report["drift"], key=lambda d: (not d.get("flagged"), d["measure"])):
        lines += ["", *distribution_lines(d)]
    return "\n".join(lines) + "\n"


def health_markdown(report: dict) -> str:
    """A run's health as a markdown artifact: headline, figures table, bars in a code block."""
    figures = "\n".join(f"| {name} | {_number(value)} | {_number(baseline)} |"
                        for name, value, baseline in report["figures"])
    bars = []
    for d in sorted(report["drift"], key=lambda d: (not d.get("flagged"), d["measure"])):
        bars += [*distribution_lines(d), ""]
    return (f"## Run health\n\n{_headline(report)}\n\n"
            f"| figure | today | baseline |\n| --- | --- | --- |\n{figures}\n\n"
            "```\n" + "\n".join(bars).rstrip() + "\n```\n")
